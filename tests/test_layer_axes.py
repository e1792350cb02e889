"""quantize(..., layer_axes=n): stacked layers, each quantized as a separate leaf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from tests import reference as ref

FIELDS = ('codes', 'scale', 'alpha', 'table')


def _stack(shape, seed=0):
  """Layers of different spreads and distributions, stacked on the leading axes."""
  rng = np.random.default_rng(seed)
  *layers, k, n = shape
  out = []
  for i in range(int(np.prod(layers))):
    draw = (rng.standard_normal, rng.laplace, rng.uniform)[i % 3]
    out.append(draw(size=(k, n)).astype(np.float32) * np.float32(1.5**i))
  return np.stack(out).reshape(shape)


def _separate(w, layer_axes):
  """The layers of ``w`` as separate leaves, keys in layer order."""
  layers = w.shape[:layer_axes]
  return {f'{i:03d}': w[index] for i, index in enumerate(np.ndindex(*layers))}


def _check_equal_to_separate(w, layer_axes, bits, **options):
  params_q, alphas = pqjax.quantize({'w': w}, bits, layer_axes=layer_axes, **options)
  sep_q, sep_alphas = pqjax.quantize(_separate(w, layer_axes), bits, **options)
  q = params_q['w']
  layers = w.shape[:layer_axes]
  assert isinstance(q, pqjax.QArray) and q.layer_axes == layer_axes
  assert q.layers == layers and q.shape == w.shape
  assert isinstance(alphas['w'], np.ndarray) and alphas['w'].dtype == np.float32
  assert alphas['w'].shape == layers
  for i, index in enumerate(np.ndindex(*layers)):
    one = sep_q[f'{i:03d}']
    assert alphas['w'][index] == np.float32(sep_alphas[f'{i:03d}']), index
    for f in FIELDS:
      got, want = np.asarray(getattr(q, f)[index]), np.asarray(getattr(one, f))
      assert got.dtype == want.dtype, (index, f)
      np.testing.assert_array_equal(got, want, err_msg=f'layer {index}: {f}')
  # Decoding the stack (vmapped) gives each separate leaf's decoding, stacked.
  decoded = np.asarray(q.dequantize())
  assert decoded.shape == w.shape and decoded.dtype == w.dtype
  want = np.stack([np.asarray(sep_q[f'{i:03d}'].dequantize()) for i in range(len(sep_q))])
  np.testing.assert_array_equal(decoded, want.reshape(w.shape))
  return q, alphas['w']


@pytest.mark.parametrize(
  'bits,options',
  [
    (4, {}),
    (4, {'granularity': 'tensor', 'exponent': 'global'}),
    (3, {'granularity': 10, 'clip': 'block'}),
    (2, {'granularity': 16, 'grid': 'symmetric', 'clip': False}),
    (8, {'exponent': 0.6, 'clip': 0.9}),
    (5, {'granularity': 'channel', 'exponent': 'global', 'clip': 'block'}),
    (4, {'search_config': pqjax.SearchConfig(refine_iters=0)}),  # binned search only
  ],
)
def test_stack_equals_separate_leaves(bits, options):
  q, alphas = _check_equal_to_separate(_stack((6, 48, 40)), 1, bits, **options)
  if options.get('exponent') == 'global':
    assert len(set(alphas.tolist())) == 1
  elif 'exponent' not in options:
    assert len(set(alphas.tolist())) > 1  # the layers' spreads differ


def test_two_layer_axes():
  w = _stack((2, 3, 24, 16), seed=1)
  q, alphas = _check_equal_to_separate(w, 2, 4, granularity=8)
  assert q.codes.shape == (2, 3, 12, 16) and q.scale.shape == (2, 3, 3, 16)
  assert q.alpha.shape == (2, 3) and q.table.shape == (2, 3, 16)


def test_conv_shaped_layers():
  # Each layer is a (3, 3, 4, 8) conv kernel: K = 36 rows.
  w = _stack((4, 36, 8), seed=2).reshape(4, 3, 3, 4, 8)
  q, _ = _check_equal_to_separate(w, 1, 3, granularity=5)
  assert q.matrix_shape == (36, 8) and q.scale.shape == (4, 8, 8)


@pytest.mark.parametrize('exponent', ['layer', 'global'])
def test_stacked_and_plain_leaves_share_a_group(exponent):
  rng = np.random.default_rng(3)
  stack = _stack((4, 32, 24), seed=3)
  plain = rng.standard_normal((32, 24)).astype(np.float32)
  other = rng.standard_normal((16, 8)).astype(np.float32)
  params = {'other': other, 'plain': plain, 'stack': stack}
  params_q, alphas = pqjax.quantize(
    params, 4, exponent=exponent, layer_axes=lambda path, leaf: leaf.ndim - 2
  )
  flat = {'other': other, 'plain': plain, **{f'stack{i}': stack[i] for i in range(4)}}
  want_q, want_alphas = pqjax.quantize(flat, 4, exponent=exponent)
  assert params_q['plain'].layer_axes == 0 and isinstance(alphas['plain'], float)
  for name in ('other', 'plain'):
    assert alphas[name] == want_alphas[name]
    for f in FIELDS:
      np.testing.assert_array_equal(
        np.asarray(getattr(params_q[name], f)), np.asarray(getattr(want_q[name], f))
      )
  for i in range(4):
    assert alphas['stack'][i] == np.float32(want_alphas[f'stack{i}'])
    for f in FIELDS:
      np.testing.assert_array_equal(
        np.asarray(getattr(params_q['stack'], f)[i]),
        np.asarray(getattr(want_q[f'stack{i}'], f)),
      )


def test_each_layer_against_numpy():
  """The paper's grid at fixed exponent and absmax scales, per layer, in NumPy."""
  w = _stack((3, 32, 16), seed=4)
  for granularity, nk, ncol in (('tensor', 1, 1), ('channel', 1, 16), (8, 4, 16)):
    params_q, alphas = pqjax.quantize(
      {'w': w},
      4,
      granularity=granularity,
      exponent=0.7,
      grid='symmetric',
      clip=False,
      scale_dtype='float32',
      layer_axes=1,
    )
    decoded = np.asarray(params_q['w'].dequantize())
    np.testing.assert_array_equal(alphas['w'], np.float32([0.7] * 3))
    for i in range(3):
      codes, _, m = ref.power_codes(w[i], 0.7, 4, nk, ncol)
      np.testing.assert_array_equal(decoded[i], ref.power_decode(codes, m, 0.7, 4))


