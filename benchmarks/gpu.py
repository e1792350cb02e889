"""Products with packed 4- and 8-bit weights on a GPU: the Pallas kernel against XLA.

Run on an H100 or H200 (at most ``--budget`` = 320 seconds, plus start-up):

    PYTHONPATH=. python3 benchmarks/gpu.py

1. Runs the kernel's tests compiled (``PQJAX_PALLAS_INTERPRET=0``), not interpreted.
2. Times ``x @ W`` for bfloat16 ``x`` of 1, 8, 64 and 512 rows and weights 4096x4096,
   4096x11008, 11008x4096 and 8192x8192: XLA's bfloat16 dot; the kernel at 4 and
   8 bits (per-channel scales, full grid); XLA decoding the codes then the dot in one
   jitted program (``QArray.dequantize``, what ``pqjax.wrap`` runs); and a dot on
   weights decoded once beforehand (bfloat16 in memory again). The kernel's
   bandwidth is the bytes of codes it reads over its time, against the device's.
3. Tries other tilings of the kernel on 4096x4096 at 4 bits, to check the defaults.

Times are medians over repeated runs of a jitted program that makes ``--reps``
independent calls (each input passes through an optimization barrier with the call's
index, so XLA can neither merge nor hoist them), divided by ``--reps``: one dispatch
covers many kernels, as in a model's step. Writes ``benchmarks/results/gpu.md``.

``--smoke`` runs everything on tiny shapes with the kernel interpreted, on any
backend, to check the script itself (prints the report, writes nothing).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import publish
from jax import lax

import pqjax
from pqjax._src.runtime import pallas_matmul as pm

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
ROWS = [1, 8, 64, 512]
SMOKE_SHAPES = [(256, 128), (200, 72)]
SMOKE_ROWS = [1, 8]
# Peak HBM bandwidth (bytes/s) by device name.
PEAK_BANDWIDTH = [
  ('H200', 4.8e12),
  ('H100 PCIe', 2.0e12),
  ('H100', 3.35e12),
  ('H800', 3.35e12),
  ('A100', 2.0e12),
]


def peak_bandwidth(kind: str) -> float | None:
  for name, bw in PEAK_BANDWIDTH:
    if name.lower() in kind.lower():
      return bw
  return None


class Clock:
  """The run's time budget."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds

  def left(self) -> float:
    return self.end - time.monotonic()


def run_tests(smoke: bool, timeout: float) -> list[str]:
  """The kernel's tests, compiled on GPU (interpreted in smoke mode)."""
  cmd = [
    sys.executable,
    '-m',
    'pytest',
    'tests/runtime/test_pallas_matmul.py',
    '-q',
    '-p',
    'no:cacheprovider',
  ]
  env = dict(
    os.environ,
    PQJAX_PALLAS_INTERPRET='1' if smoke else '0',
    XLA_PYTHON_CLIENT_PREALLOCATE='false',
  )
  if smoke:
    cmd += ['-k', 'test_split_k or (test_formats and channel)']
  start = time.monotonic()
  try:
    r = subprocess.run(
      cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1)
    )
    out, status = r.stdout + r.stderr, f'exit {r.returncode}'
  except subprocess.TimeoutExpired as e:
    out = (e.stdout or b'').decode() if isinstance(e.stdout, bytes) else (e.stdout or '')
    status = f'stopped after {timeout:.0f} s'
  tail = [line for line in out.strip().splitlines() if line.strip()][-15:]
  mode = 'interpreted' if smoke else 'compiled (PQJAX_PALLAS_INTERPRET=0)'
  took = time.monotonic() - start
  return [
    f'## Kernel tests, {mode}',
    '',
    f'`pytest tests/runtime/test_pallas_matmul.py`: {status}, {took:.0f} s. Last lines:',
    '',
    '```',
    *tail,
    '```',
    '',
  ]


