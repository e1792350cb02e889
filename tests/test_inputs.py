"""quantize on inputs at the edges: x64 mode, empty leaves, extreme scales, tracers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax
from tests import reference as ref


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'a': rng.standard_normal((64, 32)).astype(np.float32),
    'b': rng.laplace(size=(3, 3, 4, 16)).astype(np.float32),
    'c': rng.standard_normal((40, 8)).astype(np.float32) * 0.01,
    'bias': rng.standard_normal(8).astype(np.float32),
  }


def _rel(tree, params_q):
  """Relative error over the quantized leaves, in float64 NumPy."""
  decoded = pqjax.dequantize(params_q)
  num = den = 0.0
  for name, w in tree.items():
    if isinstance(params_q[name], pqjax.QArray):
      w = np.asarray(w, np.float64)
      num += np.sum((np.asarray(decoded[name], np.float64) - w) ** 2)
      den += np.sum(w**2)
  return num / den


def _fields(params_q):
  """Every stored array of the quantized leaves, as NumPy, by path and field."""
  return {
    (p, f): np.asarray(getattr(q, f))
    for p, q in pqjax.quantized_leaves(params_q).items()
    for f in ('codes', 'scale', 'alpha', 'table')
  }


# --- jax_enable_x64 -----------------------------------------------------------------


@pytest.fixture
def x64():
  """Turns on jax_enable_x64 as a user would, and restores it."""
  before = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    yield
  finally:
    jax.config.update('jax_enable_x64', before)


OPTIONS = [
  {},
  {'exponent': 'global', 'granularity': 8},
  {'clip': 'block', 'granularity': 'tensor', 'grid': 'symmetric'},
  {'exponent': 0.6, 'clip': False},
]


@pytest.mark.parametrize('options', OPTIONS)
def test_x64_gives_the_same_codes(options):
  tree = {**_tree(), 'd': np.random.default_rng(1).standard_normal((16, 8))}  # float64
  want_q, want_alphas = pqjax.quantize(tree, 3, **options)
  float32 = lambda q: {n: q[n] for n in ('a', 'b', 'c')}
  want_decoded = pqjax.dequantize(float32(want_q))
  before = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  try:
    got_q, got_alphas = pqjax.quantize(tree, 3, **options)
    got_decoded = pqjax.dequantize(float32(got_q))
  finally:
    jax.config.update('jax_enable_x64', before)
  assert got_alphas == want_alphas
  want, got = _fields(want_q), _fields(got_q)
  assert want.keys() == got.keys()
  for key, x in want.items():
    assert got[key].dtype == x.dtype, key  # no 64-bit field leaks in
    np.testing.assert_array_equal(got[key], x, err_msg=str(key))
  for name in ('a', 'b', 'c'):
    np.testing.assert_array_equal(np.asarray(got_decoded[name]), want_decoded[name])
  assert got_q['d'].dtype == np.float64


def test_x64_dequantize_and_summary(x64):
  params_q, _ = pqjax.quantize({'w': jnp.asarray(_tree()['a'], jnp.float32)}, 4)
  q = params_q['w']
  assert {
    np.dtype(getattr(q, f).dtype).itemsize for f in ('scale', 'alpha', 'table')
  } == {4}
  assert pqjax.dequantize(params_q)['w'].dtype == np.float32
  assert pqjax.summary(params_q).leaves[0].bits == 4


# --- leaves with no elements ---------------------------------------------------------


@pytest.mark.parametrize('shape', [(0, 8), (8, 0), (0, 3, 3, 4)])
def test_zero_size_leaves_pass_through(tmp_path, shape):
  empty = np.zeros(shape, np.float32)
  tree = {'empty': empty, 'w': _tree()['a'], 'half': jnp.zeros(shape, jnp.bfloat16)}
  for options in ({}, {'exponent': 'global'}, {'filter': lambda path, leaf: True}):
    params_q, alphas = pqjax.quantize(tree, 4, **options)
    assert params_q['empty'] is empty and alphas['empty'] is None
    assert params_q['half'] is tree['half'] and alphas['half'] is None
    assert isinstance(params_q['w'], pqjax.QArray)
  decoded = pqjax.dequantize(params_q)
  assert decoded['empty'].shape == shape and decoded['half'].dtype == jnp.bfloat16
  s = pqjax.summary(params_q)
  assert len(s.leaves) == 1 and s.float_leaves == 2 and s.float_bytes == 0
  for path in (tmp_path / 'q.safetensors', tmp_path / 'q_orbax'):
    pqjax.save(path, params_q)
    loaded = pqjax.load(path)
    assert loaded['empty'].shape == shape and loaded['empty'].dtype == np.float32
    assert loaded['half'].shape == shape and loaded['half'].dtype == jnp.bfloat16
    np.testing.assert_array_equal(loaded['w'].codes, params_q['w'].codes)


def test_only_zero_size_leaves():
  tree = {'e': np.zeros((0, 8), np.float32)}
  params_q, alphas = pqjax.quantize(tree, 4, exponent='global')
  assert params_q['e'] is tree['e'] and alphas == {'e': None}


# --- the weights' scale --------------------------------------------------------------

SCALE_OPTIONS = [
  {},
  {'exponent': 'global'},
  {'granularity': 8},
  {'granularity': 'tensor', 'clip': 'block'},
  {'grid': 'symmetric', 'clip': False},
]


# At 1e-37 the small leaf c holds float32 subnormals only, which decode to zeros.
@pytest.mark.filterwarnings('ignore:pqjax.quantize:UserWarning')
@pytest.mark.parametrize('options', SCALE_OPTIONS)
def test_relative_error_does_not_depend_on_the_scale(options):
  tree = _tree()
  base = _rel(tree, pqjax.quantize(tree, 4, **options)[0])
  assert 0 < base < 0.05
  for k in (-37, -36, -30, -20, -10, 10, 19, 20, 30, 36, 37):
    s = np.float32(10.0**k)
    scaled = {n: (w * s).astype(np.float32) for n, w in tree.items()}
    params_q = pqjax.quantize(scaled, 4, **options)[0]
    err = _rel(scaled, params_q)
    assert pqjax.relative_error(scaled, params_q) == pytest.approx(err, rel=1e-6)
    # At 1e-37 the smallest weights are float32 subnormals, which count as zeros.
    tol = 0.05 if k == -37 else 1e-3
    assert abs(err / base - 1) < tol, (k, err, base)


@pytest.mark.parametrize('options', SCALE_OPTIONS)
def test_power_of_two_scales_give_the_same_codes(options):
  # Multiplying by 2 ** k is exact, so every code and exponent is the same and the
  # scales are multiplied by 2 ** k, at any normal magnitude (float32 scales:
  # float16 ones cannot follow).
  options = {**options, 'scale_dtype': np.float32}
  tree = _tree()
  want_q, want_alphas = pqjax.quantize(tree, 4, **options)
  want = _fields(want_q)
  for k in (-100, -70, 70, 100):
    scaled = {n: w * np.float32(2.0**k) for n, w in tree.items()}
    got_q, got_alphas = pqjax.quantize(scaled, 4, **options)
    assert got_alphas == want_alphas, k
    for (path, field), x in _fields(got_q).items():
      ref = want[(path, field)]
      if field == 'scale':
        ref = ref * np.float32(2.0**k)
      np.testing.assert_array_equal(x, ref, err_msg=f'{k} {path} {field}')


def test_global_exponent_weighs_layers_by_their_scale():
  # One layer 1e30 times larger than the other, beyond float32's range when
  # squared: the shared exponent is the large layer's best, as a dense NumPy grid
  # over the exponent finds it, and the small layer does not matter.
  tree = _tree()
  big = {'a': tree['a'] * np.float32(1e25), 'c': tree['c'] * np.float32(1e-5)}
  _, alphas = pqjax.quantize(big, 4, exponent='global', clip=False, grid='symmetric')
  assert alphas['a'] == alphas['c']
  dense = min(ref.power_error(tree['a'], a, 4) for a in np.arange(0.05, 2.0, 0.001))
  assert ref.power_error(tree['a'], alphas['a'], 4) <= 1.001 * dense


def test_subnormal_leaf_warns_that_it_decodes_to_zeros():
  w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  tiny = w * np.float32(1e-40)  # every nonzero weight a float32 subnormal
  assert np.all(np.abs(tiny) < np.finfo(np.float32).tiny) and np.any(tiny != 0)
  with pytest.warns(UserWarning, match=r'decode to zeros: tiny \(8 of 8 blocks\)'):
    params_q, _ = pqjax.quantize({'tiny': tiny, 'w': w}, 4)
  assert np.all(np.asarray(params_q['tiny'].dequantize()) == 0)
  with pytest.warns(UserWarning, match=r'tiny \(1 of 1 blocks\)'):
    pqjax.quantize({'tiny': tiny}, 4, granularity='tensor')


def test_normal_weights_do_not_warn(recwarn):
  pqjax.quantize(_tree(), 4)
  pqjax.quantize({'z': np.zeros((8, 8), np.float32)}, 4)  # exact zeros stay zeros
  assert not [w for w in recwarn if 'decode to zeros' in str(w.message)]


# --- leaves without values -----------------------------------------------------------


def test_shape_dtype_struct_leaf_is_named():
  tree = {'enc': {'w': jax.ShapeDtypeStruct((8, 8), jnp.float32)}, 'b': np.ones(3)}
  with pytest.raises(TypeError, match=r'^enc/w: a jax.ShapeDtypeStruct .* no values'):
    pqjax.quantize(tree, 4)


@pytest.mark.parametrize(
  'transform',
  [
    lambda f, p: jax.jit(f)(p),
    lambda f, p: jax.eval_shape(f, p),
    lambda f, p: jax.vmap(f)(jax.tree.map(lambda x: x[None], p)),
    lambda f, p: jax.grad(lambda p: jnp.sum(pqjax.dequantize(f(p))['enc']['w']))(p),
  ],
  ids=['jit', 'eval_shape', 'vmap', 'grad'],
)
def test_traced_leaf_is_named(transform):
  params = {'bias': np.ones(4, np.float32), 'enc': {'w': np.ones((8, 8), np.float32)}}
  with pytest.raises(TypeError, match=r'^enc/w: got a traced value .* runs eagerly'):
    transform(lambda p: pqjax.quantize(p, 4)[0], params)


def test_nnx_state_with_dropout_rngs_quantizes():
  class Model(nnx.Module):
    def __init__(self):
      self.linear = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
      self.drop = nnx.Dropout(0.1, rngs=nnx.Rngs(0))

  _, state = nnx.split(Model())
  state_q, alphas = pqjax.quantize(state, 4)
  assert isinstance(state_q['linear']['kernel'].get_value(), pqjax.QArray)
  key = state_q['drop']['rngs']['key'].get_value()
  assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
