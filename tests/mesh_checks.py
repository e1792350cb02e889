"""Products, checkpoints, stacked layers and explicit meshes on 8 devices.

Run by ``test_mesh.py`` in a fresh interpreter with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (JAX reads the flag once),
beside ``sharding_checks.py``. Every sharded result is compared with the same
leaves on one device.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pqjax
from pqjax._src import sharding
from pqjax._src.core import blocks
from pqjax._src.encoding import EncodeSpec
from tests.sharding_checks import (
  _check_against_one_device,
  _mesh,
  _params,
  _put,
  _same_sharding,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices')


def test_wrapped_apply_on_sharded_params_and_inputs():
  mesh = _mesh('2x4')
  rng = np.random.default_rng(3)
  params = {
    'w1': rng.standard_normal((64, 256)).astype(np.float32) * 0.1,
    'b1': np.zeros(256, np.float32),
    'w2': rng.standard_normal((256, 32)).astype(np.float32) * 0.1,
  }
  x = rng.standard_normal((16, 64)).astype(np.float32)

  def apply(p, x):
    return jax.nn.relu(x @ p['w1'] + p['b1']) @ p['w2']

  ref_q, _ = pqjax.quantize(params, 4)
  # Megatron-style: the first kernel cut on its outputs, the second on its inputs.
  sharded = {
    'w1': jax.device_put(params['w1'], NamedSharding(mesh, P(None, 'y'))),
    'b1': jax.device_put(params['b1'], NamedSharding(mesh, P('y'))),
    'w2': jax.device_put(params['w2'], NamedSharding(mesh, P('y', None))),
  }
  params_q, _ = pqjax.quantize(sharded, 4)
  for rows in (16, 1):  # the decode path, and the codes read inside the product
    xs = jax.device_put(x[:rows], NamedSharding(mesh, P('x' if rows > 1 else None, None)))
    for act_bits, products in ((None, 'auto'), (8, 'auto'), (None, 'native')):
      if products == 'native' and not pqjax.native_status().loaded:
        continue
      wrapped = pqjax.wrap(apply, act_bits=act_bits, products=products)
      fn = jax.jit(wrapped)
      want = np.asarray(fn(ref_q, x[:rows]))
      got = fn(params_q, xs)
      # The decoded weights are identical; the sharded product sums in another order.
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
      # Inside the mesh, the automatic choice keeps sharded codes on the XLA paths.
      with jax.set_mesh(mesh):
        paths = {u.path for u in pqjax.quantized_products(wrapped, params_q, xs)}
      assert 'native' not in paths or products == 'native', paths
    ref_float = apply(pqjax.dequantize(ref_q), x[:rows])
    want = np.asarray(jax.jit(pqjax.wrap(apply))(ref_q, x[:rows]))
    np.testing.assert_allclose(want, np.asarray(ref_float), rtol=1e-5, atol=1e-5)


def _collectives(hlo):
  """``(op, element count)`` of every collective in an HLO module's text."""
  out = []
  for m in re.finditer(
    r'= ([a-z0-9]+)\[([0-9,]*)\][^=]*? (all-gather|all-reduce|'
    r'all-to-all|collective-permute|reduce-scatter)(-start)?\(',
    hlo,
  ):
    dims = [int(d) for d in m.group(2).split(',') if d]
    out.append((m.group(3), int(np.prod(dims)) if dims else 1))
  return out


@pytest.mark.parametrize('spec', [P('x', 'y'), P(None, 'y'), P(('x', 'y'), None)])
def test_compiled_passes_move_no_weights(spec):
  """The stats and encoding programs move histograms and scales, never weights."""
  mesh = _mesh('2x4')
  k, n = 2048, 1024
  leaves = (jax.device_put(jnp.ones((k, n), jnp.float32), NamedSharding(mesh, spec)),)
  layout = sharding.layout_of('w', leaves[0])
  b = blocks.blocks_for((k, n), 'channel')
  stats_hlo = (
    sharding.group_stats.lower(leaves, layout=layout, k=k, n=n, nk=b.nk, ncol=b.ncol)
    .compile()
    .as_text()
  )
  shard = k * n // 8
  found = _collectives(stats_hlo)
  assert found, 'the statistics are reduced across shards'
  assert max(size for _, size in found) < shard, found
  _, absmax, _ = sharding.group_stats(
    leaves, layout=layout, k=k, n=n, nk=b.nk, ncol=b.ncol
  )
  one = jnp.ones((1,), jnp.float32)
  encode_hlo = (
    sharding.encode_layers.lower(
      leaves,
      one,
      one,
      absmax,
      jnp.zeros((1,), jnp.int8),  # float32 scales
      spec=EncodeSpec(
        k=k,
        n=n,
        nk=b.nk,
        bits=4,
        grid='full',
        block_clip=False,
        config=pqjax.SearchConfig(),
      ),
      layout=layout,
      layers=((),),
    )
    .compile()
    .as_text()
  )
  assert not [c for c in _collectives(encode_hlo) if c[1] >= n], encode_hlo[:2000]
  assert 'all-gather' not in encode_hlo