def timed(fn: Callable[..., jax.Array], args: tuple, reps: int, runs: int) -> float:
  """Median seconds of one call of ``fn(*args)``."""

  @jax.jit
  def many(*args):
    outs = []
    for i in range(reps):
      a = lax.optimization_barrier((args, jnp.int32(i)))[0]
      outs.append(fn(*a))
    return outs

  jax.block_until_ready(many(*args))
  jax.block_until_ready(many(*args))
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(many(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) / reps


def make_weights(k: int, n: int, bits: int, key: jax.Array) -> pqjax.QArray:
  """Random codes over the whole range, per-channel scales, a full-grid table."""
  kc, ks = jax.random.split(key)
  rows = pm.packed_rows(k, bits)
  codes = jax.random.randint(kc, (rows, n), 0, 256, jnp.int32)
  codes = codes.astype(jnp.uint8 if bits <= 4 else jnp.int8)
  scale = jax.random.uniform(ks, (1, n), jnp.float32, 0.01, 0.02)
  d = 2 ** (bits - 1)
  q = np.arange(-d, d, dtype=np.float64)
  table = np.sign(q) * (np.abs(q) / np.where(q < 0, d, d - 1)) ** (1 / 0.7)
  return pqjax.QArray(
    codes=codes,
    scale=scale,
    alpha=jnp.float32(0.7),
    table=jnp.asarray(table, jnp.float32),
    bits=bits,
    shape=(k, n),
    dtype=np.dtype(jnp.bfloat16),
  )


def kernel_fn(
  q: pqjax.QArray, interpret: bool, config: pm.KernelConfig
) -> Callable[..., jax.Array]:
  k = q.shape[0]
  return lambda x, codes, scale, table: pm.packed_matmul(
    x, codes, scale, table, bits=q.bits, k=k, config=config, interpret=interpret
  )


def xla_fn(q: pqjax.QArray) -> Callable[..., jax.Array]:
  meta = dict(bits=q.bits, shape=q.shape, dtype=q.dtype)
  return lambda x, codes, scale, alpha, table: (
    x
    @ pqjax.QArray(
      codes=codes, scale=scale, alpha=alpha, table=table, **meta
    ).dequantize()
  )


def fmt_us(t: float | None) -> str:
  return '-' if t is None else f'{t * 1e6:.1f}'


def attempt(
  errors: list[str],
  label: str,
  fn: Callable[..., jax.Array],
  args: tuple,
  reps: int,
  runs: int,
) -> float | None:
  """:func:`timed`, or None with the error noted."""
  try:
    return timed(fn, args, reps, runs)
  except Exception as e:  # a failure to compile is a result here
    errors.append(f'{label}: {type(e).__name__}: {str(e).splitlines()[0][:300]}')
    traceback.print_exc(limit=2)
    return None


def measure(
  shapes: list[tuple[int, int]],
  rows: list[int],
  clock: Clock,
  reps: int,
  runs: int,
  interpret: bool,
  peak: float | None,
) -> list[str]:
  lines = [
    '## Product times (microseconds a call)',
    '',
    'bf16: XLA `x @ W` with bfloat16 weights. k4 / k8: the Pallas kernel at 4 /'
    ' 8 bits (speedup over bf16; bandwidth on the codes, % of peak). xla4 / xla8:'
    ' XLA decoding the codes then the dot, one jitted program. once: the dot on'
    ' weights decoded beforehand (same program as bf16, other values).',
    '',
    '| K x N | rows | bf16 | k4 | k4 tiling | k8 | xla4 | xla8 | once |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  errors: list[str] = []
  key = jax.random.key(0)
  for k, n in shapes:
    if clock.left() < 20:
      lines.append(f'| {k} x {n} | | not measured: out of time | | | | | | |')
      continue
    w = jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02
    qs = {b: make_weights(k, n, b, jax.random.fold_in(key, b)) for b in (4, 8)}
    once = qs[4].dequantize()
    for m in rows:
      if clock.left() < 10:
        lines.append(f'| {k} x {n} | {m} | not measured: out of time | | | | | | |')
        continue
      x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
      name = f'{k}x{n} m={m}'
      t = {'bf16': attempt(errors, f'bf16 {name}', jnp.matmul, (x, w), reps, runs)}
      for b, q in qs.items():
        t[f'k{b}'] = attempt(
          errors,
          f'kernel {b}b {name}',
          kernel_fn(q, interpret, pm.KernelConfig()),
          (x, q.codes, q.scale, q.table),
          reps,
          runs,
        )
        t[f'xla{b}'] = attempt(
          errors,
          f'xla {b}b {name}',
          xla_fn(q),
          (x, q.codes, q.scale, q.alpha, q.table),
          reps,
          runs,
        )
      t['once'] = attempt(errors, f'once {name}', jnp.matmul, (x, once), reps, runs)
      cells = {}
      for b in (4, 8):
        v = t[f'k{b}']
        cell = fmt_us(v)
        if v is not None and t['bf16'] is not None:
          cell += f' ({t["bf16"] / v:.2f}x'
          if peak:
            cell += f', {qs[b].codes.nbytes / v / peak:.0%}'
          cell += ')'
        cells[b] = cell
      tiling = pm.choose_tiling(m, k, n, 4)
      desc = (
        f'{tiling.method} {tiling.block_m}x{tiling.block_n}x{tiling.block_k}'
        f' s{tiling.split_k}'
      )
      lines.append(
        f'| {k} x {n} | {m} | {fmt_us(t["bf16"])} | {cells[4]} | {desc} |'
        f' {cells[8]} | {fmt_us(t["xla4"])} | {fmt_us(t["xla8"])} |'
        f' {fmt_us(t["once"])} |'
      )
      print(lines[-1], flush=True)
  lines.append('')
  if errors:
    lines += ['Failures:', '', *[f'- {e}' for e in errors], '']
  return lines


def targets(table: list[str]) -> list[str]:
  """The goals, read back from the 4096 x 4096 rows of the table."""
  out = [
    'Goals at 4 bits, 4096 x 4096: 1 row >= 3x bf16 and >= 70% of the bandwidth on'
    ' the codes; 64 rows >= 1.5x; 512 rows within 1.2x of bf16. Measured:',
    '',
  ]
  for line in table:
    cells = [c.strip() for c in line.split('|')[1:-1]]
    if len(cells) == 9 and cells[0] == '4096 x 4096' and cells[1] in ('1', '64', '512'):
      out.append(f'- {cells[1]} rows: k4 {cells[3]} us against bf16 {cells[2]} us')
  return out + ['']


TUNING = {
  1: [
    dict(),
    dict(block_n=32),
    dict(block_n=128),
    dict(block_k=256),
    dict(block_k=64),
    dict(split_k=1),
    dict(split_k=4),
    dict(split_k=16),
    dict(num_warps=8),
    dict(prefetch=False),
    dict(lookup='select'),
    dict(method='dot'),
    dict(block_n=32, block_k=1024, split_k=1, num_warps=8),
  ],
  8: [
    dict(),
    dict(block_n=64),
    dict(block_n=64, split_k=8),
    dict(block_k=256),
    dict(split_k=1),
    dict(split_k=8),
    dict(num_stages=4),
    dict(method='gemv'),
    dict(lookup='select'),
  ],
  64: [
    dict(),
    dict(block_n=64),
    dict(block_n=128),
    dict(block_m=32),
    dict(block_k=64),
    dict(split_k=2),
    dict(split_k=4),
    dict(num_warps=8),
  ],
  512: [
    dict(),
    dict(block_k=128),
    dict(block_m=64),
    dict(block_n=64),
    dict(block_m=256, num_warps=8),
    dict(block_n=256, num_warps=8),
    dict(num_stages=4),
    dict(num_stages=2),
    dict(lookup='select'),
  ],
}


def tune(
  k: int, n: int, clock: Clock, reps: int, runs: int, interpret: bool, smoke: bool
) -> list[str]:
  lines = [
    f'## Tilings tried, {k} x {n}, 4 bits, bfloat16 (microseconds a call)',
    '',
    'Each line changes the default tiling (first line) by the options shown.',
    '',
    '| rows | options | tiling | us |',
    '|---|---|---|---|',
  ]
  q = make_weights(k, n, 4, jax.random.key(1))
  for m, variants in TUNING.items():
    if smoke:
      if m > 8:
        continue
      variants = variants[:3]
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    for options in variants:
      if clock.left() < 5:
        lines.append(f'| {m} | {options} | not measured: out of time | |')
        continue
      config = pm.KernelConfig(**options)
      try:
        t_ = pm.choose_tiling(m, k, n, 4, config=config)
        desc = (
          f'{t_.method} {t_.block_m}x{t_.block_n}x{t_.block_k} s{t_.split_k}'
          f' w{t_.num_warps} st{t_.num_stages}'
        )
        v = fmt_us(
          timed(
            kernel_fn(q, interpret, config), (x, q.codes, q.scale, q.table), reps, runs
          )
        )
      except Exception as e:
        desc, v = 'error', f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'
      lines.append(f'| {m} | {options or "default"} | {desc} | {v} |')
      print(lines[-1], flush=True)
  return lines + ['']


def gpt2_step(clock: Clock, smoke: bool) -> list[str]:
  """One batch-1 generation step of the GPT-2-shaped decoder (benchmarks/gpt2.py).

  bfloat16: the parameters cast to bfloat16. pqjax: 4 bits per channel, every
  >= 2-D leaf, through ``pqjax.wrap`` with the kernel forced and with XLA's paths.
  """
  import gpt2

  config = gpt2.Config(vocab=512, positions=32, d=64, heads=4, layers=2, mlp=128)
  config = config if smoke else gpt2.SMALL
  model = gpt2.GPT(config)
  params = gpt2.init(model)
  cast = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), t)
  params_q, _ = pqjax.quantize(params, 4)
  apply = lambda p, tokens, cache, pos: model.apply({'params': p}, tokens, cache, pos)
  tokens = jnp.ones((1, 1), jnp.int32)
  pos = jnp.int32(min(128, config.positions - 1))
  cache = cast(gpt2.empty_cache(config, 1, False))
  variants = {
    'bf16': (apply, cast(params)),
    'pqjax 4-bit, kernel': (pqjax.wrap(apply, products='kernel'), params_q),
    'pqjax 4-bit, XLA (auto)': (pqjax.wrap(apply, products='auto'), params_q),
    'pqjax 4-bit, XLA decode': (pqjax.wrap(apply, products='decode'), params_q),
  }
  rows = ['| variant | step ms | vs bf16 |', '|---|---|---|']
  base = None
  for name, (fn, p) in variants.items():
    if clock.left() < 20:
      rows.append(f'| {name} | skipped: out of time | |')
      continue
    step = jax.jit(fn)
    try:
      jax.block_until_ready(step(p, tokens, cache, pos))
      times = []
      for _ in range(3 if smoke else 30):
        start = time.perf_counter()
        jax.block_until_ready(step(p, tokens, cache, pos))
        times.append(time.perf_counter() - start)
      t = statistics.median(times)
    except Exception as e:
      rows.append(f'| {name} | error: {type(e).__name__}: {str(e)[:100]} | |')
      continue
    base = base or t
    rows.append(f'| {name} | {1e3 * t:.3f} | {t / base:.2f}x |')
    print(rows[-1], flush=True)
  return [
    '## GPT-2-shaped decoder step (batch 1, one token, 256-position cache)',
    '',
    *rows,
    '',
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--smoke',
    action='store_true',
    help='tiny shapes, kernel interpreted, any backend; writes nothing',
  )
  parser.add_argument(
    '--budget', type=float, default=320, help='seconds for the whole run (default 320)'
  )
  parser.add_argument(
    '--test-budget',
    type=float,
    default=100,
    help='seconds for the compiled tests (default 100)',
  )
  parser.add_argument('--reps', type=int, default=10, help='calls a timed program makes')
  parser.add_argument('--runs', type=int, default=15, help='timed runs, median taken')
  parser.add_argument('--skip-tests', action='store_true')
  args = parser.parse_args()
  clock = Clock(args.budget)
  # The tests run first, in their own process, before this one starts JAX on the
  # device (and takes most of its memory).
  tests = []
  if not args.skip_tests:
    tests = run_tests(args.smoke, min(args.test_budget, clock.left() - 60))
    print('\n'.join(tests), flush=True)
  device = jax.devices()[0]
  kind = device.device_kind
  if not args.smoke and device.platform != 'gpu':
    sys.exit(f'needs a GPU (found {kind}); --smoke runs on any backend')
  peak = peak_bandwidth(kind)
  interpret = args.smoke
  reps, runs = (2, 2) if args.smoke else (args.reps, args.runs)
  bandwidth = 'unknown' if peak is None else f'{peak / 1e12:.2f} TB/s'
  smoke = ' SMOKE RUN: tiny shapes, kernel interpreted; times mean nothing.'
  lines = [
    f'# Packed-code products on {kind}',
    '',
    f'Device: {kind} ({device.platform}), {jax.device_count()} device(s); peak'
    f' bandwidth {bandwidth}; jax {jax.__version__}; Python'
    f' {platform.python_version()}.' + (smoke if args.smoke else ''),
    '',
    *tests,
  ]
  shapes, rows = (SMOKE_SHAPES, SMOKE_ROWS) if args.smoke else (SHAPES, ROWS)
  table = measure(shapes, rows, clock, reps, runs, interpret, peak)
  lines += table
  if not args.smoke:
    lines += targets(table)
  lines += gpt2_step(clock, args.smoke)
  k, n = shapes[0]
  lines += tune(k, n, clock, reps, runs, interpret, args.smoke)
  lines.append(
    f'Run took {args.budget - clock.left():.0f} s of a {args.budget:.0f} s budget.'
  )
  if args.smoke:
    print('\n'.join(lines))
  else:
    publish('gpu', lines)


if __name__ == '__main__':
  main()
