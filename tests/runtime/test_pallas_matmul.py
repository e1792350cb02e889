"""The packed-code Pallas matmul against a NumPy decoding of the storage format.

The reference unpacks the codes from the format's description (not with pqjax's
packing code), decodes them in float64 and multiplies in float64. On CPU the kernel
runs in Pallas' interpreter; on a GPU it is compiled with Triton unless
``PQJAX_PALLAS_INTERPRET=1``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax._src.runtime import pallas_matmul as pm
from tests import reference

INTERPRET = (
  jax.default_backend() != 'gpu' or os.environ.get('PQJAX_PALLAS_INTERPRET', '0') != '0'
)

# |kernel - reference| <= TOL * (|x| @ |W|) elementwise. float32 (IEEE products, see
# `run`): K float32 roundings of a sum, K * 2 ** -24 = 1.5e-5 for K = 254, whatever
# order a GPU adds in. bfloat16 / float16: the decoded weights and the output each
# rounded once to the activation dtype, 2 * 2 ** -9 / 2 * 2 ** -11. A misplaced code
# or scale row costs about 1 / K = 4e-3 of the bound's scale, far above these.
TOL = {
  np.dtype(np.float32): 2e-5,
  np.dtype(jnp.bfloat16): 1e-2,
  np.dtype(np.float16): 2e-3,
}


# The weight the stored codes stand for, in float64.
decode = functools.partial(reference.decode_stored, dtype=np.float64)


def make(
  bits: int, grid: str, k: int, n: int, scales: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Random codes over the whole index range, a sorted table and positive scales.

  ``scales``: ``channel``, ``tensor`` or ``g<nk>`` (``nk`` groups along K).
  """
  rng = np.random.default_rng(seed)
  size = 2**bits - (grid == 'symmetric')
  table = np.sort(rng.uniform(-1, 1, size)).astype(np.float32)
  index = rng.integers(0, size, (k, n))
  nk, ncol = {'channel': (1, n), 'tensor': (1, 1)}.get(scales, (0, n))
  if not nk:
    nk = int(scales[1:])
  dtype = np.float16 if nk > 1 else np.float32
  scale = rng.uniform(0.5, 2.0, (nk, ncol)).astype(dtype)
  return reference.pack_indices(index, bits, size), scale, table


def run(
  x: np.ndarray,
  codes: np.ndarray,
  scale: np.ndarray,
  table: np.ndarray,
  bits: int,
  k: int,
  **config,
) -> np.ndarray:
  """The kernel's product, ``config`` the fields of its :class:`pm.KernelConfig`;
  float32 ``x`` multiplies in IEEE float32."""
  float32 = np.dtype(x.dtype) == np.float32
  out = pm.packed_matmul(
    jnp.asarray(x),
    jnp.asarray(codes),
    jnp.asarray(scale),
    jnp.asarray(table),
    bits=bits,
    k=k,
    config=pm.KernelConfig(**config),
    precision=jax.lax.Precision.HIGHEST if float32 else None,
    interpret=INTERPRET,
  )
  assert out.dtype == x.dtype
  return np.asarray(out.astype(jnp.float32), np.float64)


def check(
  bits: int,
  grid: str,
  m: int,
  k: int,
  n: int,
  scales: str,
  dtype: object,
  seed: int = 0,
  **config,
) -> None:
  codes, scale, table = make(bits, grid, k, n, scales, seed)
  x = np.random.default_rng(seed + 1).normal(size=(m, k)).astype(dtype)
  w = decode(codes, scale, table, bits, k)
  xf = np.asarray(x.astype(np.float32), np.float64)
  want, bound = xf @ w, np.abs(xf) @ np.abs(w)
  got = run(x, codes, scale, table, bits, k, **config)
  err = np.abs(got - want) / (TOL[np.dtype(dtype)] * bound + 1e-30)
  where = np.unravel_index(err.argmax(), err.shape)
  assert err.max() <= 1, f'error {err.max():.3g} times the bound at {where}'


# Every bit width x grid x scale layout, in float32 (the tightest check), alternating
# one row (gemv) and seven rows (dot; 7 is ragged against the 16-row block). K = 200
# and N = 72 are ragged against every tile; "g4" on K = 200 gives groups of 50 rows
# (scales gathered per code), "g4" on K = 254 groups of 64 (one scale row per tile,
# with a ragged last tile).
SCALES = [('channel', 200), ('tensor', 200), ('g4', 200), ('g4', 254)]
CORE = [
  (bits, grid, scales, k, (1, 7)[i % 2])
  for i, (bits, grid, (scales, k)) in enumerate(
    itertools.product((2, 3, 4, 8), ('full', 'symmetric'), SCALES)
  )
]