def test_orbax_round_trip_onto_the_mesh(tmp_path):
  mesh = _mesh('2x4')
  params = _put(_params(4), mesh, P('x', 'y'))
  params_q, _ = pqjax.quantize(params, 4)
  pqjax.save_orbax(tmp_path / 'q', params_q)
  target = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params_q
  )
  restored = pqjax.load_orbax(tmp_path / 'q', target=target)
  for name in params:
    for f in ('codes', 'scale', 'alpha', 'table'):
      got, want = getattr(restored[name], f), getattr(params_q[name], f)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, f)
  # Onto another layout: the restored codes take the target's sharding.
  other = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=NamedSharding(mesh, P(None, 'x') if a.ndim == 2 else P())
    ),
    params_q,
  )
  moved = pqjax.load_orbax(tmp_path / 'q', target=other)
  assert moved['big'].codes.sharding.spec == P(None, 'x')
  np.testing.assert_array_equal(
    np.asarray(moved['big'].codes), np.asarray(params_q['big'].codes)
  )
  unsharded = pqjax.load_orbax(tmp_path / 'q')
  np.testing.assert_array_equal(
    np.asarray(unsharded['dense'].codes), np.asarray(params_q['dense'].codes)
  )


@pytest.mark.parametrize('fmt', ['shards', 'safetensors'])
def test_safetensors_and_shards_load_onto_the_mesh(tmp_path, fmt):
  mesh = _mesh('2x4')
  params_q, _ = pqjax.quantize(_put(_params(5), mesh, P('x', 'y')), 4)
  path = tmp_path / ('q' if fmt == 'shards' else 'q.safetensors')
  pqjax.save(path, params_q, format=fmt)
  target = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params_q
  )
  restored = pqjax.load(path, target=target)
  for name in params_q:
    for f in ('codes', 'scale', 'alpha', 'table'):
      got, want = getattr(restored[name], f), getattr(params_q[name], f)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, f)
  wrong = dict(target)
  del wrong['big']
  with pytest.raises(pqjax.CheckpointError, match='target does not match'):
    pqjax.load(path, target=wrong)


def test_unsupported_layouts_name_the_leaf():
  mesh = _mesh('2x4')
  rng = np.random.default_rng(5)
  w = rng.standard_normal((24, 16)).astype(np.float32)
  # 3 bits pack 8 rows to a unit; 24 rows over 4 shards leaves 6 a shard.
  leaf = jax.device_put(
    w, NamedSharding(Mesh(np.array(jax.devices()[:4]), ('k',)), P('k', None))
  )
  with pytest.raises(ValueError, match=r'w: at 3 bits codes are packed 8 rows'):
    pqjax.quantize({'w': leaf}, 3)
  with pytest.raises(ValueError, match=r'w: groups of 8 rows do not tile'):
    pqjax.quantize(
      {'w': jax.device_put(w, NamedSharding(mesh, P('x', None)))}, 4, granularity=8
    )
  with pytest.raises(ValueError, match=r'w: clip="block" needs each scale block'):
    pqjax.quantize(
      {'w': jax.device_put(w, NamedSharding(mesh, P('x', None)))}, 4, clip='block'
    )
  conv = jax.device_put(
    rng.standard_normal((3, 4, 8)).astype(np.float32),
    NamedSharding(mesh, P(None, 'y', None)),
  )
  with pytest.raises(ValueError, match=r'w: sharding .* contiguous'):
    pqjax.quantize({'w': conv}, 4)


def _layers(shape, seed):
  """Stacked layers of different spreads."""
  rng = np.random.default_rng(seed)
  *layers, k, n = shape
  count = int(np.prod(layers))
  w = rng.standard_normal((count, k, n)).astype(np.float32)
  return (w * (1.5 ** np.arange(count, dtype=np.float32))[:, None, None]).reshape(shape)


