"""The examples run end to end and print sane numbers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[2] / 'examples'


def run_example(name: str, *args: str) -> dict[str, float]:
  """Runs ``examples/<name>.py``; returns its printed ``label: number`` lines."""
  done = subprocess.run(
    [sys.executable, str(EXAMPLES / f'{name}.py'), *args],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=EXAMPLES,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return {
    m[1]: float(m[2])
    for m in re.finditer(r'^(.+?): (-?[\d.]+)$', done.stdout, re.MULTILINE)
  }


def check_comparison(out: dict[str, float], metric: str, floor: float, drop: float):
  """Float score above ``floor``; the 4-bit model within ``drop`` of it."""
  full, quant = out[f'float {metric}'], out[f'pqjax 4-bit {metric}']
  assert floor < full <= 1.0
  assert full - drop < quant <= 1.0
  assert 0 < out['max |float - quantized| output'] < 100


@pytest.mark.parametrize(
  'name', ['linen_mlp', 'nnx_model', 'equinox_model', 'cnn_batchnorm']
)
def test_digits_example(name):
  out = run_example(name)
  # Trained on 1400 digits, tested on the other 397: float accuracy is about 0.99.
  check_comparison(out, 'accuracy', 0.95, 0.05)


@pytest.mark.slow
def test_hf_bert_example():
  out = run_example('hf_bert')
  assert out['float mean [CLS] cosine'] == 1.0
  check_comparison(out, 'mean [CLS] cosine', 0.99, 0.15)


@pytest.mark.slow
def test_generate_example():
  out = run_example('generate')
  assert out['generated tokens'] == 24
  # Greedy tokens of the 4-bit model are those of its dequantized weights.
  assert out['tokens equal to the dequantized model'] == 1.0
  assert out['4-bit folder bytes'] < out['bf16 folder bytes'] / 3.5


@pytest.mark.slow
def test_tunix_llama_example():
  """tunix's Sampler, unchanged, generates from a pqjax.nnx model the tokens of its
  dequantized weights, holding a quarter of the float parameter bytes or less."""
  out = run_example('tunix_llama')
  assert out['generated tokens'] == 24
  assert out['tokens equal to the dequantized model'] == 1.0
  assert out['4-bit parameter bytes'] < out['float32 parameter bytes'] / 4


@pytest.mark.slow
def test_qlora_minilm_example():
  """A few adapter steps on a 3-bit MiniLM raise the held-out cosine; the folded,
  saved and reloaded trees serve, at the widths and the budget asked for."""
  out = run_example(
    'qlora_minilm',
    *('--steps', '40', '--sentences', '192', '--batch-size', '4'),
    *('--schedule', 'warmup-cosine', '--hidden-weight', '3'),
  )
  assert 0.8 < out['quantized held-out mean cosine'] < 0.9
  assert (
    out['adapted held-out mean cosine'] > out['quantized held-out mean cosine'] + 0.03
  )
  assert out['adapted bits per weight'] == out['folded bits per weight']
  stored = out['adapted bits per weight'] + out['adapter bits per weight']
  assert out['folded at the stored bits bits per weight'] <= stored + 0.01