@pytest.mark.parametrize('bits,grid,scales,k,m', CORE)
def test_formats(bits: int, grid: str, scales: str, k: int, m: int) -> None:
  check(bits, grid, m, k, 72, scales, np.float32, seed=bits)


@pytest.mark.parametrize(
  'bits,grid,scales,m',
  [(5, 'full', 'g4', 1), (6, 'symmetric', 'channel', 7), (7, 'full', 'tensor', 2)],
)
def test_wide_units(bits: int, grid: str, scales: str, m: int) -> None:
  # 5 to 7 bits: 8 codes in 5 to 7 bytes, wider than an int32 word.
  check(bits, grid, m, 200, 72, scales, np.float32, seed=bits)


@pytest.mark.parametrize(
  'bits,dtype,m,scales',
  [
    (4, jnp.bfloat16, 1, 'channel'),
    (8, jnp.bfloat16, 64, 'g4'),
    (4, np.float16, 64, 'g4'),
    (8, np.float16, 1, 'channel'),
  ],
)
def test_dtypes(bits: int, dtype: object, m: int, scales: str) -> None:
  check(bits, 'full', m, 200, 72, scales, dtype)


@pytest.mark.parametrize(
  'bits,dtype,scales', [(4, jnp.bfloat16, 'channel'), (2, np.float32, 'g4')]
)
def test_many_rows(bits: int, dtype: object, scales: str) -> None:
  # Four 128-row blocks, the tensor-core-bound tiling.
  check(bits, 'full', 512, 200, 72, scales, dtype)


@pytest.mark.parametrize('method', ['gemv', 'dot'])
@pytest.mark.parametrize('scales', ['channel', 'g4'])
def test_split_k(method: str, scales: str) -> None:
  # K = 200 in tiles of 32: 6 whole tiles over 3 splits, the ragged tail in the last.
  check(
    4,
    'full',
    3,
    200,
    40,
    scales,
    np.float32,
    method=method,
    block_k=32,
    split_k=3,
    block_n=16,
  )


@pytest.mark.parametrize(
  'bits,grid,m',
  [(2, 'symmetric', 1), (3, 'full', 4), (4, 'symmetric', 5), (4, 'full', 1)],
)
def test_select_lookup(bits: int, grid: str, m: int) -> None:
  check(bits, grid, m, 200, 72, 'channel', np.float32, lookup='select')


@pytest.mark.parametrize('bits,prefetch', [(4, False), (8, True), (3, True)])
def test_prefetch(bits: int, prefetch: bool) -> None:
  # gemv loads codes two tiles ahead by default at 2 to 4 bits, not at 8: both ways
  # on both, with splits shorter and longer than the prefetch distance.
  check(
    bits,
    'full',
    1,
    200,
    40,
    'channel',
    np.float32,
    block_k=8 * reference.code_unit(bits)[0],
    split_k=4,
    block_n=16,
    prefetch=prefetch,
  )


def test_gemv_several_rows_and_dot_one_row() -> None:
  check(4, 'full', 5, 200, 72, 'g4', np.float32, method='gemv')
  check(8, 'full', 1, 200, 72, 'channel', np.float32, method='dot')


def test_small_shapes() -> None:
  # K below one unit of 3-bit codes and below every default tile; N below a block.
  check(3, 'full', 2, 5, 3, 'channel', np.float32)
  check(4, 'full', 1, 1, 1, 'tensor', np.float32)


def test_out_dtype() -> None:
  codes, scale, table = make(4, 'full', 64, 32, 'channel', 0)
  x = jnp.ones((2, 64), jnp.bfloat16)
  out = pm.packed_matmul(
    x, codes, scale, table, bits=4, k=64, interpret=INTERPRET, out_dtype=jnp.float32
  )
  w = decode(codes, scale, table, 4, 64)
  assert out.dtype == jnp.float32
  # Only the weights are rounded to bfloat16 (2 ** -9), not the float32 output.
  err = np.abs(np.asarray(out, np.float64) - np.ones((2, 64)) @ w)
  assert np.all(err <= 2**-8 * (np.ones((2, 64)) @ np.abs(w)))


@pytest.mark.parametrize('bits,granularity', [(4, 64), (8, 'channel'), (3, 'tensor')])
def test_quantized_leaf(bits: int, granularity: object) -> None:
  """A real QArray from pqjax.quantize: the reference reads its format, and the kernel
  agrees with it."""
  w = np.random.default_rng(3).normal(size=(200, 48)).astype(np.float32)
  # A fixed exponent skips the search, which is not what is tested here.
  q = pqjax.quantize(
    {'w': w}, bits=bits, granularity=granularity, exponent=0.7, clip=False
  )[0]['w']
  ref = decode(q.codes, q.scale, q.table, q.bits, 200)
  np.testing.assert_allclose(
    ref, np.asarray(q.dequantize(), np.float64), rtol=1e-6, atol=1e-7
  )
  x = np.random.default_rng(4).normal(size=(3, 200)).astype(np.float32)
  got = run(x, q.codes, q.scale, q.table, bits, 200)
  bound = np.abs(x.astype(np.float64)) @ np.abs(ref)
  assert np.all(np.abs(got - x.astype(np.float64) @ ref) <= 2e-5 * bound + 1e-30)


