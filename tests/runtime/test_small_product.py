"""The packed product against a NumPy decoding of the storage format."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pqjax
from pqjax._src.runtime import small_product as sp
from tests import reference

K, N = 131, 67  # odd on both sides: partial packing units and partial vector lanes


def numpy_table(bits: int, grid: str, alpha: float = 0.7) -> np.ndarray:
  """Levels ``sign(q) (|q| / d) ** (1 / alpha)`` in code order, float32."""
  half = 2 ** (bits - 1)
  d_neg, d_pos = (half, half - 1) if grid == 'full' else (half - 1, half - 1)
  q = np.arange(-d_neg, d_pos + 1, dtype=np.float64)
  d = np.where(q < 0, d_neg, d_pos)
  return (np.sign(q) * (np.abs(q) / d) ** (1 / alpha)).astype(np.float32)


# The weight the stored codes stand for, in float32.
numpy_decode = functools.partial(reference.decode_stored, dtype=np.float32)


def random_weight(
  rng: np.random.Generator,
  bits: int,
  grid: str,
  nk: int,
  ncol: int,
  k: int = K,
  n: int = N,
) -> tuple[np.ndarray, ...]:
  table = numpy_table(bits, grid)
  index = rng.integers(0, len(table), (k, n))
  codes = reference.pack_indices(index, bits, len(table))
  scale = rng.uniform(0.25, 4.0, (nk, ncol)).astype(np.float32)
  return codes, scale, table


def check_close(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
  """float32 summation of K products: within K ulps of the sum of |terms|."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  ref = x64 @ w64
  bound = 4 * x64.shape[-1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64))
  assert y.shape == ref.shape
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), bound + 1e-30)


# (grid, nk, ncol): one scale, one per column, groups of 44 rows per column (131 = 44 +
# 44 + 43). The grid only changes the table (its length and zero code).
CASES = [('full', 1, 1), ('full', 1, N), ('full', 3, N), ('symmetric', 3, N)]


@pytest.mark.parametrize('bits', range(2, 9))
@pytest.mark.parametrize('grid,nk,ncol', CASES)
def test_matches_numpy_decoding(bits, grid, nk, ncol):
  rng = np.random.default_rng(bits * 100 + nk * 10 + ncol)
  codes, scale, table = random_weight(rng, bits, grid, nk, ncol)
  w = numpy_decode(codes, scale, table, bits, K)
  xs = [rng.standard_normal((rows, K)).astype(np.float32) for rows in (1, 5)]

  @jax.jit
  def products(xs, c, s, t):  # one row and several rows take different paths
    return [sp.packed_product(x, c, s, t, bits=bits, k=K) for x in xs]

  for x, y in zip(xs, products(xs, codes, scale, table)):
    check_close(y, x, w)
  # Rows of the identity pick rows of W with no rounding in the sum: the decoded
  # weights must be the table level times the scale bit for bit (the closed form
  # in float32 would miss by a few ulps). First and last rows, group boundaries.
  picks = [[0], [1, 43, 44, 88, K - 1]]
  onehots = [np.eye(K, dtype=np.float32)[p] for p in picks]
  for p, y in zip(picks, products(onehots, codes, scale, table)):
    np.testing.assert_array_equal(np.asarray(y), w[p])


def test_groups_shared_by_all_columns():
  rng = np.random.default_rng(5)
  codes, scale, table = random_weight(rng, 4, 'full', 5, 1)  # 27-row groups, last 23
  product = jax.jit(lambda x: sp.packed_product(x, codes, scale, table, bits=4, k=K))
  for rows in (1, 4):
    x = rng.standard_normal((rows, K)).astype(np.float32)
    check_close(product(x), x, numpy_decode(codes, scale, table, 4, K))


@pytest.mark.parametrize('rows', [1, 2, 3, 8, 13, 16])
def test_rows_one_to_sixteen(rows):
  rng = np.random.default_rng(rows)
  codes, scale, table = random_weight(rng, 4, 'full', 3, N)
  x = rng.standard_normal((rows, K)).astype(np.float32)
  y = jax.jit(lambda x: sp.packed_product(x, codes, scale, table, bits=4, k=K))(x)
  check_close(y, x, numpy_decode(codes, scale, table, 4, K))


def test_leading_axes_and_plain_call():
  rng = np.random.default_rng(0)
  codes, scale, table = random_weight(rng, 3, 'full', 1, N)
  x = rng.standard_normal((2, 3, K)).astype(np.float32)
  y = sp.packed_product(x, codes, scale, table, bits=3, k=K)
  assert y.shape == (2, 3, N)
  check_close(y.reshape(6, N), x.reshape(6, K), numpy_decode(codes, scale, table, 3, K))


