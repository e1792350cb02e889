"""Speed and peak memory of pqjax.quantize, against the naive exact search.

Each configuration runs in a fresh subprocess, so the cold time includes compilation
and the peak resident memory is that configuration's own. Run:

    .venv/bin/python benchmarks/speed.py [--skip-124m]

Prints a table and writes benchmarks/results/speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

# GPT-2 small: 12 blocks of attention (768 x 2304, 768 x 768) and MLP (768 x 3072,
# 3072 x 768), token and position embeddings. 124M parameters with the 1-D leaves.
GPT2_SMALL = ([(50257, 768), (1024, 768)]
              + [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12)

_CHILD = r'''
import functools, json, resource, sys, time
import jax, jax.numpy as jnp, numpy as np
import pqjax
from pqjax import search, tree

model, method = sys.argv[1], sys.argv[2]
if model == 'minilm':
  from pqjax import minilm
  params = minilm.load().params
else:
  shapes = json.loads(sys.argv[3])
  rng = np.random.default_rng(0)
  params = {f'w{i}': jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
            for i, s in enumerate(shapes)}
jax.block_until_ready(params)
n = sum(x.size for x in jax.tree_util.tree_leaves(params))
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def naive(params):
  """Exact full-error golden-section (grid of 24, then 24 steps) for every layer."""
  cfg = search.SearchConfig()

  @functools.partial(jax.jit, static_argnames='n')
  def one(w, n):
    x, scale = search.prepare(w, 1, n)
    f = lambda a: search.power.block_error(x, jnp.log(x), scale, a, 4)
    return search.minimise(f, (), cfg)

  leaves = [x for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2]
  return [one(jnp.asarray(w, jnp.float32).reshape(-1, w.shape[-1]), w.shape[-1])
          for w in leaves]


run = {'pqjax': lambda: pqjax.quantize(params, 4),
       'naive': lambda: naive(params)}[method]
times = []
for _ in range(3 if method == 'pqjax' else 2):
  t = time.perf_counter()
  jax.block_until_ready(run())
  times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({'params': n, 'cold': times[0], 'warm': min(times[1:]),
                  'peak_mb': peak / 1024, 'base_mb': base_rss / 1024}))
'''


def _run(model: str, method: str, shapes=None) -> dict:
  args = [sys.executable, '-c', _CHILD, model, method, json.dumps(shapes or [])]
  out = subprocess.run(args, capture_output=True, text=True, check=True,
                       env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--skip-124m', action='store_true')
  args = parser.parse_args()
  import jax

  rows = []
  models = [('MiniLM (real)', 'minilm', None)]
  if not args.skip_124m:
    models.append(('GPT-2-small shapes (Gaussian)', 'shapes', GPT2_SMALL))
  for label, model, shapes in models:
    for method in ('pqjax', 'naive'):
      r = _run(model, method, shapes)
      rows.append((label, method, r))
      print(label, method, r, flush=True)

  lines = [
      '# quantize speed (4 bits, per channel, exponent per layer)', '',
      f'Machine: {platform.platform()}, {os.cpu_count()} CPUs,'
      f' Python {platform.python_version()}, jax {jax.__version__}, CPU backend.',
      'Cold: first call in a fresh process (compilation included); warm: best of the'
      ' later calls. Peak: the process\'s peak resident memory, and what it adds to'
      ' the loaded float parameters.', '',
      '| tree | method | params (M) | cold s | warm s | warm s / M params | peak MB |'
      ' added over loaded params, MB | float params MB |',
      '|---|---|---|---|---|---|---|---|---|']
  for label, method, r in rows:
    m = r['params'] / 1e6
    lines.append(f'| {label} | {method} | {m:.1f} | {r["cold"]:.2f} | {r["warm"]:.2f} |'
                 f' {r["warm"] / m:.3f} | {r["peak_mb"]:.0f} |'
                 f' {r["peak_mb"] - r["base_mb"]:.0f} | {4 * m:.0f} |')
  lines.append('')
  for label in dict.fromkeys(r[0] for r in rows):
    t = {method: r for lab, method, r in rows if lab == label}
    lines.append(f'{label}: pqjax is {t["naive"]["warm"] / t["pqjax"]["warm"]:.1f}x'
                 ' faster than the naive exact search (warm, same run).')
  text = '\n'.join(lines) + '\n'
  print(text)
  out = Path(__file__).parent / 'results' / 'speed.md'
  out.write_text(text)


if __name__ == '__main__':
  main()
