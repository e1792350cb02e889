"""The native CPU kernel against XLA's products, at every level this CPU runs.

For each weight shape, rows of x and code width: XLA's float32 dot on the float
weight, its bfloat16 dot (x and W in bfloat16), the XLA fused product (codes decoded
inside an XLA program, ``small_product.packed_product``) and the native kernel
(``pqjax_matmul`` through ``jax.ffi``) at each instruction-set level on 1 and 2
threads. Each variant rotates over distinct copies of its own weight, at least
ROTATE_BYTES of them (up to 64 copies), so that no weight stays in the 260 MB last
level cache, as in a model larger than it. GB/s: the weight's stored bytes (codes and
scales, or the float weight) per second; the read bandwidth is measured in the same
run by reading float32 arrays of as many bytes (NumPy's max on one thread, XLA's sum
on its threads: the best). Run:

    python benchmarks/kernels.py [--quick]

Prints a table and writes benchmarks/results/kernels.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from common import publish
from small_product import random_qarray

import pqjax
from pqjax._src.runtime import small_product
from pqjax._src.runtime.native import product as native

SHAPES = ((768, 768), (768, 3072), (3072, 768), (4096, 4096), (4096, 11008))
ROWS = (1, 4, 16)
BITS = (2, 3, 4, 8)
THREADS = (1, 2)
ROTATE_BYTES = 400 << 20
MAX_COPIES = 64


def read_bandwidth(nbytes: int = ROTATE_BYTES, rounds: int = 5) -> float:
  """GB/s of reading float32 arrays of ``nbytes`` in all: the best of NumPy's max (one
  thread) and XLA's sum (its thread pool)."""
  arrays = [np.ones(nbytes // 4 // 8, np.float32) for _ in range(8)]
  on_device = [jnp.asarray(a) for a in arrays]
  total = jax.jit(jnp.sum)
  readers = [np.max, lambda a: total(a).block_until_ready()]
  best = 0.0
  for read, data in zip(readers, (arrays, on_device)):
    read(data[0])
    for _ in range(rounds):
      start = time.perf_counter()
      for a in data:
        read(a)
      best = max(best, nbytes / (time.perf_counter() - start) / 1e9)
  return best


def copies(nbytes: int) -> int:
  return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(nbytes, 1))))


def timed(variants: dict[str, tuple[Callable, list]], rounds: int) -> dict[str, float]:
  """Median ms per call; each round calls every variant once per weight copy."""
  for f, args in variants.values():
    jax.block_until_ready([f(*a) for a in args[:2]])
  times: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (f, args) in variants.items():
      start = time.perf_counter()
      jax.block_until_ready([f(*a) for a in args])
      times[name].append((time.perf_counter() - start) / len(args) * 1e3)
  return {k: statistics.median(v) for k, v in times.items()}


def stored_bytes(q: pqjax.QArray) -> int:
  return int(
    q.codes.size * q.codes.dtype.itemsize + q.scale.size * q.scale.dtype.itemsize
  )