def test_default_is_one_matrix_per_leaf():
  w = _stack((4, 16, 8), seed=5)
  default_q, default_alphas = pqjax.quantize({'w': w}, 4)
  zero_q, zero_alphas = pqjax.quantize({'w': w}, 4, layer_axes=lambda p, x: 0)
  assert default_q['w'].layer_axes == 0 and default_q['w'].scale.shape == (1, 8)
  assert isinstance(default_alphas['w'], float) and default_alphas == zero_alphas
  for f in FIELDS:
    np.testing.assert_array_equal(
      np.asarray(getattr(default_q['w'], f)), np.asarray(getattr(zero_q['w'], f))
    )


def test_layer_axes_lower_the_error_of_differently_spread_layers():
  rng = np.random.default_rng(6)
  # Light and heavy tails: each layer wants another exponent.
  w = np.stack(
    [
      rng.standard_normal((64, 64)),
      rng.standard_t(2, (64, 64)),
      rng.uniform(-1, 1, (64, 64)),
      rng.laplace(size=(64, 64)),
    ]
  ).astype(np.float32)

  def error(layer_axes):
    q, _ = pqjax.quantize({'w': w}, 3, granularity='tensor', layer_axes=layer_axes)
    w_hat = np.asarray(q['w'].dequantize(), np.float64)
    return float(np.sum((w - w_hat) ** 2))

  assert error(1) < 0.9 * error(0)