@pytest.mark.parametrize(
  'spec,layer_axes,shape,options',
  [
    (P('x', None, 'y'), 1, (4, 64, 96), {}),
    (P('x', None, None), 1, (6, 64, 48), {'exponent': 'global'}),
    (P('x', 'y', None), 1, (4, 64, 96), {'granularity': 16, 'grid': 'symmetric'}),
    (P(('x', 'y'), None, None), 1, (8, 32, 48), {'clip': 'block', 'granularity': 8}),
    (P('x', 'y', None, None), 2, (2, 4, 32, 48), {'granularity': 'tensor'}),
  ],
)
def test_stacked_layers_sharded_over_their_layer_axes(spec, layer_axes, shape, options):
  """Layers on different devices: each quantized where it lies, as on one device."""
  mesh = _mesh('2x4')
  w = _layers(shape, 6)
  ref, ref_alphas = pqjax.quantize({'w': w}, 4, layer_axes=layer_axes, **options)
  leaf = jax.device_put(w, NamedSharding(mesh, spec))
  q, alphas = pqjax.quantize({'w': leaf}, 4, layer_axes=layer_axes, **options)
  np.testing.assert_array_equal(alphas['w'], ref_alphas['w'])
  got, want = q['w'], ref['w']
  assert got.layer_axes == layer_axes
  for f in ('codes', 'scale', 'alpha', 'table'):
    np.testing.assert_array_equal(
      np.asarray(getattr(got, f)), np.asarray(getattr(want, f)), err_msg=f
    )
  assert got.codes.sharding.is_equivalent_to(NamedSharding(mesh, spec), got.codes.ndim)
  nk, ncol = got.scale.shape[-2:]
  lspec = tuple(spec)[:layer_axes]
  k_axis, n_axis = tuple(spec)[layer_axes], tuple(spec)[-1]
  want_scale = P(*lspec, k_axis if nk > 1 else None, n_axis if ncol > 1 else None)
  assert got.scale.sharding.is_equivalent_to(
    NamedSharding(mesh, want_scale), got.scale.ndim
  ), got.scale.sharding
  decoded = jax.jit(lambda x: x.dequantize())(got)
  assert _same_sharding(decoded, leaf), (decoded.sharding, leaf.sharding)
  np.testing.assert_array_equal(np.asarray(decoded), np.asarray(want.dequantize()))


def test_stacked_layers_orbax_round_trip_and_rules(tmp_path):
  mesh = _mesh('2x4')
  leaf = jax.device_put(_layers((4, 32, 48), 7), NamedSharding(mesh, P('x', None, 'y')))
  params_q, _ = pqjax.quantize({'w': leaf}, 4, layer_axes=1)
  pqjax.save_orbax(tmp_path / 'q', params_q)
  target = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params_q
  )
  restored = pqjax.load_orbax(tmp_path / 'q', target=target)
  assert restored['w'].layer_axes == 1
  for f in ('codes', 'scale', 'alpha', 'table'):
    got, want = getattr(restored['w'], f), getattr(params_q['w'], f)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), f
  # Inside a layer, K is cut only along its first axis longer than 1.
  conv = jax.device_put(
    np.ones((2, 3, 4, 8), np.float32), NamedSharding(mesh, P('x', None, 'y', None))
  )
  with pytest.raises(ValueError, match=r'^w: sharding .* after its 1 layer axes'):
    pqjax.quantize({'w': conv}, 4, layer_axes=1)


PATHS = ('auto', 'decode', 'fused', 'native', 'kernel')


@pytest.mark.parametrize('spec', [P('x', 'y'), P(None, 'y'), P('x', None)])
def test_explicit_meshes(spec):
  """jax.make_mesh's default axes are Explicit: quantize, decode and run wrapped
  products there wherever the float model runs, with one device's results."""
  mesh = jax.make_mesh((2, 4), ('x', 'y'))
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}
  params = _params(5)
  ref, ref_alphas = pqjax.quantize(params, 4)
  leaves = _put(params, mesh, spec)
  q, alphas = pqjax.quantize(leaves, 4)
  _check_against_one_device(q, ref, alphas, ref_alphas, leaves)
  assert pqjax.relative_error(leaves, q) == pqjax.relative_error(params, ref)
  # Budgets, and a stack split over its layer axis.
  qb, _ = pqjax.quantize(leaves, bits=(3, 5), bits_per_weight=3.5)
  rb, _ = pqjax.quantize(params, bits=(3, 5), bits_per_weight=3.5)
  for name in params:
    np.testing.assert_array_equal(np.asarray(qb[name].codes), np.asarray(rb[name].codes))
  stack = jax.device_put(_layers((4, 32, 48), 9), NamedSharding(mesh, P('y', None, None)))
  qs, _ = pqjax.quantize({'s': stack}, 4, layer_axes=1)
  rs, _ = pqjax.quantize({'s': np.asarray(stack)}, 4, layer_axes=1)
  np.testing.assert_array_equal(np.asarray(qs['s'].codes), np.asarray(rs['s'].codes))

  float_params = _put(pqjax.dequantize(ref), mesh, spec)
  ids = jnp.array([[1, 5, 63, 2]] * 2)
  x = jnp.asarray(np.random.default_rng(6).standard_normal((3, 256)), jnp.float32)
  models = {'product': lambda p, x: jnp.tanh(x @ p['dense'])}
  if spec[0] is None:
    # A float table sharded on rows cannot be indexed on an Explicit mesh either.
    models['lookup'] = lambda p, x: p['laplace'][ids]
  with jax.set_mesh(mesh):
    for name, model in models.items():
      want = jax.jit(model)(float_params, x)
      for path in PATHS:
        got = jax.jit(pqjax.wrap(model, products=path))(q, x)
        np.testing.assert_allclose(
          np.asarray(got),
          np.asarray(want),
          rtol=2e-5,
          atol=2e-5,
          err_msg=f'{name} {path}',
        )
    loss = lambda p, x: jnp.sum(models['product'](p, x) ** 2)
    np.testing.assert_allclose(
      np.asarray(jax.jit(jax.grad(pqjax.wrap(loss), argnums=1))(q, x)),
      np.asarray(jax.jit(jax.grad(loss, argnums=1))(float_params, x)),
      rtol=1e-4,
      atol=1e-5,
    )


