"""Another bit budget on the same tree: its time and what it compiles, on MiniLM.

A user tries ``pqjax.quantize(params, bits_per_weight=B)`` at one budget, then at
others. The first budget compiles the estimate, the search and the encodings; a
later budget on the same tree should compile nothing and take about the time of a
warm call at one width. This measures, in one process on all-MiniLM-L6-v2 (every
>= 2-D leaf, embeddings included):

- one width, warm: ``quantize(params, bits=4)`` after a first call (median of 3);
- the first budget, then later budgets one after another, each a first call at
  its budget;
- each later budget again (warm, for reference);

with the programs each call compiles (XLA compilations, from ``jax.monitoring``)
and their compile time. Wall and CPU seconds both: the CPU time of the process
counts its compiler and XLA threads and is less sensitive to other load.

Run ``.venv/bin/python benchmarks/budget_compiles.py``; prints a table and writes
benchmarks/results/budget_compiles.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from common import publish

import pqjax
from pqjax.tools import minilm

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class Call(NamedTuple):
  """One measured call: wall and CPU seconds, compilations and their seconds."""

  wall: float
  cpu: float
  compiles: int
  compile_s: float


class _Compiles:
  """Counts XLA compilations (and their seconds) reported by ``jax.monitoring``."""

  def __init__(self) -> None:
    self.events: collections.Counter[str] = collections.Counter()
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event == COMPILE_EVENT:
      self.events[event] += 1
      self.seconds += duration_secs

  def measure(self, fn: Callable[[], Any]) -> Call:
    """Runs ``fn`` (its result waited for) and what it took."""
    before, seconds = self.events[COMPILE_EVENT], self.seconds
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return Call(
      time.perf_counter() - wall,
      time.process_time() - cpu,
      self.events[COMPILE_EVENT] - before,
      self.seconds - seconds,
    )


def widths_text(params_q: Any) -> str:
  """``bits: leaves`` of a quantized tree, e.g. ``2:1 5:36 6:2``."""
  count = collections.Counter(x.bits for x in pqjax.summary(params_q).leaves)
  return ' '.join(f'{b}:{n}' for b, n in sorted(count.items()))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--first', type=float, default=3.0, help='the first budget')
  parser.add_argument(
    '--later',
    type=float,
    nargs='+',
    default=[3.5, 2.5, 4.25],
    help='budgets tried after it, in order',
  )
  parser.add_argument('--name', default='budget_compiles', help='results file name')
  args = parser.parse_args()

  load = os.getloadavg()[0]
  params = jax.block_until_ready(minilm.load().params)
  compiles = _Compiles()
  one = lambda: pqjax.quantize(params, bits=4)
  cold = compiles.measure(one)
  warm_calls = [compiles.measure(one) for _ in range(3)]
  warm = Call(
    statistics.median(c.wall for c in warm_calls),
    statistics.median(c.cpu for c in warm_calls),
    max(c.compiles for c in warm_calls),
    max(c.compile_s for c in warm_calls),
  )
  rows: list[tuple[str, str, Call]] = [
    ('bits=4, first call', '4:40', cold),
    ('bits=4, warm (median of 3)', '4:40', warm),
  ]
  quantized: dict[float, Any] = {}

  def budget(bpw: float) -> Callable[[], Any]:
    def call() -> Any:
      quantized[bpw] = pqjax.quantize(params, bits_per_weight=bpw)
      return quantized[bpw]

    return call

  first = compiles.measure(budget(args.first))
  rows.append(
    (
      f'bits_per_weight={args.first}, first budget',
      widths_text(quantized[args.first][0]),
      first,
    )
  )
  for bpw in args.later:
    call = compiles.measure(budget(bpw))
    rows.append(
      (f'bits_per_weight={bpw}, later budget', widths_text(quantized[bpw][0]), call)
    )
  for bpw in args.later:
    call = compiles.measure(budget(bpw))
    rows.append((f'bits_per_weight={bpw}, again', widths_text(quantized[bpw][0]), call))

  lines = [
    '# Another bit budget on the same tree (all-MiniLM-L6-v2)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__}; load average'
    f' {load:.2f} before, {os.getloadavg()[0]:.2f} after.',
    '',
    'Inputs: the Flax params of all-MiniLM-L6-v2 (every >= 2-D leaf quantized, 40'
    ' leaves, 22.7M weights), default options. One process, calls in the order'
    ' below; "x warm" is the wall time over one width\'s warm wall time.',
    '',
    '| call | widths (bits:leaves) | wall s | x warm | CPU s | compiles | compile s |',
    '|---|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {name} | {widths} | {c.wall:.2f} | {c.wall / warm.wall:.2f}x | {c.cpu:.2f} |'
    f' {c.compiles:g} | {c.compile_s:.2f} |'
    for name, widths, c in rows
  ]
  publish(args.name, lines)


if __name__ == '__main__':
  main()