@pytest.mark.parametrize('bad', [-1, 1.5, '1', True, None, [1]])
def test_bad_option(bad):
  with pytest.raises(ValueError, match='layer_axes must be a non-negative int'):
    pqjax.quantize({'w': np.ones((2, 4, 4), np.float32)}, 4, layer_axes=bad)


def test_too_many_layer_axes_name_the_leaf():
  params = {'stack': np.ones((2, 4, 4), np.float32), 'w': np.ones((4, 4), np.float32)}
  with pytest.raises(
    ValueError, match=r'^w: layer_axes 1 leaves fewer than 2 axes.*\(4, 4\)'
  ):
    pqjax.quantize(params, 4, layer_axes=1)
  with pytest.raises(ValueError, match=r'^stack: layer_axes 2 .*\(2, 4, 4\)'):
    pqjax.quantize(params, 4, layer_axes=lambda p, x: 2 if p == 'stack' else 0)
  # Leaves left out by the filter are not asked.
  q, _ = pqjax.quantize(params, 4, layer_axes=1, filter=lambda p, x: p == 'stack')
  assert q['stack'].layer_axes == 1 and q['w'] is params['w']


@pytest.mark.parametrize(
  'fn,match',
  [
    (lambda p, x: {'stack': 1}[p], r'^w: the layer_axes function raised KeyError'),
    (lambda p, x: -1, r'^(stack|w): the layer_axes function must return .* got -1'),
    (lambda p, x: 1.0, r'must return a non-negative int, got 1.0'),
    (lambda p, x: None, r'must return a non-negative int, got None'),
  ],
)
def test_bad_layer_axes_function_names_the_leaf(fn, match):
  params = {'stack': np.ones((2, 4, 4), np.float32), 'w': np.ones((4, 4), np.float32)}
  with pytest.raises(ValueError, match=match):
    pqjax.quantize(params, 4, layer_axes=fn)


def test_non_finite_layer_is_named():
  w = _stack((3, 8, 4), seed=7)
  w[2, 1, 1] = np.nan
  with pytest.raises(ValueError, match=r'^w: leaf of shape \(3, 8, 4\) .*NaN.*layer 2'):
    pqjax.quantize({'w': w}, 4, layer_axes=1)


def test_float16_scales_are_one_choice_per_leaf():
  w = _stack((3, 16, 4), seed=8)
  # Every layer fits: float16 scales, as for separate leaves.
  q, _ = _check_equal_to_separate(w, 1, 4, granularity=4)
  assert q.scale.dtype == np.float16
  # One layer's scales are below float16's normal range: the stack keeps float32.
  w[1] *= np.float32(1e-7)
  params_q, _ = pqjax.quantize({'w': w}, 4, granularity=4, layer_axes=1)
  assert params_q['w'].scale.dtype == np.float32
  with pytest.raises(ValueError, match='^w: block scales fall outside the float16'):
    pqjax.quantize({'w': w}, 4, granularity=4, scale_dtype=np.float16, layer_axes=1)


def test_stacked_qarray_works_under_jit_and_tree_utilities():
  w = _stack((4, 16, 8), seed=9)
  params_q, _ = pqjax.quantize({'w': w}, 4, layer_axes=1)
  moved = jax.tree_util.tree_map(lambda x: x, params_q)
  assert moved['w'].layer_axes == 1
  decoded = jax.jit(pqjax.dequantize)(params_q)['w']
  np.testing.assert_array_equal(
    np.asarray(decoded), np.asarray(params_q['w'].dequantize())
  )
  # Slices along the layer axis, as a scan body sees them.
  q = params_q['w']

  def step(carry, fields):
    layer = pqjax.QArray(**fields, bits=4, shape=(16, 8), dtype=q.dtype)
    return carry, layer.dequantize()

  _, layers = jax.lax.scan(step, 0, {f: getattr(q, f) for f in FIELDS})
  np.testing.assert_array_equal(np.asarray(layers), np.asarray(decoded))


def test_bfloat16_stack():
  w = jnp.asarray(_stack((3, 16, 8), seed=10), jnp.bfloat16)
  q, _ = _check_equal_to_separate(w, 1, 4)
  assert q.dtype == jnp.bfloat16