def test_lora_product_and_gradients_on_a_mesh():
  """Adapters on sharded quantized kernels (cut as their bases, Megatron-style) on a
  (2, 4) mesh: the forward product and the gradients of every ``a`` and ``b`` are
  one device's, and both are ``x @ (W + a @ b * scale)`` on the decoded base."""
  mesh = _mesh('2x4')
  rng = np.random.default_rng(5)
  params = {
    'w1': rng.standard_normal((64, 256)).astype(np.float32) * 0.1,
    'w2': rng.standard_normal((256, 32)).astype(np.float32) * 0.1,
  }
  x = rng.standard_normal((16, 64)).astype(np.float32)
  cuts = {'w1': P(None, 'y'), 'w2': P('y', None)}
  # The adapters follow their base: a on its K axis, b on its N axis.
  adapter_cuts = {'w1': (P(), P(None, 'y')), 'w2': (P('y', None), P())}

  def adapted(params_q):
    params_l = pqjax.lora.init(params_q, 8, key=jax.random.key(0), alpha=16.0)
    keys = iter(jax.random.split(jax.random.key(1), 4))
    return {
      k: dataclasses.replace(
        v,
        a=jax.random.normal(next(keys), v.a.shape) / 8,
        b=jax.random.normal(next(keys), v.b.shape) / 8,
      )
      for k, v in params_l.items()
    }

  ref_l = adapted(pqjax.quantize(params, 4)[0])
  sharded = {
    k: jax.device_put(v, NamedSharding(mesh, cuts[k])) for k, v in params.items()
  }
  params_l = adapted(pqjax.quantize(sharded, 4)[0])
  params_l = {
    k: dataclasses.replace(
      v,
      a=jax.device_put(v.a, NamedSharding(mesh, adapter_cuts[k][0])),
      b=jax.device_put(v.b, NamedSharding(mesh, adapter_cuts[k][1])),
    )
    for k, v in params_l.items()
  }
  assert not params_l['w1'].b.sharding.is_fully_replicated
  assert not params_l['w2'].base.codes.sharding.is_fully_replicated

  def apply(p, x):
    return jax.nn.relu(x @ p['w1']) @ p['w2']

  adapters, frozen = pqjax.lora.split(params_l)
  ref_adapters, ref_frozen = pqjax.lora.split(ref_l)
  xs = jax.device_put(x, NamedSharding(mesh, P('x', None)))
  for products in ('auto', 'decode'):
    model = pqjax.wrap(apply, products=products)

    def forward(ad, fr, x, model=model):
      return model(pqjax.lora.merge(ad, fr), x)

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(lambda *args: jnp.sum(jnp.tanh(forward(*args)))))
    want, got = fwd(ref_adapters, ref_frozen, x), fwd(adapters, frozen, xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    want_g, got_g = grad(ref_adapters, ref_frozen, x), grad(adapters, frozen, xs)
    for k in params:
      for f in ('a', 'b'):
        g, r = getattr(got_g[k], f), np.asarray(getattr(want_g[k], f))
        np.testing.assert_allclose(
          np.asarray(g), r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=f'{k}.{f}'
        )

  # Both against the float product on the decoded bases.
  def reference(ab, x):
    w = {
      k: pqjax.dequantize(ref_l[k].base) + a @ b * ref_l[k].scale
      for k, (a, b) in ab.items()
    }
    return jnp.sum(jnp.tanh(apply(w, x)))

  ab = {k: (v.a, v.b) for k, v in ref_l.items()}
  np.testing.assert_allclose(
    float(jnp.sum(jnp.tanh(want))), float(reference(ab, x)), rtol=1e-5
  )
  float_g = jax.grad(reference)(ab, x)
  for k in params:
    for f, r in zip('ab', float_g[k]):
      r = np.asarray(r)
      assert np.abs(r).max() > 1e-3, (k, f)
      np.testing.assert_allclose(
        np.asarray(getattr(want_g[k], f)), r, rtol=1e-4, atol=1e-5 * np.abs(r).max()
      )
