"""Block scales stored as uint8 steps of a float32 column scale.

The stored form is checked against a NumPy reference written from its description
(each column's largest block scale is 255 steps, each block rounds up to whole
steps, codes are the nearest level against the stored scale), and every decoding
path against a NumPy decoding of what is stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax._src.runtime import weights
from tests import reference


def coded_reference(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8 255ths ``(nk, N)`` of float32 block scales under their column's largest."""
  s = np.asarray(s, np.float32)
  column = s.max(axis=0, keepdims=True)
  ratio = s / np.where(column > 0, column, np.float32(1)) * np.float32(255)
  # Rounded up, forgiving 2**-10 of a step (float rounding of a whole number).
  u = np.where(column > 0, np.minimum(np.ceil(ratio - 2.0**-10), 255), 0)
  return u.astype(np.uint8), column


def absmax_blocks(w: np.ndarray, group: int) -> np.ndarray:
  return np.stack([np.abs(w[r]).max(axis=0) for r in reference.row_blocks(len(w), group)])


def scale_values(q: pqjax.QArray) -> np.ndarray:
  """The stored scales' values, computed in NumPy from the stored arrays."""
  return reference.scale_values(q.scale, q.column_scale)


def numpy_decode(q: pqjax.QArray) -> np.ndarray:
  """Each layer's table levels times its stored scales' values."""
  k, _ = q.matrix_shape
  codes, scales, table = np.asarray(q.codes), scale_values(q), np.asarray(q.table)
  layers = [
    reference.decode_stored(codes[i], scales[i], table[i], q.bits, k, np.float32)
    for i in np.ndindex(*q.layers)
  ]
  return np.stack(layers).reshape(q.shape)


@pytest.mark.parametrize('bits,grid', [(2, 'full'), (4, 'full'), (3, 'symmetric')])
@pytest.mark.parametrize('group', [16, 13])
def test_stored_form_matches_numpy(bits, grid, group):
  rng = np.random.default_rng(bits + group)
  w = (rng.standard_normal((100, 24)) * rng.uniform(0.01, 3, (100, 1))).astype(np.float32)
  params_q, _ = pqjax.quantize(
    {'w': w},
    bits,
    granularity=group,
    grid=grid,
    exponent=0.7,
    clip=False,
    scale_dtype='uint8',
  )
  q = params_q['w']
  u, column = coded_reference(absmax_blocks(w, group))
  assert q.scale.dtype == np.uint8 and q.column_scale.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(q.scale), u)
  np.testing.assert_array_equal(np.asarray(q.column_scale), column)
  assert u.max() == 255
  # Every decoding agrees with NumPy's, and each weight took its nearest level (the
  # paper's rounding on the symmetric grid) against the stored scale.
  got = np.asarray(q.dequantize())
  np.testing.assert_array_equal(got, numpy_decode(q))
  s = reference.block_scales(scale_values(q), len(w))
  x = w / s
  levels = reference.grid_levels(0.7, bits, grid)
  if grid == 'full':
    want_index = np.argmin(np.abs(x[..., None] - levels), axis=-1)
    mids = (levels[1:] + levels[:-1]) / 2
    margin = np.min(np.abs(x[..., None] - mids), axis=-1)
  else:
    qm = reference.qmax(bits)
    y = qm * np.abs(x) ** np.float32(0.7)
    want_index = (np.sign(x) * np.round(y)).astype(int) + qm
    margin = np.abs(y - np.floor(y) - 0.5)
  got_index = reference.unpack_indices(q.codes, bits, len(w), q.table.shape[0])
  clear = margin > 1e-4
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(got_index[clear], want_index[clear])


def test_rounded_up_scales_never_clip_more_than_asked():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((256, 40)).astype(np.float32)
  params_q, _ = pqjax.quantize({'w': w}, 4, granularity=32, clip=0.8, scale_dtype='uint8')
  q = params_q['w']
  asked = np.float32(0.8) * absmax_blocks(w, 32)
  s, step = scale_values(q), np.asarray(q.column_scale) / 255
  # At least the scale asked for (less 2**-10 of a step), less than a step more.
  assert np.all(s >= asked - step * (2.0**-10 + 1e-5))
  assert np.all(s - asked <= step * (1 + 1e-5))
  np.testing.assert_allclose(s.max(axis=0), asked.max(axis=0), rtol=1e-6)


def test_automatic_choice_and_bytes():
  rng = np.random.default_rng(1)
  params = {
    'many': rng.standard_normal((384, 64)).astype(np.float32),  # 12 groups of 32
    'few': rng.standard_normal((96, 64)).astype(np.float32),  # 3 groups of 32
  }
  params_q, _ = pqjax.quantize(params, 4, granularity=32)
  many, few = params_q['many'], params_q['few']
  assert many.scale.dtype == np.uint8 and many.column_scale.shape == (1, 64)
  assert few.scale.dtype == np.float16 and few.column_scale is None
  table = 4 * 16 + 4  # levels and exponent
  assert many.nbytes == 384 * 64 // 2 + 12 * 64 + 4 * 64 + table
  assert few.nbytes == 96 * 64 // 2 + 2 * 3 * 64 + table
  s = pqjax.summary(params_q)
  assert {x.path: x.scale_dtype for x in s.leaves} == {'many': 'uint8', 'few': 'float16'}
  assert '(group 32, uint8)' in str(s)
  # Asked for, each storage is kept; per channel, "auto" keeps float32.
  half, _ = pqjax.quantize(params, 4, granularity=32, scale_dtype='float16')
  assert half['many'].scale.dtype == np.float16
  channel, _ = pqjax.quantize(params, 4)
  assert channel['many'].scale.dtype == np.float32