def test_choose_tiling() -> None:
  t = pm.choose_tiling(1, 4096, 4096, 4)
  assert (t.method, t.block_m, t.scale_mode) == ('gemv', 1, 'end')
  assert t.split_k > 1 and (4096 // t.block_k) % t.split_k == 0
  t = pm.choose_tiling(512, 4096, 4096, 4)
  assert (t.method, t.block_m, t.block_n, t.split_k) == ('dot', 128, 128, 1)
  # Groups of 64 rows: the default 128-code tile is lowered to one group.
  t = pm.choose_tiling(8, 4096, 4096, 4, nk=64)
  assert (t.block_k, t.scale_mode) == (64, 'tile')
  # 64 rows: no split (its partial sums would outweigh the codes), narrower blocks.
  t = pm.choose_tiling(64, 4096, 4096, 4)
  assert (t.split_k, t.block_n) == (1, 32)
  # Groups of 50 rows cannot hold whole tiles.
  assert pm.choose_tiling(8, 200, 72, 4, nk=4).scale_mode == 'element'
  # Units of 3-bit codes hold 8; a tensor-core tile needs 16 units.
  assert pm.choose_tiling(8, 4096, 64, 3).block_k % (8 * 16) == 0
  # Values set by hand are kept; the others are the defaults.
  default = pm.choose_tiling(1, 4096, 4096, 4)
  config = pm.KernelConfig(block_n=16, split_k=1, num_stages=2, lookup='select')
  t = pm.choose_tiling(1, 4096, 4096, 4, config=config)
  assert t == dataclasses.replace(default, block_n=16, split_k=1, num_stages=2)


@pytest.mark.parametrize(
  'options,match',
  [
    (dict(block_n=48), 'block_n'),
    (dict(block_k=16, method='dot'), 'block_k'),
    (dict(block_m=2, method='gemv'), 'block_m'),
    (dict(lookup='select', bits=8), 'select'),
    (dict(method='fast'), 'method'),
    (dict(method='dot', prefetch=True), 'prefetch'),
  ],
)
def test_bad_options(options: dict, match: str) -> None:
  bits = options.pop('bits', 4)
  codes, scale, table = make(bits, 'full', 64, 32, 'channel', 0)
  config = pm.KernelConfig(**options)
  with pytest.raises(ValueError, match=match):
    pm.packed_matmul(
      jnp.ones((2, 64)),
      codes,
      scale,
      table,
      bits=bits,
      k=64,
      config=config,
      interpret=True,
    )


def test_bad_inputs() -> None:
  codes, scale, table = make(4, 'full', 64, 32, 'channel', 0)
  x = jnp.ones((2, 64))
  call = lambda **a: pm.packed_matmul(
    **{
      'x': x,
      'codes': codes,
      'scale': scale,
      'table': table,
      'bits': 4,
      'k': 64,
      'interpret': True,
      **a,
    }
  )
  with pytest.raises(ValueError, match='codes must be'):
    call(codes=codes.view(np.int8))
  with pytest.raises(ValueError, match='x must be'):
    call(x=jnp.ones((2, 63)))
  with pytest.raises(ValueError, match='x must be'):
    call(x=jnp.ones((2, 64), jnp.int32))
  with pytest.raises(ValueError, match='entries'):
    call(table=table[:3])
  with pytest.raises(ValueError, match='scale'):
    call(scale=np.ones((40, 32), np.float32))
  with pytest.raises(ValueError, match='scale'):
    call(scale=np.ones((1, 31), np.float32))
  with pytest.raises(ValueError, match='bits'):
    call(bits=9)


def test_supported() -> None:
  assert pm.supported(4, table_size=16, dtype=jnp.bfloat16, backend='gpu')
  assert pm.supported(3, backend='cuda')
  assert not pm.supported(4, backend='cpu')
  assert not pm.supported(4, backend='tpu')
  assert not pm.supported(9, backend='gpu')
  assert not pm.supported(4, table_size=17, backend='gpu')
  assert not pm.supported(4, dtype=np.float64, backend='gpu')
  assert 'XLA path' in pm.unsupported_reason(4, backend='cpu')


def test_empty() -> None:
  codes, scale, table = make(4, 'full', 64, 32, 'channel', 0)
  out = pm.packed_matmul(
    jnp.ones((0, 64)), codes, scale, table, bits=4, k=64, interpret=True
  )
  assert out.shape == (0, 32)
