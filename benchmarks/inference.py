"""Run time of quantized models where they are served: memory and step time.

Models: the real MiniLM (FlaxBertModel) at 1 x 16, 8 x 128 and 32 x 128 tokens, and
a GPT-2-small-shaped decoder with a KV cache (benchmarks/gpt2.py; 163M parameters,
with and without ``nn.scan``): a batch-1 generation step (one token, 256-position
cache, donated) and a 128-token prefill.

Variants, side by side: fp32; bf16 (the parameters cast to bfloat16); pqjax at 4
and 8 bits per channel through ``pqjax.wrap`` with the automatic choice of product
(on CPU: the native kernels up to 16 rows, decode-then-dot above) and each forced
one (``native``: the native CPU kernel; ``fused``: codes read inside an XLA
product; ``decode``: each weight decoded just before its product); the 4-bit model
dequantized once, then run as a float model; qwix int4 (weights only, per channel)
where it runs.

For each: the compiled program's ``memory_analysis()`` (arguments + temp), the peak
RSS of a fresh process that loads the model's checkpoint from disk, compiles and
runs it, and the median step time (all variants of a scenario in one process, timed
interleaved, so ratios are measured side by side). Run:

    python benchmarks/inference.py [--quick]

Prints a table and writes benchmarks/results/inference.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gpt2
import jax
import jax.numpy as jnp
import numpy as np
from common import publish

import pqjax

HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class Scenario:
  name: str
  model: str  # 'minilm', 'gpt2' or 'gpt2-scan'
  batch: int
  tokens: int
  runs: int
  step: bool = False  # a generation step over a KV cache


SCENARIOS = (
  Scenario('MiniLM 1 x 16', 'minilm', 1, 16, 60),
  Scenario('MiniLM 8 x 128', 'minilm', 8, 128, 12),
  Scenario('MiniLM 32 x 128', 'minilm', 32, 128, 5),
  Scenario('GPT-2 step, batch 1', 'gpt2', 1, 1, 30, step=True),
  Scenario('GPT-2 prefill 128', 'gpt2', 1, 128, 6),
  Scenario('GPT-2 (nn.scan) step, batch 1', 'gpt2-scan', 1, 1, 30, step=True),
  Scenario('GPT-2 (nn.scan) prefill 128', 'gpt2-scan', 1, 128, 6),
)
VARIANTS = (
  'fp32',
  'bf16',
  'pqjax 4-bit',
  'pqjax 4-bit native',
  'pqjax 4-bit fused',
  'pqjax 4-bit decode',
  'pqjax 8-bit',
  'pqjax 8-bit native',
  'pqjax 8-bit fused',
  'pqjax 8-bit decode',
  'dequantized once (4-bit)',
  'qwix int4',
)
# Fresh processes for peak RSS: the variants a user would serve.
RSS_VARIANTS = ('fp32', 'bf16', 'pqjax 4-bit', 'pqjax 8-bit', 'dequantized once (4-bit)')


# --- models and their checkpoints ----------------------------------------------------


def _minilm_module() -> Any:
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  from transformers import BertConfig, FlaxBertModel

  from pqjax.tools import minilm

  config = BertConfig.from_pretrained(minilm.model_dir())
  return FlaxBertModel(config, _do_init=False).module


def _layer_axes(path: str, leaf: Any) -> int:
  # The stacked blocks of the nn.scan model: one exponent and scales per layer.
  return 1 if path.startswith('blocks/') and leaf.ndim >= 3 else 0


def checkpoints(model: str, folder: Path) -> dict[str, Path]:
  """The float and quantized checkpoints of ``model`` in ``folder``, made once."""
  paths = {b: folder / f'{model}-{b}.safetensors' for b in ('float', 'q4', 'q8')}
  if all(p.exists() for p in paths.values()):
    return paths
  if model == 'minilm':
    from pqjax.tools import minilm

    params = minilm.load().params
  else:
    params = gpt2.init(gpt2.GPT(gpt2.SMALL, scan=model == 'gpt2-scan'))
  pqjax.save_safetensors(paths['float'], params, overwrite=True)
  axes = _layer_axes if model == 'gpt2-scan' else 0
  for bits in (4, 8):
    params_q, _ = pqjax.quantize(params, bits, **({'layer_axes': axes} if axes else {}))
    pqjax.save_safetensors(paths[f'q{bits}'], params_q, overwrite=True)
  return paths


def _inputs(s: Scenario) -> tuple[Any, ...]:
  if s.model == 'minilm':
    from transformers import AutoTokenizer

    from pqjax.tools import corpus, minilm

    tokenizer = AutoTokenizer.from_pretrained(minilm.model_dir())
    text = sorted(corpus.stdlib_sentences(4 * s.batch), key=len, reverse=True)[: s.batch]
    enc = tokenizer(
      text,
      padding='max_length',
      truncation=True,
      max_length=s.tokens,
      return_tensors='np',
    )
    return enc['input_ids'], enc['attention_mask'], enc['token_type_ids']
  tokens = jnp.arange(s.tokens, dtype=jnp.int32)[None].repeat(s.batch, 0) % 50000 + 7
  pos = jnp.int32(128 if s.step else 0)
  return tokens, pos


def _apply(s: Scenario) -> Callable[..., Any]:
  """``apply(params, *inputs, cache)`` returning what a user keeps."""
  if s.model == 'minilm':
    module = _minilm_module()
    return lambda p, ids, mask, types: (
      module.apply({'params': p}, ids, mask, types).last_hidden_state
    )
  model = gpt2.GPT(gpt2.SMALL, scan=s.model == 'gpt2-scan')
  return lambda p, tokens, pos, cache: model.apply({'params': p}, tokens, cache, pos)


def _cache(s: Scenario) -> Any:
  return gpt2.empty_cache(gpt2.SMALL, s.batch, s.model == 'gpt2-scan')


def _qwix(s: Scenario, params: Any, inputs: tuple[Any, ...]) -> tuple[Any, Any]:
  import qwix

  rule = qwix.QuantizationRule(module_path='.*', weight_qtype='int4')
  if s.model == 'minilm':
    module = _minilm_module()
    qmodel = qwix.quantize_model(module, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *inputs))
    fn = lambda p, ids, mask, types: (
      qmodel.apply({'params': p}, ids, mask, types).last_hidden_state
    )
  else:
    module = gpt2.GPT(gpt2.SMALL, scan=s.model == 'gpt2-scan')
    qmodel = qwix.quantize_model(module, qwix.PtqProvider([rule]))
    tokens, pos = inputs
    abstract = jax.eval_shape(
      lambda: qmodel.init(jax.random.key(0), tokens, _cache(s), pos)
    )
    fn = lambda p, tokens, pos, cache: qmodel.apply({'params': p}, tokens, cache, pos)
  return fn, qwix.quantize_params(params, abstract['params'])


def variant(s: Scenario, name: str, paths: dict[str, Path], inputs: tuple[Any, ...]):
  """``(params, function)`` of one variant, loaded from the checkpoints on disk."""
  apply = _apply(s)
  if name in ('fp32', 'bf16', 'qwix int4'):
    params = pqjax.load_float(paths['float'])
    if name == 'bf16':
      params = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        params,
      )
    if name == 'qwix int4':
      apply, params = _qwix(s, params, inputs)
    return params, apply
  bits = '4' if '4-bit' in name else '8'
  params_q = pqjax.load(paths[f'q{bits}'])
  if name.startswith('dequantized'):
    return jax.block_until_ready(pqjax.dequantize(params_q)), apply
  path = name.split()[-1] if name.endswith(('native', 'fused', 'decode')) else 'auto'
  return params_q, pqjax.wrap(apply, products=path)


def _compiled(s: Scenario, fn: Callable[..., Any], params: Any, inputs: tuple[Any, ...]):
  if s.model == 'minilm':
    return jax.jit(fn).lower(params, *inputs).compile()
  # The cache is donated: a generation step updates it in place.
  return jax.jit(fn, donate_argnums=3).lower(params, *inputs, _cache(s)).compile()


def _call(s: Scenario, compiled: Any, params: Any, inputs: tuple[Any, ...], state: dict):
  if s.model == 'minilm':
    return jax.block_until_ready(compiled(params, *inputs))
  cache = state.pop('cache', None)
  if cache is None:
    cache = _cache(s)
  logits, cache = jax.block_until_ready(compiled(params, *inputs, cache))
  state['cache'] = cache if s.step else None
  return logits


# --- the two kinds of child process -------------------------------------------------


def measure(s: Scenario, folder: Path, names: tuple[str, ...]) -> list[dict[str, Any]]:
  """Memory analysis, output error and interleaved step times of every variant."""
  paths = checkpoints(s.model, folder)
  inputs = _inputs(s)
  runs, rows = {}, {}
  for name in names:
    try:
      params, fn = variant(s, name, paths, inputs)
      compiled = _compiled(s, fn, params, inputs)
    except Exception as e:  # a peer that does not run this model
      first = ' '.join(str(e).split())[:100]  # one line of the table
      rows[name] = {'variant': name, 'error': f'{type(e).__name__}: {first}'}
      continue
    memory = compiled.memory_analysis()
    state: dict[str, Any] = {}
    out = np.asarray(_call(s, compiled, params, inputs, state), np.float32)
    runs[name] = (compiled, params, state)
    rows[name] = {
      'variant': name,
      'args': memory.argument_size_in_bytes,
      'temp': memory.temp_size_in_bytes,
      'out': out,
    }
  reference = rows['fp32']['out']
  for r in rows.values():
    if 'out' in r:
      out = r.pop('out')
      r['error'] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
  times: dict[str, list[float]] = {n: [] for n in runs}
  for _ in range(2):
    for c, p, st in runs.values():
      _call(s, c, p, inputs, st)
  # Rounds in a shuffled order, each variant called twice in a row and its second
  # call timed, so no variant always follows the same one (a large program evicts
  # the caches of the next).
  order = random.Random(0)
  for _ in range(s.runs):
    shuffled = list(runs)
    order.shuffle(shuffled)
    for n in shuffled:
      c, p, st = runs[n]
      _call(s, c, p, inputs, st)
      start = time.perf_counter()
      _call(s, c, p, inputs, st)
      times[n].append(time.perf_counter() - start)
  for n, t in times.items():
    rows[n]['ms'] = 1e3 * statistics.median(t)
    rows[n]['best_ms'] = 1e3 * min(t)
  return [rows[n] for n in names if n in rows]


def peak_rss(s: Scenario, folder: Path, name: str) -> float:
  """MB: a fresh process loads one variant from disk, compiles it and runs 3 steps."""
  paths = checkpoints(s.model, folder)
  inputs = _inputs(s)
  try:
    params, fn = variant(s, name, paths, inputs)
    compiled = _compiled(s, fn, params, inputs)
    state: dict[str, Any] = {}
    for _ in range(3):
      _call(s, compiled, params, inputs, state)
  except Exception:  # reported by the timing run
    return float('nan')
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the report ---------------------------------------------------------------------


def _child(args: list[str]) -> Any:
  out = subprocess.run(
    [sys.executable, __file__, *args], check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def _table(s: Scenario, rows: list[dict[str, Any]], rss: dict[str, float]) -> list[str]:
  base = next(r for r in rows if r['variant'] == 'fp32')
  base_mem = base['args'] + base['temp']
  out = [
    f'### {s.name} ({s.runs} timed runs)',
    '',
    '| variant | args MB | temp MB | args + temp | peak RSS MB | median ms (best) |'
    ' time vs fp32 | rel. error vs fp32 |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    if 'ms' not in r:
      out.append(f'| {r["variant"]} | did not run: {r["error"]} | | | | | | |')
      continue
    mem = r['args'] + r['temp']
    out.append(
      f'| {r["variant"]} | {r["args"] / 1e6:.1f} | {r["temp"] / 1e6:.1f} |'
      f' {mem / 1e6:.1f} ({mem / base_mem:.2f}x) |'
      f' {rss.get(r["variant"], float("nan")):.0f} |'
      f' {r["ms"]:.2f} ({r["best_ms"]:.2f}) | **{r["ms"] / base["ms"]:.2f}x** |'
      f' {r["error"]:.4f} |'
    )
  return out + ['']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='skip peak RSS processes')
  parser.add_argument('--scenarios', nargs='*', help='names of scenarios to run')
  parser.add_argument('--name', default='inference', help='writes results/<name>.md')
  parser.add_argument('--child', nargs=3, metavar=('KIND', 'SCENARIO', 'FOLDER'))
  parser.add_argument('--variant')
  args = parser.parse_args()
  by_name = {s.name: s for s in SCENARIOS}
  if args.child:
    kind, name, folder = args.child
    s = by_name[name]
    if kind == 'time':
      print(json.dumps(measure(s, Path(folder), VARIANTS)))
    else:
      print(json.dumps(peak_rss(s, Path(folder), args.variant)))
    return

  chosen = [s for s in SCENARIOS if not args.scenarios or s.name in args.scenarios]
  lines = [
    '# Run time: memory and step time of quantized models',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__},'
    f' {jax.default_backend().upper()} backend. `python benchmarks/inference.py`.',
    '',
    'args / temp: `memory_analysis()` of the compiled program (argument and temporary'
    " bytes). peak RSS: a fresh process that loads the variant's checkpoint from"
    ' disk (the float or pqjax safetensors file), compiles and runs 3 steps'
    ' (dequantized once: loads the 4-bit file and decodes it; qwix: loads the float'
    ' file and quantizes). Times: median (best) of the timed runs, every variant of'
    ' a scenario interleaved in one process after 2 warm-up calls. rel. error:'
    ' ||out - out_fp32|| / ||out_fp32|| of the last hidden state (MiniLM) or the'
    " logits (GPT-2). GPT-2: random weights of GPT-2 small's shapes (163M), 256-"
    'position KV cache donated to the step; the nn.scan model is quantized with'
    ' `layer_axes=1` on its stacked blocks. pqjax variants: 4 or 8 bits per channel,'
    ' every >= 2-D leaf (embeddings included), `pqjax.wrap(apply, products=...)`:'
    ' no suffix is the automatic choice.',
    '',
  ]
  with tempfile.TemporaryDirectory() as tmp:
    for s in chosen:
      rows = _child(['--child', 'time', s.name, tmp])
      rss = {}
      if not args.quick:
        for v in RSS_VARIANTS:
          rss[v] = _child(['--child', 'rss', s.name, tmp, '--variant', v])
      table = _table(s, rows, rss)
      print('\n'.join(table), flush=True)
      lines += table
  publish(args.name, lines)


if __name__ == '__main__':
  main()
