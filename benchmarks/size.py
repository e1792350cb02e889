"""Size of all-MiniLM-L6-v2 at fp32 and quantized to 2, 3, 4 and 8 bits per channel.

For each: pqjax.nbytes of the tree, and the bytes of the saved safetensors file and
Orbax directory. Run:

    python benchmarks/size.py

Prints a table and writes benchmarks/results/size.md.
"""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import jax
from common import publish

import pqjax
from pqjax.tools import cli, minilm


def _row(label: str, tree, n_params: int, fp32: int | None, folder: Path) -> str:
  st, ob = folder / f'{label}.safetensors', folder / label
  pqjax.save_safetensors(st, tree)
  pqjax.save_orbax(ob, tree)
  nbytes, file, orbax = pqjax.nbytes(tree), os.path.getsize(st), cli.disk_bytes(ob)
  fp32 = fp32 or nbytes
  return (
    f'| {label} | {nbytes / 1e6:.2f} | {8 * nbytes / n_params:.2f} |'
    f' {file / 1e6:.2f} | {orbax / 1e6:.2f} | {fp32 / nbytes:.2f}x |'
  )


def main() -> None:
  model = minilm.load()
  params = model.params
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  fp32 = pqjax.nbytes(params)
  hf_file = os.path.getsize(minilm.model_dir() / 'model.safetensors')
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    rows.append(_row('fp32', params, n_params, None, folder))
    print(rows[-1], flush=True)
    for bits in (8, 4, 3, 2):
      params_q, _ = pqjax.quantize(params, bits, granularity='channel')
      rows.append(_row(f'{bits} bits', params_q, n_params, fp32, folder))
      print(rows[-1], flush=True)

  lines = [
    '# MiniLM size (all-MiniLM-L6-v2, FlaxBertModel params)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs,'
    f' Python {platform.python_version()}, jax {jax.__version__}.',
    '',
    f'{n_params / 1e6:.2f}M parameters. Every floating leaf with two or more axes'
    ' (40 kernels and embedding tables) is quantized per channel, exponent per'
    ' layer; biases and LayerNorm parameters stay fp32. MB = 10^6 bytes. The'
    f' Hugging Face model.safetensors of the same model is {hf_file / 1e6:.2f} MB.',
    '',
    '| weights | pqjax.nbytes MB | bits / parameter | safetensors file MB |'
    ' Orbax directory MB | smaller than fp32 |',
    '|---|---|---|---|---|---|',
    *rows,
    '',
    'Quantized leaves hold packed codes (2 bits: 4 codes a byte; 3 bits: 8 codes in'
    ' 3 bytes; 4 bits: 2 codes a byte; 8 bits: int8), one float32 scale per column,'
    ' a float32 exponent and its float32 decoding table. The files add the JSON'
    ' metadata and the format headers. Orbax directories are smaller than the'
    ' arrays because TensorStore compresses them (zstd); low-entropy 2-bit codes'
    ' compress most.',
  ]
  publish('size', lines)


if __name__ == '__main__':
  main()
