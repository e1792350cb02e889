"""Speed and peak memory of pqjax.quantize, against the naive exact search.

Each configuration runs in a fresh subprocess, so the cold time includes compilation
and the peak resident memory is that configuration's own. Run:

    .venv/bin/python benchmarks/speed.py [--skip-large]

qwix (an optional benchmark dependency: `pip install qwix`) is timed on MiniLM.

Prints a table and writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from common import publish

# GPT-2 small: 12 blocks of attention (768 x 2304, 768 x 768) and MLP (768 x 3072,
# 3072 x 768), token and position embeddings. 124M parameters with the 1-D leaves.
GPT2_SMALL = [(50257, 768), (1024, 768)] + [
  (768, 2304),
  (768, 768),
  (768, 3072),
  (3072, 768),
] * 12
# GPT-2 medium: 24 blocks of width 1024, 355M parameters.
GPT2_MEDIUM = [(50257, 1024), (1024, 1024)] + [
  (1024, 3072),
  (1024, 1024),
  (1024, 4096),
  (4096, 1024),
] * 24

_CHILD = r'''
import functools, json, os, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
import pqjax
if os.environ.get('PQJAX_BENCH_CACHE'):
  # JAX's persistent compilation cache: a second process loads the compiled
  # programs instead of compiling them.
  jax.config.update('jax_compilation_cache_dir', os.environ['PQJAX_BENCH_CACHE'])
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
from pqjax._src.core import blocks, operator
from pqjax._src.search import optimiser, stats

model, method = sys.argv[1], sys.argv[2]
if model == 'minilm':
  from pqjax.tools import minilm
  loaded = minilm.load()
  params = loaded.params
else:
  shapes = json.loads(sys.argv[3])
  rng = np.random.default_rng(0)
  params = {f'w{i}': jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
            for i, s in enumerate(shapes)}
jax.block_until_ready(params)
n = sum(x.size for x in jax.tree_util.tree_leaves(params))
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def naive(params):
  """Exact full-error golden-section on the exponent (grid of 24, then 24 steps) for
  every layer, at clip ratio 1 (so less work than pqjax's joint search)."""
  cfg = pqjax.SearchConfig()

  @functools.partial(jax.jit, static_argnames='n')
  def one(w, n):
    xs, scale = stats.prepare(w, 1, n)
    x = jnp.abs(xs)
    d = jnp.where(xs < 0, 8.0, 7.0)  # the full grid's code range of each side
    f = lambda a: operator.block_error(x, jnp.log(x), d, scale, a, 1.0, 'full')
    grid = jnp.linspace(cfg.lo, cfg.hi, cfg.exponent_points)
    errs = jax.lax.map(f, grid)
    i = jnp.argmin(errs)
    last = cfg.exponent_points - 1
    lo, hi = grid[jnp.maximum(i - 1, 0)], grid[jnp.minimum(i + 1, last)]
    return optimiser.golden(f, lo, hi, cfg.iters)[0]

  leaves = [x for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2]
  return [one(jnp.asarray(w, jnp.float32).reshape(-1, w.shape[-1]), w.shape[-1])
          for w in leaves]


def qwix_rtn(params):
  """qwix PTQ int4 per channel: round-to-nearest, no search, embeddings left float."""
  import qwix
  rules = [qwix.QuantizationRule(module_path='.*', weight_qtype='int4')]
  qmodel = qwix.quantize_model(loaded.module, qwix.PtqProvider(rules))
  ids = jnp.ones((1, 16), jnp.int32)
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), ids, ids, ids))
  return lambda: qwix.quantize_params(params, abstract['params'])


run = {'pqjax': lambda: pqjax.quantize(params, 4),
       'pqjax, compilation cache': lambda: pqjax.quantize(params, 4),
       'naive': lambda: naive(params),
       'qwix': (lambda: qwix_rtn(params)) if method == 'qwix' else None}[method]
if method == 'qwix':
  run = run()
times = []
for _ in range(3 if method.startswith('pqjax') else 2):
  t = time.perf_counter()
  jax.block_until_ready(run())
  times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({'params': n, 'cold': times[0], 'warm': min(times[1:]),
                  'peak_mb': peak / 1024, 'base_mb': base_rss / 1024}))
'''


def _run(model: str, method: str, shapes=None) -> dict:
  args = [sys.executable, '-c', _CHILD, model, method, json.dumps(shapes or [])]
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'}

  def child() -> dict:
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])

  if method != 'pqjax, compilation cache':
    return child()
  with tempfile.TemporaryDirectory() as cache:
    env['PQJAX_BENCH_CACHE'] = cache
    child()  # fills the cache
    return child()


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument(
    '--skip-large', action='store_true', help='MiniLM only (skip the 124M and 355M trees)'
  )
  args = parser.parse_args()
  import jax

  rows = []
  # The naive search is too slow to repeat on 355M weights; qwix needs the model.
  runs = [
    (
      'MiniLM (real)',
      'minilm',
      None,
      ('pqjax', 'pqjax, compilation cache', 'naive', 'qwix'),
    )
  ]
  if not args.skip_large:
    runs += [
      ('GPT-2-small shapes (Gaussian)', 'shapes', GPT2_SMALL, ('pqjax', 'naive')),
      ('GPT-2-medium shapes (Gaussian)', 'shapes', GPT2_MEDIUM, ('pqjax',)),
    ]
  for label, model, shapes, methods in runs:
    for method in methods:
      r = _run(model, method, shapes)
      rows.append((label, method, r))
      print(label, method, r, flush=True)

  lines = [
    '# quantize speed (4 bits, per channel, default settings: full grid, exponent'
    ' and clip ratio searched per layer)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs,'
    f' Python {platform.python_version()}, jax {jax.__version__}, CPU backend.',
    'Cold: first call in a fresh process (compilation included); warm: best of the'
    ' later calls. "compilation cache": a second fresh process with JAX\'s'
    " persistent compilation cache filled by a first one. Peak: the process's peak"
    ' resident memory, and what it adds to the loaded float parameters.',
    '',
    '| tree | method | params (M) | cold s | warm s | warm s / M params | peak MB |'
    ' added over loaded params, MB | float params MB |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for label, method, r in rows:
    m = r['params'] / 1e6
    lines.append(
      f'| {label} | {method} | {m:.1f} | {r["cold"]:.2f} | {r["warm"]:.2f} |'
      f' {r["warm"] / m:.3f} | {r["peak_mb"]:.0f} |'
      f' {r["peak_mb"] - r["base_mb"]:.0f} | {4 * m:.0f} |'
    )
  lines.append('')
  for label in dict.fromkeys(r[0] for r in rows):
    t = {method: r for lab, method, r in rows if lab == label}
    if 'naive' in t:
      lines.append(
        f'{label}: pqjax is {t["naive"]["warm"] / t["pqjax"]["warm"]:.1f}x'
        ' faster than the naive exact search (warm, same run).'
      )
  per_m = [r['warm'] / (r['params'] / 1e6) for _, method, r in rows if method == 'pqjax']
  lines.append(
    'pqjax warm seconds per million weights across trees: '
    + ', '.join(f'{x:.4f}' for x in per_m)
    + ' (linear scaling keeps these equal).'
  )
  publish('speed', lines)


if __name__ == '__main__':
  main()
