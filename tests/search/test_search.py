"""The exponent search against a dense grid evaluated with NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax._src.search import config, optimiser
from tests import reference as ref

DENSE = np.round(np.arange(0.05, 2.0 + 1e-9, 0.001), 3)


def _matrix(kind: str, seed: int, shape=(128, 96)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  draw = {
    'gaussian': rng.standard_normal,
    'laplace': rng.laplace,
    'uniform': lambda size: rng.uniform(-1, 1, size=size),
  }[kind]
  return draw(size=shape).astype(np.float32)


def _dense_best(errors) -> float:
  return min(errors(a) for a in DENSE)


@pytest.mark.parametrize('kind', ['gaussian', 'laplace', 'uniform'])
@pytest.mark.parametrize('bits', [3, 4])
@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_found_exponent_is_within_0p1_percent_of_dense_grid(kind, bits, granularity):
  w = _matrix(kind, seed=bits)
  _, alphas = pqjax.quantize(
    {'w': w}, bits, granularity=granularity, grid='symmetric', clip=False
  )
  ncol = 1 if granularity == 'tensor' else None
  found = ref.power_error(w, alphas['w'], bits, ncol=ncol)
  best = _dense_best(lambda a: ref.power_error(w, a, bits, ncol=ncol))
  assert found <= best * 1.001, (alphas['w'], found, best)


@pytest.mark.parametrize('kind', ['gaussian', 'laplace', 'uniform'])
@pytest.mark.parametrize('bits', [7, 8])
def test_many_levels_on_large_layers_within_0p1_percent_of_dense_grid(kind, bits):
  # 2**17 weights: the binned error alone (no exact refinement). Grid bins wider
  # than the levels' spacing once started the search at 0.6 on uniform weights
  # at 8 bits, which ended at 0.69 with 1.3x the error of exponent 1.
  w = _matrix(kind, seed=bits, shape=(512, 256))
  _, alphas = pqjax.quantize({'w': w}, bits, grid='symmetric', clip=False)
  found = ref.power_error(w, alphas['w'], bits)
  best = min(ref.power_error(w, a, bits) for a in np.arange(0.4, 1.4, 0.002))
  assert found <= best * 1.001, (alphas['w'], found, best)


def test_uniform_weights_at_8_bits_beat_round_to_nearest():
  w = _matrix('uniform', 0, (512, 256))
  q, _ = pqjax.quantize({'w': w}, 8)
  plain, _ = pqjax.quantize({'w': w}, 8, exponent=1.0, clip=False)
  assert pqjax.relative_error({'w': w}, q) <= pqjax.relative_error({'w': w}, plain)


def test_gaussian_weights_at_4_bits_want_an_exponent_below_one():
  for seed in range(3):
    _, alphas = pqjax.quantize({'w': _matrix('gaussian', seed, (256, 256))}, 4)
    assert alphas['w'] < 1.0


def test_uniform_weights_want_an_exponent_near_one():
  _, alphas = pqjax.quantize({'w': _matrix('uniform', 0, (256, 256))}, 4)
  assert 0.8 < alphas['w'] < 1.25


def test_layers_of_one_shape_are_searched_independently():
  rng = np.random.default_rng(0)
  g = rng.standard_normal((64, 64)).astype(np.float32)
  u = rng.uniform(-1, 1, (64, 64)).astype(np.float32)
  _, alone_g = pqjax.quantize({'g': g}, 4)
  _, alone_u = pqjax.quantize({'u': u}, 4)
  _, both = pqjax.quantize({'g': g, 'u': u}, 4)
  assert both == {'g': alone_g['g'], 'u': alone_u['u']}


def test_global_exponent_is_within_0p1_percent_of_dense_grid():
  tree = {
    'g': _matrix('gaussian', 1),
    'l': _matrix('laplace', 2, (64, 32)),
    'u': _matrix('uniform', 3, (32, 96)),
  }
  _, alphas = pqjax.quantize(tree, 4, exponent='global', grid='symmetric', clip=False)
  assert len(set(alphas.values())) == 1

  def total(a):
    return sum(ref.power_error(w, a, 4) for w in tree.values())

  found = total(alphas['g'])
  assert found <= _dense_best(total) * 1.001


def test_fixed_exponent_is_used_as_given():
  _, alphas = pqjax.quantize({'w': _matrix('gaussian', 0)}, 4, exponent=0.625)
  assert alphas['w'] == 0.625


def _minimise_alpha(f, n, cfg):
  plan = config.Plan(search_clip=False)
  one = jnp.ones((n,), jnp.float32)
  return optimiser.minimise(lambda a, c: f(a), one, one, plan, cfg)[0]


def test_minimise_handles_a_minimum_at_the_range_edge():
  cfg = pqjax.SearchConfig(lo=0.1, hi=2.0)
  a = _minimise_alpha(lambda a: (a - 0.1) ** 2 + 0.01, 3, cfg)
  np.testing.assert_allclose(np.asarray(a), 0.1, atol=1e-4)
  a = _minimise_alpha(lambda a: jnp.abs(a - 1.3), 1, cfg)
  np.testing.assert_allclose(np.asarray(a), 1.3, atol=1e-4)


def test_grid_guard_escapes_a_local_minimum():
  # Two valleys: the golden-section alone from [lo, hi] would settle in the wide,
  # shallow one; the coarse grid finds the deep, narrow one.
  def f(a):
    return jnp.minimum(0.5 + 0.1 * (a - 0.5) ** 2, 0.1 + 2.0 * jnp.abs(a - 1.7))

  a = _minimise_alpha(f, 1, pqjax.SearchConfig())
  np.testing.assert_allclose(np.asarray(a), 1.7, atol=1e-3)


def test_minimise_finds_a_joint_optimum_in_exponent_and_clip():
  # A tilted valley: the best clip depends on the exponent.
  f = lambda a, c: (a - 0.7) ** 2 + 4 * (c - 0.55 - 0.2 * a) ** 2
  one = jnp.ones((2,), jnp.float32)
  a, c = optimiser.minimise(f, one, one, config.Plan(), pqjax.SearchConfig())
  np.testing.assert_allclose(np.asarray(a), 0.7, atol=2e-3)
  np.testing.assert_allclose(np.asarray(c), 0.69, atol=2e-3)


def test_search_config_rejects_bad_ranges():
  with pytest.raises(ValueError, match='0 < lo < hi'):
    pqjax.SearchConfig(lo=1.0, hi=0.5)
  with pytest.raises(ValueError, match='exponent_points'):
    pqjax.SearchConfig(exponent_points=2)


def _dense_best_2d(err, a_range=(0.05, 2.0), c_range=(0.3, 1.0)) -> tuple[float, tuple]:
  """Best of a coarse grid, then of a dense one (step 0.002) around it."""
  coarse = [
    (err(a, c), a, c)
    for a in np.arange(*a_range, 0.05)
    for c in np.arange(c_range[0], c_range[1] + 1e-9, 0.05)
  ]
  _, a0, c0 = min(coarse)
  dense = [
    (err(a, c), a, c)
    for a in np.arange(max(a0 - 0.06, a_range[0]), a0 + 0.06, 0.002)
    for c in np.arange(max(c0 - 0.06, c_range[0]), min(c0 + 0.06, 1.0) + 1e-9, 0.002)
  ]
  best = min(coarse + dense)
  return best[0], best[1:]


@pytest.mark.parametrize(
  'kind,bits,grid,granularity',
  [
    ('gaussian', 4, 'full', 'channel'),
    ('laplace', 3, 'full', 'channel'),
    ('gaussian', 3, 'symmetric', 'tensor'),
    ('laplace', 4, 'full', 'tensor'),
    ('uniform', 4, 'full', 'channel'),
    ('gaussian', 4, 'full', 16),
  ],
)
def test_exponent_and_clip_within_0p1_percent_of_dense_grid(
  kind, bits, grid, granularity
):
  w = _matrix(kind, seed=bits, shape=(64, 48))
  group = granularity if isinstance(granularity, int) else None
  per_column = granularity != 'tensor'
  params_q, _ = pqjax.quantize(
    {'w': w}, bits, granularity=granularity, grid=grid, clip=True, scale_dtype='float32'
  )
  found = float(np.sum((np.asarray(params_q['w'].dequantize(), np.float64) - w) ** 2))
  best, at = _dense_best_2d(
    lambda a, c: ref.quantize_error(w, a, bits, grid, c, group, per_column)
  )
  assert found <= best * 1.001, (found, best, at)


def test_global_exponent_with_clipping_within_0p1_percent_of_dense_grid():
  tree = {
    'g': _matrix('gaussian', 1, (64, 48)),
    'l': _matrix('laplace', 2, (48, 32)),
    'u': _matrix('uniform', 3, (32, 40)),
  }
  params_q, alphas = pqjax.quantize(
    tree, 4, exponent='global', clip=True, scale_dtype='float32'
  )
  assert len(set(alphas.values())) == 1
  found = sum(
    float(np.sum((np.asarray(q.dequantize(), np.float64) - tree[k]) ** 2))
    for k, q in params_q.items()
  )
  clips = np.arange(0.3, 1.0 + 1e-9, 0.01)

  def total(a):  # each layer keeps its own best clip ratio
    return sum(
      min(ref.quantize_error(w, a, 4, 'full', c) for c in clips) for w in tree.values()
    )

  coarse = min((total(a), a) for a in np.arange(0.3, 1.5, 0.05))[1]
  best = min(total(a) for a in np.arange(coarse - 0.05, coarse + 0.05, 0.005))
  assert found <= best * 1.001, (found, best)


def test_block_clipping_is_no_worse_than_layer_clipping():
  w = _matrix('laplace', 5, (256, 64))
  for granularity in ('channel', 32):
    errs = []
    for clip in (False, True, 'block'):
      params_q, _ = pqjax.quantize(
        {'w': w}, 4, granularity=granularity, clip=clip, scale_dtype='float32'
      )
      errs.append(float(np.sum((np.asarray(params_q['w'].dequantize()) - w) ** 2)))
    assert errs[0] > errs[1] >= errs[2], errs