def test_quantized_leaf_with_float16_group_scales():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((K, N)).astype(np.float32)
  params_q, _ = pqjax.quantize({'w': w}, bits=3, granularity=64)
  q = params_q['w']
  assert q.scale.shape == (3, N) and q.scale.dtype == np.float16  # last group: 3 rows
  x = rng.standard_normal((1, K)).astype(np.float32)
  y = jax.jit(
    lambda x, q: sp.packed_product(x, q.codes, q.scale, q.table, bits=q.bits, k=K)
  )(x, q)
  check_close(y, x, numpy_decode(q.codes, q.scale, q.table, q.bits, K))


def test_weight_dtype_rounds_the_decoded_weight():
  rng = np.random.default_rng(1)
  codes, scale, table = random_weight(rng, 4, 'full', 1, N)
  w = numpy_decode(codes, scale, table, 4, K).astype(ml_dtypes.bfloat16)
  product = jax.jit(
    lambda x: sp.packed_product(x, codes, scale, table, bits=4, k=K, dtype=jnp.bfloat16)
  )
  for rows in (1, 4):
    x = rng.standard_normal((rows, K)).astype(ml_dtypes.bfloat16)
    y = product(x)
    assert y.dtype == jnp.bfloat16  # the dtype of x @ W.astype(bfloat16)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref = x64 @ w64
    bound = 2**-7 * np.abs(x64) @ np.abs(w64)
    np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - ref), bound)
    # float32 x with bfloat16 weights: a float32 result from bfloat16-rounded weights.
    y32 = product(x.astype(np.float32))
    assert y32.dtype == jnp.float32
    check_close(y32, x.astype(np.float32), np.asarray(w, np.float32))


def test_inside_scan_over_stacked_layers():
  rng = np.random.default_rng(2)
  layers = [random_weight(rng, 2, 'symmetric', 3, N, k=N) for _ in range(3)]
  codes = np.stack([c for c, _, _ in layers])
  scales = np.stack([s for _, s, _ in layers])
  table = layers[0][2]

  def step(h, layer):
    c, s = layer
    return jnp.tanh(sp.packed_product(h, c, s, table, bits=2, k=N)), None

  forward = jax.jit(lambda x: jax.lax.scan(step, x, (codes, scales))[0])
  for rows in (1, 2):  # both forms
    x = rng.standard_normal((rows, N)).astype(np.float32)
    h = x.astype(np.float64)
    for c, s, t in layers:
      h = np.tanh(h @ numpy_decode(c, s, t, 2, N))
    # float32 sums of 67 products of up to 4 in size, through three layers; a wrong
    # decoding would be off by O(1).
    np.testing.assert_allclose(np.asarray(forward(x)), h, rtol=0, atol=1e-3)


def test_nan_in_a_row_gives_nan_like_the_float_product():
  rng = np.random.default_rng(3)
  codes, scale, table = random_weight(rng, 4, 'full', 1, N)
  x = rng.standard_normal((3, K)).astype(np.float32)
  x[1, 70] = np.nan
  for rows in (x[1:2], x):
    y = np.asarray(sp.packed_product(rows, codes, scale, table, bits=4, k=K))
    ref = rows @ numpy_decode(codes, scale, table, 4, K)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))


@pytest.mark.parametrize('rows,share', [(1, 16), (8, 4)])
def test_never_writes_the_float_weight(rows, share):
  k = n = 2048
  codes = jnp.zeros((sp.packed_rows(k, 4), n), jnp.uint8)
  scale = jnp.ones((1, n), jnp.float32)
  table = jnp.asarray(numpy_table(4, 'full'))
  x = jax.ShapeDtypeStruct((rows, k), jnp.float32)
  compiled = (
    jax.jit(lambda x, c, s, t: sp.packed_product(x, c, s, t, bits=4, k=k))
    .lower(x, codes, scale, table)
    .compile()
  )
  temp = compiled.memory_analysis().temp_size_in_bytes
  # The decoded weight alone would be 16.8 MB.
  assert temp <= k * n * 4 // share, temp


def test_prefers_few_rows_and_more_for_large_weights():
  small, large = (768, 3072), (4096, 4096)
  assert not sp.prefers_packed_product(0, bits=4, k=768, n=3072)
  for rows, expected_small, expected_large in (
    (1, True, True),
    (16, True, True),
    (17, False, True),
    (64, False, True),
    (65, False, False),
  ):
    assert sp.prefers_packed_product(rows, bits=4, k=small[0], n=small[1]) == (
      expected_small
    )
    assert sp.prefers_packed_product(rows, bits=2, k=large[0], n=large[1]) == (
      expected_large
    )
  # Weights under 4 MB as float32 (MiniLM's): one row only.
  for rows, expected in ((1, True), (2, False), (16, False)):
    assert sp.prefers_packed_product(rows, bits=4, k=384, n=1536) == expected


def test_rejects_codes_of_another_width():
  codes, scale, table = random_weight(np.random.default_rng(0), 4, 'full', 1, N)
  with pytest.raises(ValueError, match='codes'):
    sp.packed_product(np.zeros((1, K), np.float32), codes, scale, table, bits=2, k=K)