def test_same_error_as_float16_scales_in_fewer_bytes():
  rng = np.random.default_rng(2)
  params = {'w': (rng.standard_normal((512, 128)) * 0.02).astype(np.float32)}
  for bits in (3, 4):
    coded, _ = pqjax.quantize(params, bits, granularity=32, scale_dtype='uint8')
    half, _ = pqjax.quantize(params, bits, granularity=32, scale_dtype='float16')
    e_coded = pqjax.relative_error(params, coded)
    e_half = pqjax.relative_error(params, half)
    assert e_coded <= 1.01 * e_half, (bits, e_coded, e_half)
    saved = pqjax.summary(half).quantized_after - pqjax.summary(coded).quantized_after
    assert saved == 16 * 128 - 4 * 128  # 16 groups: 1 byte a scale, not 2; 4 a column


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_requantizing_gives_the_same_codes(bits):
  # Blocks of 0.2 to 1 of their column's largest: a scale rounded up by under 1 / 51
  # still puts each block's largest weight on the top level at 2 to 4 bits (not at
  # 8, where the top levels are closer), so decoded weights keep the stored scales,
  # and re-quantizing lands on the same steps and codes.
  rng = np.random.default_rng(bits)
  w = rng.standard_normal((12, 8, 16)) * rng.uniform(0.2, 1.0, (12, 1, 16))
  params = {'w': w.reshape(96, 16).astype(np.float32)}
  options = dict(granularity=8, exponent=0.6, clip=False, scale_dtype='uint8')
  a, _ = pqjax.quantize(params, bits, **options)
  b, _ = pqjax.quantize(pqjax.dequantize(a), bits, **options)
  for f in ('codes', 'scale', 'table', 'column_scale'):
    np.testing.assert_array_equal(np.asarray(getattr(a['w'], f)), getattr(b['w'], f))


@pytest.mark.parametrize('factor', [2.0**-40, 2.0**30])
def test_independent_of_the_weights_scale(factor):
  rng = np.random.default_rng(3)
  w = rng.standard_normal((160, 24)).astype(np.float32)
  a, _ = pqjax.quantize({'w': w}, 4, granularity=16)
  b, _ = pqjax.quantize({'w': w * np.float32(factor)}, 4, granularity=16)
  np.testing.assert_array_equal(np.asarray(a['w'].codes), np.asarray(b['w'].codes))
  np.testing.assert_array_equal(np.asarray(a['w'].scale), np.asarray(b['w'].scale))
  np.testing.assert_array_equal(
    np.asarray(a['w'].column_scale) * np.float32(factor), np.asarray(b['w'].column_scale)
  )


def test_zero_blocks_and_columns():
  rng = np.random.default_rng(4)
  w = rng.standard_normal((80, 8)).astype(np.float32)
  w[:, 3] = 0  # a zero column
  w[16:32, 5] = 0  # a zero block in a nonzero column
  params_q, _ = pqjax.quantize({'w': w}, 4, granularity=16)
  q = params_q['w']
  assert q.scale.dtype == np.uint8
  assert np.asarray(q.column_scale)[0, 3] == 0 and np.asarray(q.scale)[1, 5] == 0
  got = np.asarray(q.dequantize())
  assert np.all(got[:, 3] == 0) and np.all(got[16:32, 5] == 0)
  np.testing.assert_array_equal(got, numpy_decode(q))


def test_stacked_layers_have_a_column_scale_each():
  rng = np.random.default_rng(5)
  w = rng.standard_normal((3, 96, 16)).astype(np.float32)
  w[1] *= 100
  params_q, _ = pqjax.quantize({'w': w}, 4, granularity=16, layer_axes=1)
  q = params_q['w']
  assert q.scale.shape == (3, 6, 16) and q.column_scale.shape == (3, 1, 16)
  # As if the layers were separate leaves.
  separate, _ = pqjax.quantize({f'{i}': w[i] for i in range(3)}, 4, granularity=16)
  for i in range(3):
    one = separate[f'{i}']
    np.testing.assert_array_equal(np.asarray(q.scale[i]), np.asarray(one.scale))
    np.testing.assert_array_equal(
      np.asarray(q.column_scale[i]), np.asarray(one.column_scale)
    )
  np.testing.assert_array_equal(np.asarray(q.dequantize()), numpy_decode(q))


# --- every decoding path ------------------------------------------------------------


