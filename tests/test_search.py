"""The exponent search against a dense grid evaluated with NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref

import pqjax
from pqjax import search

DENSE = np.round(np.arange(0.05, 2.0 + 1e-9, 0.001), 3)


def _matrix(kind: str, seed: int, shape=(128, 96)) -> np.ndarray:
  rng = np.random.default_rng(seed)
  draw = {'gaussian': rng.standard_normal, 'laplace': rng.laplace,
          'uniform': lambda size: rng.uniform(-1, 1, size=size)}[kind]
  return draw(size=shape).astype(np.float32)


def _dense_best(errors) -> float:
  return min(errors(a) for a in DENSE)


@pytest.mark.parametrize('kind', ['gaussian', 'laplace', 'uniform'])
@pytest.mark.parametrize('bits', [3, 4])
@pytest.mark.parametrize('granularity', ['channel', 'tensor'])
def test_found_exponent_is_within_0p1_percent_of_dense_grid(kind, bits, granularity):
  w = _matrix(kind, seed=bits)
  _, alphas = pqjax.quantize({'w': w}, bits, granularity=granularity)
  ncol = 1 if granularity == 'tensor' else None
  found = ref.power_error(w, alphas['w'], bits, ncol=ncol)
  best = _dense_best(lambda a: ref.power_error(w, a, bits, ncol=ncol))
  assert found <= best * 1.001, (alphas['w'], found, best)


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
  tree = {'g': _matrix('gaussian', 1), 'l': _matrix('laplace', 2, (64, 32)),
          'u': _matrix('uniform', 3, (32, 96))}
  _, alphas = pqjax.quantize(tree, 4, exponent='global')
  assert len(set(alphas.values())) == 1

  def total(a):
    return sum(ref.power_error(w, a, 4) for w in tree.values())

  found = total(alphas['g'])
  assert found <= _dense_best(total) * 1.001


def test_fixed_exponent_is_used_as_given():
  _, alphas = pqjax.quantize({'w': _matrix('gaussian', 0)}, 4, exponent=0.625)
  assert alphas['w'] == 0.625


def test_minimise_handles_a_minimum_at_the_range_edge():
  cfg = search.SearchConfig(lo=0.1, hi=2.0)
  a = search.minimise(lambda a: (a - 0.1) ** 2 + 1.0, (3,), cfg)
  np.testing.assert_allclose(np.asarray(a), 0.1, atol=1e-4)
  a = search.minimise(lambda a: jnp.abs(a - 1.3), (), cfg)
  np.testing.assert_allclose(float(a), 1.3, atol=1e-4)


def test_grid_guard_escapes_a_local_minimum():
  # Two valleys: the golden-section alone from [lo, hi] would settle in the wide,
  # shallow one; the coarse grid finds the deep, narrow one.
  def f(a):
    return jnp.minimum(0.5 + 0.1 * (a - 0.5) ** 2, 0.1 + 2.0 * jnp.abs(a - 1.7))
  a = search.minimise(f, (), search.SearchConfig())
  np.testing.assert_allclose(float(a), 1.7, atol=1e-3)


def test_search_config_rejects_bad_ranges():
  with pytest.raises(ValueError, match='0 < lo < hi'):
    search.SearchConfig(lo=1.0, hi=0.5)
  with pytest.raises(ValueError, match='grid'):
    search.SearchConfig(grid=2)
