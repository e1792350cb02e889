"""The native CPU kernel against NumPy references, at every level this CPU runs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pqjax
from pqjax._src.core.packing import STEP_FRACTIONS
from pqjax._src.runtime.native import library
from pqjax._src.runtime.native import product as native
from tests import reference

STATUS = library.status()
pytestmark = pytest.mark.skipif(not STATUS.loaded, reason=STATUS.reason)
LEVELS = STATUS.levels

ROUNDING_DTYPES = {
  'none': np.float32,
  'bfloat16': ml_dtypes.bfloat16,
  'float16': np.float16,
}


def random_weight(rng, bits, *, k, n, grid='full', nk=1, ncol=None, storage='float32'):
  """Stored arrays of a random weight and its float32 ``(k, n)`` values in NumPy."""
  ncol = n if ncol is None else ncol
  table = reference.grid_levels(0.7, bits, grid).astype(np.float32)
  index = rng.integers(0, len(table), (k, n))
  codes = reference.pack_indices(index, bits, len(table))
  column = None
  if storage == 'uint8':
    scale = rng.integers(0, 256, (nk, ncol)).astype(np.uint8)
    column = rng.uniform(0.25, 4.0, (1, ncol)).astype(np.float32)
  else:
    scale = rng.uniform(0.25, 4.0, (nk, ncol)).astype(storage)
  values = reference.scale_values(scale, column)
  w = table[index] * reference.block_scales(values, k)
  return (codes, scale, column, table), w.astype(np.float32)


def rounded(w: np.ndarray, rounding: str) -> np.ndarray:
  return w.astype(ROUNDING_DTYPES[rounding]).astype(np.float32)


def check_close(y, x, w):
  """float32 sums of K products: within 4 K ulps of the sum of |terms|."""
  x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
  bound = (
    4 * max(x64.shape[-1], 1) * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64))
  )
  assert y.shape == (x64 @ w64).shape
  np.testing.assert_array_less(
    np.abs(np.asarray(y, np.float64) - x64 @ w64), bound + 1e-30
  )


def product(arrays, x, bits, k, **options):
  codes, scale, column, table = arrays
  fn = lambda x, c, s, v, t: native.packed_product(
    x, c, s, v, t, bits=bits, k=k, **options
  )
  return np.asarray(jax.jit(fn)(x, codes, scale, column, table))


# (k, n, rows, grid, nk, ncol, storage, rounding): odd K and N (partial packing units
# and vector lanes), one scale, one a column, groups whose blocks cut packing units
# (100 rows in 3 blocks of 34), float16 and uint8 scales, rounded weights.
CASES = [
  (131, 67, 1, 'full', 1, 1, 'float32', 'none'),
  (131, 67, 5, 'symmetric', 1, None, 'float32', 'none'),
  (100, 300, 16, 'full', 3, None, 'float16', 'bfloat16'),
  (257, 129, 3, 'symmetric', 9, None, 'uint8', 'float16'),
  (64, 1030, 2, 'full', 2, None, 'uint8', 'none'),
]


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('bits', range(2, 9))
def test_matches_float64_reference(level, bits):
  rng = np.random.default_rng(bits)
  for k, n, rows, grid, nk, ncol, storage, rounding in CASES:
    arrays, w = random_weight(
      rng, bits, k=k, n=n, grid=grid, nk=nk, ncol=ncol, storage=storage
    )
    x = rng.standard_normal((rows, k)).astype(np.float32)
    y = product(arrays, x, bits, k, rounding=rounding, level=level)
    check_close(y, x, rounded(w, rounding))


@pytest.mark.parametrize('level', LEVELS)
@pytest.mark.parametrize('bits', [2, 3, 4, 6, 8])
def test_rows_of_the_identity_give_the_decoded_weights_bit_for_bit(level, bits):
  # One-hot rows sum a single product each: every weight must be the table's level
  # times its block scale in float32 (then rounded to the weight's dtype), as
  # QArray.dequantize gives it. uint8 scales cover all 256 steps.
  rng = np.random.default_rng(10 + bits)
  k, n = 37, 256
  for storage, nk, rounding in [('uint8', 2, 'none'), ('float16', 5, 'bfloat16')]:
    arrays, _ = random_weight(rng, bits, k=k, n=n, nk=nk, storage=storage)
    codes, scale, column, table = arrays
    if storage == 'uint8':
      scale[0] = np.arange(256)
    dtype = ROUNDING_DTYPES[rounding]
    q = pqjax.QArray(
      codes=jnp.asarray(codes),
      scale=jnp.asarray(scale),
      column_scale=None if column is None else jnp.asarray(column),
      alpha=jnp.float32(0.7),
      table=jnp.asarray(table),
      bits=bits,
      shape=(k, n),
      dtype=np.dtype(dtype),
    )
    want = np.asarray(q.dequantize()).astype(np.float32)
    y = product(
      arrays, np.eye(k, dtype=np.float32), bits, k, rounding=rounding, level=level
    )
    np.testing.assert_array_equal(y, want)


def test_uint8_steps_are_the_stored_fractions():
  # The kernel's u / 255 (a float32 division) against the table every path uses.
  arrays, _ = random_weight(np.random.default_rng(0), 4, k=2, n=256, storage='uint8')
  codes, scale, column, table = arrays
  scale[:] = np.arange(256)
  column[:] = 1
  table[:] = 1
  y = product((codes, scale, column, table), np.eye(2, dtype=np.float32), 4, 2)
  np.testing.assert_array_equal(y[0], STEP_FRACTIONS)


@pytest.mark.parametrize('level', LEVELS)
def test_nan_and_inf_in_activations_propagate_as_in_xla(level):
  rng = np.random.default_rng(3)
  k, n = 40, 50
  arrays, w = random_weight(rng, 4, k=k, n=n)
  x = rng.standard_normal((4, k)).astype(np.float32)
  x[0, 3] = np.nan
  x[1, 7] = np.inf
  x[2, 0], x[2, 39] = np.inf, -np.inf
  y = product(arrays, x, 4, k, level=level)
  want = np.asarray(jnp.dot(x, w))
  np.testing.assert_array_equal(np.isnan(y), np.isnan(want))
  np.testing.assert_array_equal(np.isinf(y), np.isinf(want))
  finite = np.isfinite(want)
  np.testing.assert_allclose(y[finite], want[finite], rtol=1e-4, atol=1e-4)
  assert np.isinf(want[1]).any() and np.isnan(want[2]).any() and np.isnan(want[0]).all()


@pytest.mark.parametrize('k,n,rows', [(0, 5, 3), (8, 0, 2), (8, 5, 0)])
def test_zero_sized_products(k, n, rows):
  codes = np.zeros((-(-k // 2), n), np.uint8)
  table = reference.grid_levels(0.7, 4, 'full').astype(np.float32)
  arrays = (codes, np.ones((1, max(n, 1)), np.float32), None, table)
  y = product(arrays, np.ones((rows, k), np.float32), 4, k)
  np.testing.assert_array_equal(y, np.zeros((rows, n), np.float32))


@pytest.mark.parametrize('bits', [3, 4])
def test_deterministic_across_calls_and_thread_counts(bits):
  rng = np.random.default_rng(bits)
  k, n = 300, 2100  # several work items
  arrays, w = random_weight(rng, bits, k=k, n=n, nk=3)
  x = rng.standard_normal((5, k)).astype(np.float32)
  outs = [product(arrays, x, bits, k, threads=t) for t in (1, 2, 0, 2)]
  for y in outs[1:]:
    np.testing.assert_array_equal(y, outs[0])
  check_close(outs[0], x, w)


# --- inside wrap ----------------------------------------------------------------------


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jax.nn.gelu(nn.Dense(200)(x))
    return nn.Dense(33)(x)


@pytest.fixture(scope='module')
def mlp():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (3, 71))
  params = model.init(jax.random.key(1), x)['params']
  params_q, _ = pqjax.quantize(params, bits=4)
  apply = lambda p, x: model.apply({'params': p}, x)
  return apply, params_q, pqjax.dequantize(params_q), x


def test_wrap_runs_products_natively(mlp):
  apply, params_q, dq, x = mlp
  for products in ('native', 'auto'):
    wrapped = pqjax.wrap(apply, products=products)
    paths = [p.path for p in pqjax.quantized_products(wrapped, params_q, x)]
    assert paths == ['native', 'native']
    np.testing.assert_allclose(jax.jit(wrapped)(params_q, x), apply(dq, x), atol=2e-5)
  # Many rows: decoded for XLA's dot (auto), natively when forced.
  x = jnp.ones((40, 71))
  paths = [p.path for p in pqjax.quantized_products(pqjax.wrap(apply), params_q, x)]
  assert paths == ['decode', 'decode']
  forced = pqjax.wrap(apply, products='native')
  assert [p.path for p in pqjax.quantized_products(forced, params_q, x)] == ['native'] * 2


def test_activation_dtypes_and_rounded_weights(mlp):
  _, params_q, _, x = mlp

  def forward(p, x, w_dtype):
    # The model's own casts: the weight cast to w_dtype, the product in x's dtype.
    return x @ p['Dense_0']['kernel'].astype(w_dtype).astype(x.dtype)

  for x_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    for w_dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
      xs = x.astype(x_dtype)
      ys = [
        jax.jit(pqjax.wrap(forward, products=products), static_argnums=2)(
          params_q, xs, w_dtype
        )
        for products in ('native', 'decode')
      ]
      assert ys[0].dtype == ys[1].dtype == x_dtype
      tol = 2e-5 if x_dtype == jnp.float32 else 2e-2
      np.testing.assert_allclose(
        np.asarray(ys[0], np.float32), np.asarray(ys[1], np.float32), rtol=tol, atol=tol
      )


def test_gradients_match_the_decode_path(mlp):
  apply, params_q, _, x = mlp
  loss = lambda products: (
    lambda x, p: jnp.sum(jnp.sin(pqjax.wrap(apply, products=products)(p, x)))
  )
  g_native = jax.jit(jax.grad(loss('native')))(x, params_q)
  g_decode = jax.jit(jax.grad(loss('decode')))(x, params_q)
  np.testing.assert_allclose(g_native, g_decode, rtol=1e-5, atol=1e-6)
  # Forward mode, and the derivative with respect to a block scale.
  t = jnp.ones_like(x)
  jvp = lambda products: jax.jvp(lambda x: loss(products)(x, params_q), (x,), (t,))[1]
  np.testing.assert_allclose(jvp('native'), jvp('decode'), rtol=1e-5)

  q = params_q['Dense_0']['kernel']

  def of_scale(products):
    def f(scale):
      layer = {**params_q['Dense_0'], 'kernel': dataclasses.replace(q, scale=scale)}
      return loss(products)(x, {**params_q, 'Dense_0': layer})

    return jax.grad(f)(q.scale)

  np.testing.assert_allclose(of_scale('native'), of_scale('decode'), rtol=1e-4, atol=1e-6)


def test_vmap_folds_a_batch_of_rows_and_maps_batched_weights():
  rng = np.random.default_rng(5)
  k, n = 48, 40
  arrays, w = random_weight(rng, 4, k=k, n=n, nk=2)
  codes, scale, column, table = arrays
  xs = rng.standard_normal((6, 2, k)).astype(np.float32)
  one = lambda x, c, s, t: native.packed_product(x, c, s, None, t, bits=4, k=k)
  y = jax.jit(jax.vmap(one, in_axes=(0, None, None, None)))(xs, codes, scale, table)
  check_close(np.asarray(y).reshape(12, n), xs.reshape(12, k), w)
  # Weights batched too (a stack of three): one product each, and both axes nested.
  stacked = [random_weight(rng, 4, k=k, n=n, nk=2) for _ in range(3)]
  cs, ss, ts = (np.stack([s[0][i] for s in stacked]) for i in (0, 1, 3))
  y = jax.jit(
    jax.vmap(jax.vmap(one, in_axes=(0, None, None, None)), in_axes=(None, 0, 0, 0))
  )(xs, cs, ss, ts)
  for i, (_, wi) in enumerate(stacked):
    check_close(np.asarray(y[i]).reshape(12, n), xs.reshape(12, k), wi)


def test_scan_remat_and_cond_keep_native_products():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(64)(x)), None

  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        nn.remat(Block),
        variable_axes={'params': 0},
        split_rngs={'params': True},
        length=3,
      )
      return scan(name='blocks')(x, None)[0]

  model = Stack()
  x = jax.random.normal(jax.random.key(0), (2, 64))
  params = model.init(jax.random.key(1), x)['params']
  stacked = lambda path, leaf: 1 if leaf.ndim >= 3 else 0
  params_q, _ = pqjax.quantize(params, bits=4, layer_axes=stacked)
  apply = lambda p, x, flag: jax.lax.cond(
    flag, lambda: model.apply({'params': p}, x), lambda: -model.apply({'params': p}, x)
  )
  wrapped = pqjax.wrap(apply, products='native')
  paths = [p.path for p in pqjax.quantized_products(wrapped, params_q, x, True)]
  assert set(paths) == {'native'}
  want = model.apply({'params': pqjax.dequantize(params_q)}, x)
  np.testing.assert_allclose(jax.jit(wrapped)(params_q, x, True), want, atol=2e-5)
  np.testing.assert_allclose(jax.jit(wrapped)(params_q, x, False), -want, atol=2e-5)
  grad = jax.grad(lambda x: wrapped(params_q, x, True).sum())(x)
  grad_ref = jax.grad(
    lambda x: model.apply({'params': pqjax.dequantize(params_q)}, x).sum()
  )(x)
  np.testing.assert_allclose(grad, grad_ref, rtol=1e-4, atol=1e-5)


# --- loading, levels and the fallback -------------------------------------------------


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-c', code],
    capture_output=True,
    text=True,
    env={**os.environ, **env},
    check=True,
  )


def test_environment_forces_a_level(monkeypatch):
  for level in LEVELS:
    monkeypatch.setenv(library.LEVEL_VARIABLE, level)
    assert library.choose_level(LEVELS) == (level, '')
  monkeypatch.setenv(library.LEVEL_VARIABLE, 'sse9')
  assert library.choose_level(LEVELS)[1].startswith("PQJAX_NATIVE_LEVEL='sse9' is not")
  monkeypatch.setenv(library.LEVEL_VARIABLE, 'avx512')
  assert 'this CPU runs only' in library.choose_level(('portable', 'avx2'))[1]
  monkeypatch.delenv(library.LEVEL_VARIABLE)
  assert library.choose_level(LEVELS) == (LEVELS[-1], '')


def test_environment_in_a_new_process():
  code = 'import pqjax; s = pqjax.native_status(); print(s.loaded, s.level)'
  out = _python(code, PQJAX_NATIVE_LEVEL=LEVELS[0])
  assert out.stdout.split() == ['True', LEVELS[0]]
  out = _python(code, PQJAX_NATIVE='0', PQJAX_NATIVE_LEVEL='sse9')
  assert out.stdout.split() == ['False', 'None'] and 'Warning' not in out.stderr


def test_a_library_built_for_another_jaxlib_falls_back_with_one_warning(monkeypatch, mlp):
  apply, params_q, dq, x = mlp
  monkeypatch.setattr(library, '_installed_jaxlib', lambda: '0.0.1')
  stale = library._load()
  assert not stale.loaded and 'jaxlib 0.0.1' in stale.reason
  library.status.cache_clear()
  monkeypatch.setattr(library, '_load', lambda: stale)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      paths = [
        p.path for p in pqjax.quantized_products(pqjax.wrap(apply), params_q, x[:1])
      ]
      pqjax.native_status()
    assert paths == ['fused', 'fused']
    assert len([w for w in caught if 'XLA paths' in str(w.message)]) == 1
    y = jax.jit(pqjax.wrap(apply))(params_q, x[:1])
    np.testing.assert_allclose(y, apply(dq, x[:1]), atol=2e-5)
    with pytest.raises(ValueError, match='native.*jaxlib 0.0.1'):
      pqjax.quantized_products(pqjax.wrap(apply, products='native'), params_q, x)
  finally:
    library.status.cache_clear()
