"""Products of a few rows with a packed weight: the packed product against the others.

For each weight shape, rows of x and code width: XLA's float32 dot on the float weight,
its bfloat16 dot (x and W in bfloat16), decode-then-dot (``QArray.dequantize`` then
the float32 dot, what ``pqjax.wrap`` runs) and ``packed_product`` (decoding inside the
product). Each variant is a separate jitted program over one weight; the calls rotate
over enough distinct weights that the float32 weights do not stay in cache (at least
128 MB of them), as in a model. Times: median and best of the timed rounds, the
variants interleaved, per product; temp: ``memory_analysis().temp_size_in_bytes`` of
the compiled program. Codes are random (the time does not depend on their values).
Run:

    python benchmarks/small_product.py [--quick]

Prints a table and writes benchmarks/results/small_product.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from common import publish

import pqjax
from pqjax._src.core.grid import decode_table
from pqjax._src.runtime.small_product import packed_product, packed_rows

SHAPES = ((4096, 4096), (768, 3072), (3072, 768), (768, 50257))
ROWS = (1, 4, 16)
BITS = (2, 3, 4, 8)
ROTATE_BYTES = 128 << 20
NOTES = (
  "y = x @ W for x of `rows` rows and a K x N weight. fp32 / bf16 dot: XLA's dot on"
  ' the float weight (bf16: x and W in bfloat16). decode-then-dot:'
  ' `QArray.dequantize` then the fp32 dot. packed product:'
  ' `pqjax._src.runtime.small_product.packed_product`, which decodes inside the'
  ' product and gives the decode-then-dot result up to float32 summation order.'
  ' Times: median (best) ms per product over the rounds, the variants interleaved,'
  ' rotating over distinct weights (at least 128 MB of float32 weights) so that none'
  " stays in cache. temp: the compiled program's"
  ' `memory_analysis().temp_size_in_bytes`. packed / fp32: ratio of the medians. The'
  " machine's 2 cores are shared with other work: the packed product, bound by"
  ' arithmetic, loses more to it than the fp32 dot, bound by memory.'
)


def random_qarray(
  rng: np.random.Generator, k: int, n: int, bits: int, grid: str, group: int | None
) -> pqjax.QArray:
  levels = decode_table(0.6, bits, grid)
  rows = packed_rows(k, bits)
  if bits <= 4:
    codes = rng.integers(0, 256, (rows, n), dtype=np.uint8)
  else:
    codes = (rng.integers(0, len(levels), (rows, n)) - len(levels) // 2).astype(np.int8)
  nk = 1 if group is None else -(-k // group)
  scale = rng.uniform(0.01, 0.1, (nk, n)).astype(np.float16 if group else np.float32)
  return pqjax.QArray(
    codes=jnp.asarray(codes),
    scale=jnp.asarray(scale),
    alpha=jnp.float32(0.6),
    table=jnp.asarray(levels),
    bits=bits,
    shape=(k, n),
    dtype=np.dtype(np.float32),
  )


def timed(
  variants: dict[str, tuple[Callable, list]], rounds: int
) -> dict[str, tuple[float, float]]:
  """(median, best) ms per call; each round calls every variant once per argument."""
  for f, args in variants.values():
    for a in args[:2]:
      jax.block_until_ready(f(*a))
  times = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (f, args) in variants.items():
      start = time.perf_counter()
      out = [f(*a) for a in args]
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - start) / len(args) * 1e3)
  return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def compile_(f: Callable, *args) -> tuple[Callable, float]:
  compiled = jax.jit(f).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes / 1e6


def measure(
  k: int,
  n: int,
  rows: int,
  bits_list: tuple[int, ...],
  grid: str,
  group: int | None,
  rounds: int,
  baselines: bool,
) -> list[str]:
  rng = np.random.default_rng(0)
  copies = max(1, -(-ROTATE_BYTES // (k * n * 4)))
  x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
  variants, temps = {}, {}
  if baselines:
    ws = [
      jnp.asarray(rng.standard_normal((k, n)), jnp.float32) * 0.02 for _ in range(copies)
    ]
    for name, dtype in (('fp32 dot', jnp.float32), ('bf16 dot', jnp.bfloat16)):
      f, temps[name] = compile_(lambda x, w: x @ w, x.astype(dtype), ws[0].astype(dtype))
      variants[name] = (f, [(x.astype(dtype), w.astype(dtype)) for w in ws])
    del ws
  for bits in bits_list:
    qs = [random_qarray(rng, k, n, bits, grid, group) for _ in range(copies)]
    f, temps[f'decode-then-dot {bits}'] = compile_(
      lambda x, q: x @ q.dequantize(), x, qs[0]
    )
    variants[f'decode-then-dot {bits}'] = (f, [(x, q) for q in qs])
    product = functools.partial(packed_product, bits=bits, k=k)
    f, temps[f'packed {bits}'] = compile_(
      lambda x, q, product=product: product(x, q.codes, q.scale, q.table), x, qs[0]
    )
    variants[f'packed {bits}'] = (f, [(x, q) for q in qs])
  t = timed(variants, rounds)
  lines = []
  scales = 'channel' if group is None else f'groups of {group} (fp16)'
  base = ''
  if baselines:
    base = ' | '.join(
      f'{t[v][0]:.2f} ({t[v][1]:.2f}) | {temps[v]:.1f}' for v in ('fp32 dot', 'bf16 dot')
    )
  for bits in bits_list:
    d, p = f'decode-then-dot {bits}', f'packed {bits}'
    ratio = f'{t[p][0] / t["fp32 dot"][0]:.2f}x' if baselines else ''
    lines.append(
      f'| {k}x{n} | {rows} | {bits} | {grid} | {scales} | {base} | '
      f'{t[d][0]:.2f} ({t[d][1]:.2f}) | {temps[d]:.1f} | '
      f'**{t[p][0]:.2f}** ({t[p][1]:.2f}) | {temps[p]:.2f} | {ratio} |'
    )
    print(lines[-1], flush=True)
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='4096x4096 and 768x3072 only')
  parser.add_argument('--rounds', type=int, default=9)
  args = parser.parse_args()
  shapes = SHAPES[:2] if args.quick else SHAPES
  load = os.getloadavg()[0]
  header = (
    '| weight K x N | rows | bits | grid | scales | fp32 dot ms | fp32 temp MB |'
    ' bf16 dot ms | bf16 temp MB | decode-then-dot ms | temp MB |'
    ' packed product ms | temp MB | packed / fp32 |'
  )
  lines = [header, '|' + '---|' * 14]
  print(header, flush=True)
  for k, n in shapes:
    for rows in ROWS:
      lines += measure(k, n, rows, BITS, 'full', None, args.rounds, True)
    lines += measure(k, n, 1, (4,), 'full', 64, args.rounds, True)
    lines += measure(k, n, 16, (4,), 'full', 64, args.rounds, True)
  for rows in (1, 16):
    lines += measure(4096, 4096, rows, BITS, 'symmetric', None, args.rounds, True)
  for rows in (32, 64):
    for k, n in shapes[:2]:
      lines += measure(k, n, rows, (4,), 'full', None, args.rounds, True)
  publish(
    'small_product',
    [
      '# Products of a few rows with a packed weight',
      '',
      f'Machine: {platform.platform()}, {os.cpu_count()} CPUs shared with other work'
      f' (load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end),'
      f' Python {platform.python_version()}, jax {jax.__version__}, CPU backend.',
      '',
      NOTES,
      '',
      *lines,
    ],
  )


if __name__ == '__main__':
  main()
