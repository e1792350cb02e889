"""Quantizing and decoding leaves sharded over 8 devices.

Run by ``test_sharding.py`` in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX reads the flag once).
Every sharded result is compared with the same leaves quantized on one device.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pqjax
from pqjax._src.search import tiles

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices')

MESHES = {'8': ((8,), ('x',)), '2x4': ((2, 4), ('x', 'y')), '4x2': ((4, 2), ('x', 'y'))}


def _mesh(name):
  shape, axes = MESHES[name]
  return Mesh(np.array(jax.devices()[:8]).reshape(shape), axes)


def _specs(shape):
  """Kernels cut on the input axis (K), the output axis (N) and both."""
  if len(shape) == 1:
    return {'input': P('x', None), 'output': P(None, 'x')}
  specs = {
    'input': P('x', None),
    'output': P(None, 'y'),
    'both': P('x', 'y'),
    'replicated': P(),
  }
  return specs if shape == (4, 2) else {**specs, 'all_on_k': P(('x', 'y'), None)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'dense': rng.standard_normal((256, 96)).astype(np.float32) * 0.05,
    'laplace': rng.laplace(size=(64, 384)).astype(np.float32),
    'big': rng.standard_normal((512, 320)).astype(np.float32),
  }


def _put(params, mesh, spec):
  return {k: jax.device_put(v, NamedSharding(mesh, spec)) for k, v in params.items()}


def _same_sharding(a, b):
  return a.sharding.is_equivalent_to(b.sharding, a.ndim)


def _check_against_one_device(q, ref, alphas, ref_alphas, leaves):
  for name, leaf in leaves.items():
    got, want = q[name], ref[name]
    assert alphas[name] == ref_alphas[name], name
    assert (got.column_scale is None) == (want.column_scale is None), name
    for f in ('codes', 'scale', 'alpha', 'table', 'column_scale'):
      if getattr(want, f) is None:
        continue
      np.testing.assert_array_equal(
        np.asarray(getattr(got, f)), np.asarray(getattr(want, f)), err_msg=f'{name}.{f}'
      )
    spec = P(*leaf.sharding.spec, *(None,) * (leaf.ndim - len(leaf.sharding.spec)))
    mesh = leaf.sharding.mesh
    assert got.codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), 2), name
    ncol, nk = got.scale.shape[1], got.scale.shape[0]
    want_scale = P(spec[0] if nk > 1 else None, spec[1] if ncol > 1 else None)
    assert got.scale.sharding.is_equivalent_to(NamedSharding(mesh, want_scale), 2), name
    if got.column_scale is not None:
      # uint8 scales: one column scale per column, sharded as the columns.
      want_column = NamedSharding(mesh, P(None, spec[1] if ncol > 1 else None))
      assert got.column_scale.sharding.is_equivalent_to(want_column, 2), name
    decoded = jax.jit(lambda x: x.dequantize())(got)
    assert _same_sharding(decoded, leaf), (name, decoded.sharding, leaf.sharding)
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(want.dequantize()))


@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_quantize_matches_one_device(mesh_name):
  mesh = _mesh(mesh_name)
  params = _params()
  ref, ref_alphas = pqjax.quantize(params, 4)
  for label, spec in _specs(MESHES[mesh_name][0]).items():
    leaves = _put(params, mesh, spec)
    q, alphas = pqjax.quantize(leaves, 4)
    _check_against_one_device(q, ref, alphas, ref_alphas, leaves)
    assert all(v is not None for v in alphas.values()), label


@pytest.mark.parametrize(
  'bits,granularity,specs',
  [
    (3, 'channel', (P('x', 'y'), P('x', None))),
    (8, 'tensor', (P('x', 'y'),)),
    (2, 16, (P('x', 'y'), P(None, 'y'))),
  ],
)
def test_bits_and_granularities(bits, granularity, specs):
  mesh = _mesh('2x4')
  params = _params(1)
  if granularity == 16:  # 16 and 32 blocks a column: uint8 scales; 4: float16
    ref, _ = pqjax.quantize(params, bits, granularity=granularity)
    assert [ref[k].scale.dtype for k in ('dense', 'laplace', 'big')] == [
      np.uint8,
      np.float16,
      np.uint8,
    ]
  ref, ref_alphas = pqjax.quantize(params, bits, granularity=granularity)
  for spec in specs:
    leaves = _put(params, mesh, spec)
    q, alphas = pqjax.quantize(leaves, bits, granularity=granularity)
    _check_against_one_device(q, ref, alphas, ref_alphas, leaves)


@pytest.mark.parametrize('spec', [P('x', 'y'), P(None, 'y')])
def test_bit_budget_matches_one_device(spec):
  # Widths 5 to 7 pack 8 codes in ``bits`` bytes: a K shard must hold whole units.
  # (A narrow range: a budget compiles the encoding at every width of it.)
  params = _params(2)
  ref, ref_alphas = pqjax.quantize(params, bits=(4, 6), bits_per_weight=4.4)
  widths = {k: x.bits for k, x in ref.items()}
  assert len(set(widths.values())) > 1
  leaves = _put(params, _mesh('2x4'), spec)
  q, alphas = pqjax.quantize(leaves, bits=(4, 6), bits_per_weight=4.4)
  assert {k: x.bits for k, x in q.items()} == widths
  _check_against_one_device(q, ref, alphas, ref_alphas, leaves)


def test_bounded_tiles_match_one_device(monkeypatch):
  # Large layers are cut into more than 8 x 8 tiles (tiles.TILE_WEIGHTS); a shape of
  # its own, as compiled programs are cached by shape.
  monkeypatch.setattr(tiles, 'TILE_WEIGHTS', 512)
  assert tiles.counts(640, 136) == (32, 8)
  params = {'tall': np.random.default_rng(3).standard_t(3, (640, 136)).astype(np.float32)}
  ref, ref_alphas = pqjax.quantize(params, 4)
  for spec in (P('x', None), P(('x', 'y'), None), P('x', 'y')):
    leaves = _put(params, _mesh('2x4'), spec)
    q, alphas = pqjax.quantize(leaves, 4)
    _check_against_one_device(q, ref, alphas, ref_alphas, leaves)


def test_subnormal_weights_warn_as_on_one_device():
  # Blocks of subnormal weights decode to zeros; the warning names them wherever the
  # block's maximum is reduced across devices.
  w = np.random.default_rng(4).standard_normal((64, 32)).astype(np.float32) * 1e-39
  w[:, :8] *= 1e38  # normal columns
  with pytest.warns(UserWarning, match='smallest normal') as want:
    pqjax.quantize({'w': w}, 4)
  for spec in (P('x', 'y'), P('x', None), P(('x', 'y'), None), P(None, 'y'), P()):
    leaves = _put({'w': w}, _mesh('2x4'), spec)
    with pytest.warns(UserWarning, match='smallest normal') as got:
      pqjax.quantize(leaves, 4)
    assert [str(r.message) for r in got] == [str(r.message) for r in want], spec


def test_conv_kernel_and_global_exponent():
  mesh = _mesh('4x2')
  rng = np.random.default_rng(2)
  params = {
    'conv': rng.standard_normal((4, 3, 8, 64)).astype(np.float32),
    'dense': rng.standard_normal((128, 32)).astype(np.float32),
  }
  ref, ref_alphas = pqjax.quantize(params, 4, exponent='global')
  leaves = {
    'conv': jax.device_put(params['conv'], NamedSharding(mesh, P('x', None, None, 'y'))),
    'dense': jax.device_put(params['dense'], NamedSharding(mesh, P(None, 'x'))),
  }
  q, alphas = pqjax.quantize(leaves, 4, exponent='global')
  for name in params:
    assert alphas[name] == ref_alphas[name]
    np.testing.assert_array_equal(np.asarray(q[name].codes), np.asarray(ref[name].codes))
    decoded = jax.jit(pqjax.dequantize)(q)[name]
    assert _same_sharding(decoded, leaves[name])