def measure(k: int, n: int, rows: int, bits_list, levels, rounds: int) -> list[dict]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
  variants: dict[str, tuple[Callable, list]] = {}
  sizes: dict[str, int] = {}
  for name, dtype in (('fp32', jnp.float32), ('bf16', jnp.bfloat16)):
    size = k * n * np.dtype(dtype).itemsize
    ws = [
      (x.astype(dtype), jnp.asarray(rng.standard_normal((k, n)) * 0.02, dtype))
      for _ in range(copies(size))
    ]
    variants[name] = (jax.jit(lambda x, w: x @ w), ws)
    sizes[name] = size
  for bits in bits_list:
    qs = [random_qarray(rng, k, n, bits, 'full', None) for _ in range(copies(k * n // 2))]
    size = stored_bytes(qs[0])
    qs = qs[: copies(size)]
    args = [(x, q) for q in qs]
    fused = lambda x, q, bits=bits: small_product.packed_product(
      x, q.codes, q.scale, q.table, bits=bits, k=k
    )
    variants[f'fused {bits}'] = (jax.jit(fused), args)
    sizes[f'fused {bits}'] = size
    for level in levels:
      for threads in THREADS:
        fn = lambda x, q, bits=bits, level=level, threads=threads: native.packed_product(
          x, q.codes, q.scale, None, q.table, bits=bits, k=k, level=level, threads=threads
        )
        name = f'native {bits} {level} {threads}'
        variants[name] = (jax.jit(fn), args)
        sizes[name] = size
  t = timed(variants, rounds)
  return [
    {
      'shape': f'{k}x{n}',
      'rows': rows,
      'variant': v,
      'ms': ms,
      'gbs': sizes[v] / ms / 1e6,
    }
    for v, ms in t.items()
  ]


def table(results: list[dict], levels, bandwidth: float) -> list[str]:
  head = (
    '| weight K x N | rows | bits | fp32 dot ms | bf16 dot ms | XLA fused ms | '
    + ' | '.join(f'native {lv} {t}t ms' for lv in levels for t in THREADS)
    + ' | best native / fp32 | best native GB/s (% of read) |'
  )
  lines = [head, '|' + '---|' * (7 + len(levels) * len(THREADS))]
  groups: dict[tuple, dict[str, dict]] = {}
  for r in results:
    groups.setdefault((r['shape'], r['rows']), {})[r['variant']] = r
  for (shape, rows), g in groups.items():
    bits_list = sorted({int(v.split()[1]) for v in g if v.startswith('fused')})
    for bits in bits_list:
      nat = {(lv, t): g[f'native {bits} {lv} {t}'] for lv in levels for t in THREADS}
      best = min(nat.values(), key=lambda r: r['ms'])
      cells = ' | '.join(f'{nat[lv, t]["ms"]:.3f}' for lv in levels for t in THREADS)
      lines.append(
        f'| {shape} | {rows} | {bits} | {g["fp32"]["ms"]:.3f} | {g["bf16"]["ms"]:.3f} |'
        f' {g[f"fused {bits}"]["ms"]:.3f} | {cells} |'
        f' **{best["ms"] / g["fp32"]["ms"]:.2f}x** ({g["fp32"]["ms"] / best["ms"]:.1f}x'
        f' faster) | {best["gbs"]:.1f} ({100 * best["gbs"] / bandwidth:.0f}%) |'
      )
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='4096x4096, 4 bits, one row')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--name', default='kernels')
  args = parser.parse_args()
  status = pqjax.native_status()
  if not status.loaded:
    raise SystemExit(f'the native kernels are not available: {status.reason}')
  levels = tuple(reversed(status.levels))
  load = os.getloadavg()[0]
  bandwidth = read_bandwidth()
  cases = (
    [(4096, 4096, 1, (4,))]
    if args.quick
    else [(k, n, rows, BITS) for k, n in SHAPES for rows in ROWS]
  )
  results = []
  for k, n, rows, bits_list in cases:
    results += measure(k, n, rows, bits_list, levels, args.rounds)
    print(f'{k}x{n} {rows} rows done', flush=True)
  bandwidth = max(bandwidth, read_bandwidth())
  publish(
    args.name,
    [
      '# Native CPU products against XLA',
      '',
      f'Machine: {platform.platform()}, {os.cpu_count()} CPUs shared with other work'
      f' (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end),'
      f' Python {platform.python_version()}, jax {jax.__version__}, CPU backend;'
      f' native levels {", ".join(status.levels)}. Read bandwidth ({ROTATE_BYTES >> 20}'
      f' MB of float32, best of two measurements): {bandwidth:.1f} GB/s.',
      '',
      __doc__.split('\n\n')[1].replace('\n', ' '),
      'Times: median ms per product over the rounds, variants interleaved. Random'
      ' codes, one float32 scale per column, full grid. `python benchmarks/kernels.py`.',
      '',
      *table(results, levels, bandwidth),
    ],
  )


if __name__ == '__main__':
  main()