def _quantized(shapes, bits=4, **options):
  keys = jax.random.split(jax.random.key(0), len(shapes))
  params = {
    name: jax.random.normal(k, shape) * 0.3
    for k, (name, shape) in zip(keys, shapes.items())
  }
  params_q, _ = pqjax.quantize(params, bits, granularity=8, **options)
  for q in pqjax.quantized_leaves(params_q).values():
    assert q.scale.dtype == np.uint8, q
  return params_q, {p: numpy_decode(q) for p, q in params_q.items()}


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize('path', ['auto', 'decode', 'fused', 'kernel'])
@pytest.mark.parametrize('rows', [1, 5])
def test_products_on_every_path(path, rows):
  params_q, dq = _quantized({'a': (48, 40), 'b': (40, 24)}, bits=3)
  forward = lambda p, x: jnp.tanh(x @ p['a']) @ p['b']
  x = jax.random.normal(jax.random.key(1), (rows, 48))
  got = jax.jit(pqjax.wrap(forward, products=path))(params_q, x)
  _close(got, forward(dq, x))


def test_row_lookups_and_blocked_decode(monkeypatch):
  from pqjax._src.runtime import products

  params_q, dq = _quantized({'e': (64, 12), 'w': (64, 700)}, bits=5)
  ids = jnp.array([[0, 63, 13], [31, 2, 8]])
  take = lambda p, i: p['e'][i]
  got = jax.jit(pqjax.wrap(take))(params_q, ids)
  np.testing.assert_array_equal(np.asarray(got), dq['e'][np.asarray(ids)])
  assert [u.path for u in pqjax.quantized_products(take, params_q, ids)] == ['rows']
  monkeypatch.setattr(products, 'DECODE_BLOCK_BYTES', 1 << 16)
  x = jax.random.normal(jax.random.key(2), (40, 64))
  wide = lambda p, x: x @ p['w']
  _close(jax.jit(pqjax.wrap(wide, products='decode'))(params_q, x), wide(dq, x))


def test_scanned_layers_sliced_one_a_step():
  params = {'w': jax.random.normal(jax.random.key(0), (5, 32, 32)) * 0.3}
  step = lambda h, w: (jnp.tanh(h @ w), None)
  forward = lambda p, x: jax.lax.scan(step, x, p['w'])[0]
  x = jax.random.normal(jax.random.key(1), (3, 32))
  for axes in (0, 1):  # sliced from a whole leaf's blocks, or its layers
    params_q, _ = pqjax.quantize(params, 4, granularity=4, layer_axes=axes)
    q = params_q['w']
    assert q.scale.dtype == np.uint8
    layers = weights.as_layers(q, 5)
    assert layers is not None and layers.column_scale.shape == (5, 1, 32)
    want = forward({'w': numpy_decode(q)}, x)
    for path in ('decode', 'fused'):
      _close(jax.jit(pqjax.wrap(forward, products=path))(params_q, x), want)


# --- checkpoints and bad input --------------------------------------------------------


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_checkpoints_keep_the_column_scale(tmp_path, fmt):
  rng = np.random.default_rng(6)
  params = {
    'coded': rng.standard_normal((2, 64, 16)).astype(np.float32),
    'half': rng.standard_normal((24, 16)).astype(np.float32),
  }
  params_q, _ = pqjax.quantize(
    params, 4, granularity=8, layer_axes=lambda p, x: x.ndim - 2
  )
  assert params_q['coded'].scale.dtype == np.uint8
  assert params_q['half'].column_scale is None
  if fmt == 'orbax':
    pqjax.save_orbax(tmp_path / 'q', params_q)
    back = pqjax.load_orbax(tmp_path / 'q')
  else:
    pqjax.save(tmp_path / f'q.{fmt}', params_q)
    back = pqjax.load(tmp_path / f'q.{fmt}')
  for name in params:
    a, b = params_q[name], back[name]
    assert (a.column_scale is None) == (b.column_scale is None)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      assert np.asarray(x).dtype == np.asarray(y).dtype
      assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_bad_storage_is_refused():
  q, _ = pqjax.quantize(
    {'w': np.ones((64, 8), np.float32)}, 4, granularity=8, scale_dtype='uint8'
  )
  q = q['w']
  fields = dict(codes=q.codes, alpha=q.alpha, table=q.table, bits=4, shape=(64, 8))
  fields['dtype'] = np.dtype(np.float32)
  with pytest.raises(ValueError, match='column_scale'):
    pqjax.QArray(scale=q.scale, **fields)
  with pytest.raises(ValueError, match='column_scale'):
    pqjax.QArray(scale=q.block_scale(), column_scale=q.column_scale, **fields)
  with pytest.raises(ValueError, match='column_scale must have shape'):
    pqjax.QArray(scale=q.scale, column_scale=q.column_scale[:, :4], **fields)
  with pytest.raises(ValueError, match='scale dtype'):
    pqjax.QArray(scale=q.scale.astype(jnp.int8), **fields)
  with pytest.raises(ValueError, match='scale_dtype'):
    pqjax.quantize({'w': np.ones((64, 8), np.float32)}, 4, scale_dtype='int4')
