"""Bit budgets on MiniLM: which damage estimate serves the model, and what they cost.

``pqjax.quantize(params, bits_per_weight=B)`` chooses each leaf's width to minimise
``sum importance(leaf) * relative error(leaf)`` within the budget. This measures the
estimates a data-free allocation can use, each as an ``importance`` function, on
all-MiniLM-L6-v2 (every >= 2-D leaf, embeddings included) at 2.5 to 4.25 bits per
weight: mean and minimum cosine of mean-pooled sentence embeddings against fp32 on
the fixed corpus of 512 sentences.

- relative error: each leaf's ``||W - W_hat||^2 / ||W||^2`` counts once;
- absolute error: ``||W - W_hat||^2`` (importance ``||W||^2``);
- error per weight: relative error times the leaf's size;
- square root: relative error times the square root of the size;
- fifth root (the default): relative error times ``size ** 0.2``;
- position: the default, times ``0.5 + i / n`` for the ``i``-th of ``n`` leaves in
  tree order (deeper layers count more).

Then the time of ``quantize`` with a budget against one width (4 bits), warm
(median of interleaved calls in one process) and cold (a fresh process each).

Run ``.venv/bin/python benchmarks/budget.py``; prints tables and writes
benchmarks/results/budget.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from common import minilm_fidelity, publish

import pqjax
from pqjax.tools import minilm

BUDGETS = (2.5, 3.0, 3.5, 4.0, 4.25)


def estimates(params: Any) -> dict[str, Callable[[str, Any], float] | None]:
  """The importance function of each estimate (None: the library's default)."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  paths = [pqjax.path_str(p) for p, x in leaves if x.ndim >= 2]
  depth = {p: i / len(paths) for i, p in enumerate(paths)}
  size = lambda leaf: float(np.prod(leaf.shape))
  return {
    'relative error': lambda path, leaf: 1.0,
    'absolute error': lambda path, leaf: float(np.sum(np.square(leaf, dtype=np.float64))),
    'error per weight (x size)': lambda path, leaf: size(leaf),
    'x size ** 0.5': lambda path, leaf: size(leaf) ** 0.5,
    'x size ** 0.2 (default)': None,
    'x size ** 0.2, x (0.5 + depth)': lambda path, leaf: (
      size(leaf) ** 0.2 * (0.5 + depth[path])
    ),
  }


def widths_text(params_q: Any) -> str:
  """``bits: leaves`` of the tree, e.g. ``2:1 5:36 6:2``."""
  count = collections.Counter(x.bits for x in pqjax.summary(params_q).leaves)
  return ' '.join(f'{b}:{n}' for b, n in sorted(count.items()))


_CHILD = r"""
import json, sys, time
import jax
import pqjax
from pqjax.tools import minilm
params = minilm.load().params
jax.block_until_ready(params)
kw = json.loads(sys.argv[1])
start = time.perf_counter()
jax.block_until_ready(pqjax.quantize(params, **kw))
print(json.dumps({'cold': time.perf_counter() - start}))
"""


def cold(kw: dict[str, Any]) -> float:
  """Seconds of the first ``quantize`` in a fresh process (compilation included)."""
  out = subprocess.run(
    [sys.executable, '-c', _CHILD, json.dumps(kw)],
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  return json.loads(out.stdout.strip().splitlines()[-1])['cold']


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sentences', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--skip-estimates', action='store_true')
  parser.add_argument('--name', default='budget', help='writes results/<name>.md')
  args = parser.parse_args()

  model = minilm.load()
  params = model.params
  lines = [
    '# Bit budgets on MiniLM (all-MiniLM-L6-v2)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__}.',
    '',
  ]
  if not args.skip_estimates:
    fidelity = minilm_fidelity(model, args.sentences)
    rows = []
    for name, importance in estimates(params).items():
      for budget in BUDGETS:
        params_q, _ = pqjax.quantize(
          params, bits_per_weight=budget, importance=importance
        )
        cos = fidelity.cosines(params_q)
        rows.append((name, budget, float(cos.mean()), float(cos.min()), params_q))
        print(
          f'| {name} | {budget} | {pqjax.summary(params_q).bits_per_weight:.3f} |'
          f' {cos.mean():.4f} | {cos.min():.4f} | {widths_text(params_q)} |',
          flush=True,
        )
    lines += [
      '## Which estimate',
      '',
      f'Mean (min) cosine of mean-pooled embeddings against fp32, {args.sentences}'
      ' sentences of the fixed corpus; every >= 2-D leaf quantized per channel with'
      ' the defaults; "widths": bits: leaves.',
      '',
      '| estimate | ' + ' | '.join(f'{b} bits/weight' for b in BUDGETS) + ' | mean |',
      '|---|' + '---|' * (len(BUDGETS) + 1),
    ]
    for name in estimates(params):
      mine = [r for r in rows if r[0] == name]
      cells = [f'{r[2]:.4f} ({r[3]:.4f})' for r in mine]
      lines.append(
        f'| {name} | ' + ' | '.join(cells) + f' | {np.mean([r[2] for r in mine]):.4f} |'
      )
    lines += [
      '',
      '| estimate | budget | stored bits/weight | widths (bits: leaves) |',
      '|---|---|---|---|',
    ]
    lines += [
      f'| {r[0]} | {r[1]} | {pqjax.summary(r[4]).bits_per_weight:.4f} |'
      f' {widths_text(r[4])} |'
      for r in rows
    ]
    lines.append('')

  cases: list[dict[str, Any]] = [{'bits': 4}] + [{'bits_per_weight': b} for b in BUDGETS]
  for kw in cases:
    jax.block_until_ready(pqjax.quantize(params, **kw))
  times: dict[str, list[float]] = {json.dumps(kw): [] for kw in cases}
  for _ in range(args.repeats):
    for kw in cases:
      start = time.perf_counter()
      jax.block_until_ready(pqjax.quantize(params, **kw))
      times[json.dumps(kw)].append(time.perf_counter() - start)
  base = float(np.median(times[json.dumps(cases[0])]))
  colds = {json.dumps(kw): cold(kw) for kw in cases}
  cold_base = colds[json.dumps(cases[0])]
  lines += [
    '## Time of quantize',
    '',
    f'Warm: median of {args.repeats} calls, the settings interleaved in one process'
    ' (after a first call each). Cold: the first call in a fresh process,'
    ' compilation included.',
    '',
    '| setting | warm s | warm / one width | cold s | cold / one width |',
    '|---|---|---|---|---|',
  ]
  for kw in cases:
    key = json.dumps(kw)
    warm = float(np.median(times[key]))
    name = ', '.join(f'{k}={v}' for k, v in kw.items())
    lines.append(
      f'| {name} | {warm:.3f} | {warm / base:.2f}x | {colds[key]:.2f} |'
      f' {colds[key] / cold_base:.2f}x |'
    )
  publish(args.name, lines)


if __name__ == '__main__':
  main()
