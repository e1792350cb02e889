"""pqjax.lora: LoRA adapters on a frozen quantized base, under wrap and optax.

Every reference is computed in plain jnp/NumPy from the decoded base
(``pqjax.dequantize`` of the QArray alone) and the adapter arrays:
``x @ (W + a @ b * scale)``.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pqjax
from tests.reference import fake_quantize

FIELDS = ('codes', 'scale', 'column_scale', 'alpha', 'table')
PATHS = ('auto', 'fused', 'decode', 'kernel', 'native')


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'dense': {
      'kernel': rng.standard_t(4, (48, 40)).astype(np.float32),
      'bias': rng.standard_normal(40).astype(np.float32),
    },
    'torch': {'weight': rng.standard_t(4, (24, 48)).astype(np.float32)},
    'stack': {'kernel': rng.standard_t(4, (3, 40, 40)).astype(np.float32)},
    'embed': {'embedding': rng.standard_normal((30, 48)).astype(np.float32)},
  }


def _quantized(bits=4):
  return pqjax.quantize(
    _tree(),
    bits=bits,
    output_axis=lambda p, _: -2 if p.startswith('torch') else -1,
    layer_axes=lambda p, _: 1 if p.startswith('stack') else 0,
  )[0]


def _trained(params_l, seed=1):
  """``params_l`` with every adapter array random (b is zeros after init)."""
  adapters, frozen = pqjax.lora.split(params_l)
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return pqjax.lora.merge(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def _reference_weight(leaf):
  """``W + a @ b * scale`` in the leaf's layout, from the base decoded alone."""
  w = np.asarray(pqjax.dequantize(leaf.base), np.float64)
  d = np.asarray(leaf.a, np.float64) @ np.asarray(leaf.b, np.float64) * leaf.scale
  return w + (np.swapaxes(d, -1, -2) if leaf.base.transposed else d.reshape(w.shape))


def _skip_unavailable(path):
  if path == 'native' and not pqjax.native_status().loaded:
    pytest.skip('native library not loaded')


@pytest.fixture(scope='module')
def adapted():
  return {
    bits: _trained(pqjax.lora.init(_quantized(bits), rank=4, key=jax.random.key(0)))
    for bits in (2, 4, 8)
  }


# --- the LoRA product under wrap ------------------------------------------------------


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('bits', [2, 4, 8])
@pytest.mark.parametrize('rows', [3, 40])
def test_products_match_the_float_reference(adapted, path, bits, rows):
  _skip_unavailable(path)
  params_l = adapted[bits]
  x = np.random.default_rng(rows).standard_normal((rows, 48)).astype(np.float32)
  fns = {
    'x @ W + b': lambda p, x: x @ p['dense']['kernel'] + p['dense']['bias'],
    'x @ W.T': lambda p, x: x @ p['torch']['weight'].T,
    'W.T @ x.T': lambda p, x: (p['dense']['kernel'].T @ x.T).T,
  }
  wants = {
    'x @ W + b': x @ _reference_weight(params_l['dense']['kernel'])
    + params_l['dense']['bias'],
    'x @ W.T': x @ _reference_weight(params_l['torch']['weight']).T,
    'W.T @ x.T': x @ _reference_weight(params_l['dense']['kernel']),
  }
  for name, fn in fns.items():
    wrapped = pqjax.wrap(fn, products=path)
    got = np.asarray(jax.jit(wrapped)(params_l, x), np.float64)
    want = wants[name]
    np.testing.assert_allclose(
      got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max(), err_msg=name
    )
    (product,) = pqjax.quantized_products(wrapped, params_l, x)
    # The base is read as a plain QArray's: codes inside the product where asked.
    if path in ('fused', 'native') or (path == 'auto' and rows <= 4):
      assert product.path == path if path != 'auto' else product.path != 'decode'
    if path == 'decode':
      assert product.path == 'decode'


def test_the_adapter_changes_the_output(adapted):
  """The reference is not the base's product alone (the test can fail)."""
  params_l = adapted[4]
  x = np.ones((2, 48), np.float32)
  fn = pqjax.wrap(lambda p, x: x @ p['dense']['kernel'])
  base_only = fn(pqjax.lora.split(params_l)[1], x)  # LoraArray without a, b
  plain = fn({'dense': {'kernel': params_l['dense']['kernel'].base}}, x)
  with_adapter = fn(params_l, x)
  np.testing.assert_array_equal(np.asarray(base_only), np.asarray(plain))
  assert np.abs(np.asarray(with_adapter) - np.asarray(plain)).max() > 0.1


@pytest.mark.parametrize('path', ['auto', 'fused', 'decode'])
def test_stacked_layers_under_scan_one_adapter_per_layer(adapted, path):
  params_l = adapted[4]
  leaf = params_l['stack']['kernel']
  assert leaf.a.shape == (3, 40, 4) and leaf.b.shape == (3, 4, 40)
  x = np.random.default_rng(5).standard_normal((2, 40)).astype(np.float32)

  def fn(p, x):
    step = lambda h, w: (jnp.tanh(h @ w), None)
    return jax.lax.scan(step, x, p['stack']['kernel'])[0]

  want = x.astype(np.float64)
  for w in _reference_weight(leaf):
    want = np.tanh(want @ w)
  wrapped = pqjax.wrap(fn, products=path)
  got = jax.jit(wrapped)(params_l, x)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5)
  (product,) = pqjax.quantized_products(wrapped, params_l, x)
  # Sliced one layer a step, adapter included: the product keeps its fast path.
  assert (product.path == 'decode') == (path == 'decode')


def test_row_lookups_add_the_adapter_rows(adapted):
  params_l = adapted[4]
  ids = jnp.array([[0, 29], [7, 7], [13, 2]])
  fn = pqjax.wrap(lambda p, i: p['embed']['embedding'][i])
  got = jax.jit(fn)(params_l, ids)
  want = _reference_weight(params_l['embed']['embedding'])[np.asarray(ids)]
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-6)
  assert [p.path for p in pqjax.quantized_products(fn, params_l, ids)] == ['rows']
  # Rows of a transposed leaf (an (out, in) weight) are columns of its codes.
  fn_t = pqjax.wrap(lambda p, i: p['torch']['weight'][i])
  ids_t = jnp.array([0, 23, 5])
  want_t = _reference_weight(params_l['torch']['weight'])[np.asarray(ids_t)]
  np.testing.assert_allclose(
    np.asarray(jax.jit(fn_t)(params_l, ids_t), np.float64), want_t, rtol=1e-5, atol=1e-6
  )


def test_other_uses_decode_the_weight_with_its_adapter(adapted):
  params_l = adapted[4]
  fn = pqjax.wrap(lambda p: jnp.sum(p['dense']['kernel'] ** 2))
  want = np.sum(_reference_weight(params_l['dense']['kernel']) ** 2)
  np.testing.assert_allclose(float(jax.jit(fn)(params_l)), want, rtol=1e-5)
  # Read transposed, then sliced: the (out, in) leaf's adapter follows the layout.
  fn_t = pqjax.wrap(lambda p: p['torch']['weight'].T[:5, 1:4])
  want_t = _reference_weight(params_l['torch']['weight']).T[:5, 1:4]
  np.testing.assert_allclose(
    np.asarray(jax.jit(fn_t)(params_l), np.float64), want_t, rtol=1e-5, atol=1e-6
  )


def test_dequantize_adds_the_adapters(adapted):
  params_l = adapted[4]
  got = pqjax.dequantize(params_l)
  for path in ('dense/kernel', 'torch/weight', 'stack/kernel', 'embed/embedding'):
    a, b = path.split('/')
    leaf = params_l[a][b]
    assert got[a][b].shape == leaf.shape and got[a][b].dtype == leaf.dtype
    np.testing.assert_allclose(
      np.asarray(got[a][b], np.float64), _reference_weight(leaf), rtol=1e-5, atol=1e-6
    )
  np.testing.assert_array_equal(got['dense']['bias'], params_l['dense']['bias'])


# --- gradients ------------------------------------------------------------------------


@pytest.mark.parametrize('path', ['auto', 'fused', 'decode', 'native'])
@pytest.mark.parametrize('rows', [3, 40])
def test_gradients_match_the_float_reference(adapted, path, rows):
  _skip_unavailable(path)
  params_l = adapted[4]
  leaf = params_l['dense']['kernel']
  w = jnp.asarray(pqjax.dequantize(leaf.base))
  x = jnp.asarray(np.random.default_rng(7).standard_normal((rows, 48)), jnp.float32)
  model = pqjax.wrap(lambda p, x: x @ p['dense']['kernel'], products=path)

  def loss(a, b, x):
    p = {'dense': {'kernel': dataclasses.replace(leaf, a=a, b=b)}}
    return jnp.sum(jnp.tanh(model(p, x)))

  def reference(a, b, x):
    return jnp.sum(jnp.tanh(x @ (w + a @ b * leaf.scale)))

  got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(leaf.a, leaf.b, x)
  want = jax.grad(reference, argnums=(0, 1, 2))(leaf.a, leaf.b, x)
  for name, g, r in zip('abx', got, want):
    assert np.abs(np.asarray(r)).max() > 1e-3, name
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=name
    )


@pytest.mark.parametrize('path', ['fused', 'decode', 'native'])
def test_no_gradient_reaches_the_base_scales(adapted, path):
  _skip_unavailable(path)
  leaf = adapted[4]['dense']['kernel']
  x = jnp.ones((3, 48), jnp.float32)
  model = pqjax.wrap(lambda p, x: x @ p['k'], products=path)

  def loss(scale):
    base = dataclasses.replace(leaf.base, scale=scale)
    return jnp.sum(model({'k': dataclasses.replace(leaf, base=base)}, x) ** 2)

  np.testing.assert_array_equal(np.asarray(jax.grad(loss)(leaf.base.scale)), 0.0)
  # A plain QArray's scales do get a gradient through the same product.
  plain = lambda s: jnp.sum(model({'k': dataclasses.replace(leaf.base, scale=s)}, x) ** 2)
  assert np.abs(np.asarray(jax.grad(plain)(leaf.base.scale))).max() > 0


# --- training with optax --------------------------------------------------------------


def _regression(seed=3):
  """A target made by a float model: the quantized one with rank-4 adapters learns it."""
  params_q = _quantized(3)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
  w = jnp.asarray(_tree()['dense']['kernel'])
  y = jnp.tanh(x @ w)
  model = pqjax.wrap(lambda p, x: jnp.tanh(x @ p['dense']['kernel']))
  return params_q, model, x, y


def _assert_base_unchanged(before, after):
  # A LoraArray's base is found at '<leaf path>/base'.
  bases = {p.removesuffix('/base'): q for p, q in pqjax.quantized_leaves(after).items()}
  assert len(bases) == len(pqjax.quantized_leaves(before))
  for path, q in pqjax.quantized_leaves(before).items():
    r = bases[path]
    for f in FIELDS:
      x, y = getattr(q, f), getattr(r, f)
      assert (x is None) == (y is None), (path, f)
      if x is not None:
        assert np.asarray(x).dtype == np.asarray(y).dtype, (path, f)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f)


def test_adam_on_split_adapters_trains_and_leaves_the_base_alone():
  params_q, model, x, y = _regression()
  params_l = pqjax.lora.init(params_q, rank=4, key=jax.random.key(1), alpha=8.0)
  adapters, frozen = pqjax.lora.split(params_l)
  opt = optax.adam(1e-2)
  state = opt.init(adapters)
  # The optimiser holds moments for the adapters alone.
  assert len(jax.tree_util.tree_leaves(state)) == 1 + 2 * 2 * 4

  loss = lambda ad: jnp.mean((model(pqjax.lora.merge(ad, frozen), x) - y) ** 2)

  @jax.jit
  def step(ad, state):
    value, grads = jax.value_and_grad(loss)(ad)
    updates, state = opt.update(grads, state, ad)
    return optax.apply_updates(ad, updates), state, value

  losses = []
  for _ in range(20):
    adapters, state, value = step(adapters, state)
    losses.append(float(value))
  assert losses[-1] < 0.7 * losses[0], losses
  trained = pqjax.lora.merge(adapters, frozen)
  _assert_base_unchanged(params_q, trained)
  b = np.asarray(trained['dense']['kernel'].b)
  assert np.abs(b).max() > 0  # the adapter moved


def test_adam_masked_on_the_full_tree():
  """optax.masked with lora.mask: moments for a and b only; the base unchanged."""
  params_q, model, x, y = _regression()
  params_l = pqjax.lora.init(params_q, rank=4, key=jax.random.key(1))
  opt = optax.masked(optax.adam(1e-2), pqjax.lora.mask(params_l))
  state = opt.init(params_l)
  moments = [
    leaf
    for leaf in jax.tree_util.tree_leaves(state)
    if hasattr(leaf, 'shape') and leaf.ndim
  ]
  assert len(moments) == 2 * 2 * 4  # mu and nu of a and b, four leaves

  def step(params_l, state):
    adapters, frozen = pqjax.lora.split(params_l)
    loss = lambda ad: jnp.mean((model(pqjax.lora.merge(ad, frozen), x) - y) ** 2)
    value, grads = jax.value_and_grad(loss)(adapters)
    # The full tree's gradient: zeros for everything frozen.
    zeros = jax.tree_util.tree_map(jnp.zeros_like, frozen)
    updates, state = opt.update(pqjax.lora.merge(grads, zeros), state, params_l)
    return optax.apply_updates(params_l, updates), state, value

  step = jax.jit(step)
  first = None
  for _ in range(10):
    params_l, state, value = step(params_l, state)
    first = float(value) if first is None else first
  assert float(value) < first
  _assert_base_unchanged(params_q, params_l)


# --- split, merge, mask, fold -----------------------------------------------------------


def test_split_and_merge_round_trip(adapted):
  params_l = adapted[4]
  adapters, frozen = pqjax.lora.split(params_l)
  # The adapters' leaves are exactly the a and b arrays, in tree order.
  leaves = jax.tree_util.tree_leaves(adapters)
  assert len(leaves) == 8
  assert all(np.asarray(x).dtype == np.float32 for x in leaves)
  assert adapters['dense']['bias'] is None
  assert frozen['dense']['bias'] is params_l['dense']['bias']
  back = pqjax.lora.merge(adapters, frozen)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params_l)
  for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params_l)):
    assert x is y


def test_mask_marks_the_adapter_arrays_only(adapted):
  params_l = adapted[4]
  m = pqjax.lora.mask(params_l)
  assert m['dense']['bias'] is False
  leaf = m['dense']['kernel']
  assert isinstance(leaf, pqjax.lora.LoraArray)
  assert (leaf.base, leaf.a, leaf.b) == (False, True, True)
  # A prefix of the params' structure, as optax takes it.
  flat = jax.tree_util.tree_flatten(m)[0]
  assert flat.count(True) == 8 and all(isinstance(x, bool) for x in flat)
  # What the mask keeps of the params (as optax.masked reads it): a and b alone.
  kept = jax.tree_util.tree_map(lambda keep, sub: sub if keep else None, m, params_l)
  adapters = pqjax.lora.split(params_l)[0]
  got = jax.tree_util.tree_leaves(kept)
  assert len(got) == 8
  for x, y in zip(got, jax.tree_util.tree_leaves(adapters)):
    assert x is y


def _merged32(leaf):
  """``dequantize(W) + a @ b * scale`` in float32 jnp, in the leaf's layout."""
  d = (leaf.a @ leaf.b) * leaf.scale
  d = d.swapaxes(-1, -2) if leaf.base.transposed else d.reshape(leaf.shape)
  return pqjax.dequantize(leaf.base) + d


def _assert_same_qarray(got, want):
  assert (got.bits, got.transposed, got.shape, got.layer_axes) == (
    want.bits,
    want.transposed,
    want.shape,
    want.layer_axes,
  )
  for f in FIELDS:
    x, y = getattr(got, f), getattr(want, f)
    assert (x is None) == (y is None), f
    if x is not None:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f)


def test_fold_equals_quantizing_the_merged_weights(adapted):
  params_l = adapted[4]
  folded = pqjax.lora.fold(params_l)
  merged = {
    'dense': {'kernel': _merged32(params_l['dense']['kernel'])},
    'torch': {'weight': _merged32(params_l['torch']['weight'])},
  }
  want, _ = pqjax.quantize(
    merged, bits=4, output_axis=lambda p, _: -2 if p.startswith('torch') else -1
  )
  is_lora = lambda x: isinstance(x, pqjax.lora.LoraArray)
  assert not any(is_lora(x) for x in jax.tree_util.tree_leaves(folded, is_leaf=is_lora))
  for a, b in (('dense', 'kernel'), ('torch', 'weight')):
    _assert_same_qarray(folded[a][b], want[a][b])
  # Folded weights differ from the base's (the adapters were not zero).
  base = params_l['dense']['kernel'].base
  assert not np.array_equal(np.asarray(folded['dense']['kernel'].codes), base.codes)
  # Other options apply to the adapted leaves; stacks keep their layer axes.
  folded3 = pqjax.lora.fold(params_l, bits=3, granularity=16)
  stack = folded3['stack']['kernel']
  assert stack.bits == 3 and stack.scale.shape == (3, 3, 40)
  want3, _ = pqjax.quantize(
    {'s': _merged32(params_l['stack']['kernel'])}, bits=3, granularity=16, layer_axes=1
  )
  _assert_same_qarray(stack, want3['s'])
  np.testing.assert_array_equal(folded3['dense']['bias'], params_l['dense']['bias'])


# --- init and bad input -----------------------------------------------------------------


def test_init_shapes_scale_and_selection():
  params_q = _quantized(4)
  params_l = pqjax.lora.init(
    params_q,
    rank=2,
    key=jax.random.key(0),
    alpha=6.0,
    filter=lambda path, _: path in ('dense/kernel', 'torch/weight'),
  )
  leaf = params_l['dense']['kernel']
  assert leaf.scale == 3.0 and leaf.rank == 2
  assert leaf.a.shape == (48, 2) and leaf.b.shape == (2, 40)
  np.testing.assert_array_equal(np.asarray(leaf.b), 0.0)
  assert 0.05 < float(jnp.std(leaf.a)) < 0.3  # about 1 / sqrt(48)
  t = params_l['torch']['weight']
  assert t.a.shape == (48, 2) and t.b.shape == (2, 24)  # (K, N) of an (out, in) leaf
  assert params_l['embed']['embedding'] is params_q['embed']['embedding']
  # b zeros: the adapted model is the quantized one.
  x = np.ones((2, 48), np.float32)
  fn = pqjax.wrap(lambda p, x: x @ p['dense']['kernel'])
  np.testing.assert_array_equal(np.asarray(fn(params_l, x)), np.asarray(fn(params_q, x)))
  # Deterministic in the key; another key gives other adapters.
  again = pqjax.lora.init(params_q, rank=2, key=jax.random.key(0))
  other = pqjax.lora.init(params_q, rank=2, key=jax.random.key(1))
  np.testing.assert_array_equal(
    again['dense']['kernel'].a,
    pqjax.lora.init(params_q, rank=2, key=jax.random.key(0))['dense']['kernel'].a,
  )
  assert not np.array_equal(again['dense']['kernel'].a, other['dense']['kernel'].a)


@pytest.mark.parametrize('rank', [0, -1, 1.5, True])
def test_bad_rank(rank):
  with pytest.raises(ValueError, match='rank must be an int >= 1'):
    pqjax.lora.init(_quantized(4), rank=rank, key=jax.random.key(0))


def test_a_non_quantized_leaf_selected_is_named():
  with pytest.raises(
    ValueError, match=r'dense/bias: selected for an adapter but not quantized'
  ):
    pqjax.lora.init(
      _quantized(4),
      rank=2,
      key=jax.random.key(0),
      filter=lambda p, _: p.startswith('dense'),
    )


def test_an_adapter_leaf_selected_again_is_named(adapted):
  with pytest.raises(ValueError, match=r'dense/kernel: already has an adapter'):
    pqjax.lora.init(
      adapted[4], rank=2, key=jax.random.key(0), filter=lambda p, _: p == 'dense/kernel'
    )


def test_merge_names_an_adapter_of_the_wrong_shape(adapted):
  adapters, frozen = pqjax.lora.split(adapted[4])
  leaf = adapters['torch']['weight']
  adapters['torch']['weight'] = dataclasses.replace(leaf, a=leaf.a[:-1])
  with pytest.raises(ValueError, match=r'torch/weight: adapter shapes a \(47, 4\)'):
    pqjax.lora.merge(adapters, frozen)
  adapters['torch']['weight'] = dataclasses.replace(leaf, b=leaf.b[:, :-1])
  with pytest.raises(ValueError, match=r'torch/weight: adapter shapes'):
    pqjax.lora.merge(adapters, frozen)
  adapters['torch']['weight'] = dataclasses.replace(leaf, scale=2.0)
  with pytest.raises(ValueError, match=r'torch/weight: adapter scale 2.0'):
    pqjax.lora.merge(adapters, frozen)


def test_a_lora_array_checks_its_adapter(adapted):
  leaf = adapted[4]['dense']['kernel']
  with pytest.raises(ValueError, match='adapter shapes'):
    pqjax.lora.LoraArray(base=leaf.base, a=leaf.b, b=leaf.a, scale=1.0)
  with pytest.raises(ValueError, match='is not floating'):
    pqjax.lora.LoraArray(base=leaf.base, a=leaf.a.astype(jnp.int32), b=leaf.b, scale=1.0)


# --- a real Flax Linen model ------------------------------------------------------------


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


@pytest.mark.parametrize('rows', [2, 40])
def test_flax_linen_dense_model(rows):
  model = _MLP()
  x = jax.random.normal(jax.random.key(0), (rows, 24))
  params = model.init(jax.random.key(1), x)['params']
  params_q, _ = pqjax.quantize(params, bits=4)
  params_l = _trained(pqjax.lora.init(params_q, rank=3, key=jax.random.key(2)))
  got = jax.jit(pqjax.wrap(model.apply))({'params': params_l}, x)
  # The reference: Flax's own Dense on float kernels W + a @ b * scale.
  reference = jax.tree_util.tree_map(
    lambda v: (
      jnp.asarray(_reference_weight(v), jnp.float32)
      if isinstance(v, pqjax.lora.LoraArray)
      else v
    ),
    params_l,
    is_leaf=lambda v: isinstance(v, pqjax.lora.LoraArray),
  )
  want = model.apply({'params': reference}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  base_only = model.apply({'params': pqjax.dequantize(params_q)}, x)
  assert np.abs(np.asarray(want) - np.asarray(base_only)).max() > 1e-2


@pytest.mark.parametrize('rows', [2 * 64, 16 * 64])
def test_training_step_holds_the_base_packed(rows):
  """args + temp of a jitted adapter step (Adam) against a float LoRA step of the
  same rank (fp32 base, ``W + a @ b * scale``): decoded weights are not kept from
  the forward pass to the backward one."""
  layers, d = 6, 512
  rng = np.random.default_rng(0)
  params = {
    f'l{i}': (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
    for i in range(layers)
  }
  params_q, _ = pqjax.quantize(params, 4)
  adapters, frozen = pqjax.lora.split(pqjax.lora.init(params_q, 8, key=jax.random.key(0)))
  floats = {k: (v.a, v.b) for k, v in adapters.items()}

  def model(p, x):
    for i in range(layers):
      x = jnp.tanh(x @ p[f'l{i}'])
    return x

  opt = optax.adam(1e-3)

  def step(loss, train, rest, x):
    value, g = jax.value_and_grad(loss)(train, rest, x)
    updates, state = opt.update(g, opt.init(train), train)
    return optax.apply_updates(train, updates), state, value

  def packed_loss(train, rest, x):
    return jnp.mean(pqjax.wrap(model)(pqjax.lora.merge(train, rest), x) ** 2)

  def float_loss(train, rest, x):
    merged = {k: rest[k] + a @ b for k, (a, b) in train.items()}
    return jnp.mean(model(merged, x) ** 2)

  x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)

  def held(loss, train, rest):
    fn = jax.jit(functools.partial(step, loss))
    m = fn.lower(train, rest, x).compile().memory_analysis()
    return m.argument_size_in_bytes + m.temp_size_in_bytes

  packed = held(packed_loss, adapters, frozen)
  full = held(float_loss, floats, params)
  base_saving = pqjax.nbytes(params) - pqjax.nbytes(params_q)
  if rows == 2 * 64:  # weights dominate
    assert packed <= 0.45 * full, (packed, full)
  # At least 80% of what the packed base saves reaches the step.
  assert full - packed >= 0.8 * base_saving, (full, packed, base_saving)


@pytest.mark.parametrize('fmt', ['safetensors', 'shards', 'orbax'])
def test_checkpoints_save_and_load_adapters_with_the_base(adapted, tmp_path, fmt):
  params_l = adapted[4]
  path = tmp_path / ('m.safetensors' if fmt == 'safetensors' else 'm')
  pqjax.save(path, params_l, format=fmt)
  back = pqjax.load(path)
  is_node = lambda x: isinstance(x, pqjax.lora.LoraArray | pqjax.QArray)
  got = jax.tree_util.tree_leaves_with_path(back, is_leaf=is_node)
  want = jax.tree_util.tree_leaves_with_path(params_l, is_leaf=is_node)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path_, x), (_, y) in zip(got, want):
    assert is_node(x) == is_node(y) and (not is_node(y) or type(x) is type(y)), path_
    if isinstance(y, pqjax.lora.LoraArray):
      assert x.scale == y.scale
      for f in ('a', 'b'):
        np.testing.assert_array_equal(
          np.asarray(getattr(x, f)), np.asarray(getattr(y, f))
        )
      x, y = x.base, y.base
    for f in FIELDS if isinstance(y, pqjax.QArray) else ():
      a, b = getattr(x, f), getattr(y, f)
      assert (a is None) == (b is None)
      if b is not None:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if not isinstance(y, pqjax.QArray):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_summary_counts_the_adapter_bytes(adapted):
  params_l = adapted[4]
  s = pqjax.summary(params_l)
  nodes = [
    x
    for x in jax.tree_util.tree_leaves(
      params_l, is_leaf=lambda x: isinstance(x, pqjax.lora.LoraArray)
    )
    if isinstance(x, pqjax.lora.LoraArray)
  ]
  assert s.adapters == len(nodes) == 4
  assert s.adapter_bytes == sum(x.a.nbytes + x.b.nbytes for x in nodes)
  assert len(s.leaves) == len(nodes)
  assert s.total_after == pqjax.nbytes(params_l)
  assert 'LoRA adapters: 4' in str(s)


def test_residual_init_is_the_best_low_rank_fit_of_the_error():
  tree = _tree()
  params_q = _quantized(3)
  params_l = pqjax.lora.init(
    params_q, rank=4, key=jax.random.key(0), init='residual', params=tree, alpha=8.0
  )
  for name in ('dense', 'torch', 'stack'):
    key = 'weight' if name == 'torch' else 'kernel'
    leaf, w = params_l[name][key], np.asarray(tree[name][key], np.float64)
    error = w - np.asarray(pqjax.dequantize(leaf.base), np.float64)
    left = w - _reference_weight(leaf)
    if leaf.base.transposed:
      error, left = error.T, left.T
    error = error.reshape(*leaf.base.layers, *leaf.base.matrix_shape)
    # Eckart-Young: what is left is the error's singular values beyond the 4th.
    s = np.linalg.svd(error, compute_uv=False)
    want = np.sqrt(np.sum(s[..., 4:] ** 2))
    np.testing.assert_allclose(np.linalg.norm(left), want, rtol=1e-4)
    assert np.linalg.norm(left) < np.linalg.norm(error)
  with pytest.raises(ValueError, match='float params'):
    pqjax.lora.init(params_q, rank=4, key=jax.random.key(0), init='residual')
  with pytest.raises(ValueError, match='init must be'):
    pqjax.lora.init(params_q, rank=4, key=jax.random.key(0), init='svd')


# --- layer stacks: one adapter per layer ------------------------------------------------


@pytest.mark.parametrize('path', ['auto', 'decode'])
def test_stacked_layers_gradients_reach_each_layers_adapter(path):
  """Leaves with one and two layer axes under (nested) scans: each layer's product
  and the gradients of its own ``a`` and ``b`` are those of its float weight."""
  rng = np.random.default_rng(11)
  tree = {
    'one': rng.standard_t(4, (3, 24, 24)).astype(np.float32) / 5,
    'two': rng.standard_t(4, (2, 3, 24, 24)).astype(np.float32) / 5,
  }
  axes = {'one': 1, 'two': 2}
  params_q = pqjax.quantize(tree, bits=4, layer_axes=lambda p, _: axes[p])[0]
  params_l = _trained(pqjax.lora.init(params_q, rank=3, key=jax.random.key(4)))
  one, two = params_l['one'], params_l['two']
  assert one.a.shape == (3, 24, 3) and two.b.shape == (2, 3, 3, 24)
  x = jnp.asarray(rng.standard_normal((4, 24)), jnp.float32)

  def run(ws_one, ws_two, x):
    step = lambda h, w: (jnp.tanh(h @ w), None)
    x = jax.lax.scan(step, x, ws_one)[0]
    return jax.lax.scan(lambda h, ws: (jax.lax.scan(step, h, ws)[0], None), x, ws_two)[0]

  model = pqjax.wrap(lambda p, x: run(p['one'], p['two'], x), products=path)

  def loss(ab, x):
    p = {k: dataclasses.replace(params_l[k], a=a, b=b) for k, (a, b) in ab.items()}
    return jnp.sum(model(p, x) ** 2)

  def reference(ab, x):
    w = {
      k: pqjax.dequantize(params_l[k].base) + a @ b * params_l[k].scale
      for k, (a, b) in ab.items()
    }
    return jnp.sum(run(w['one'], w['two'], x) ** 2)

  ab = {k: (v.a, v.b) for k, v in params_l.items()}
  np.testing.assert_allclose(
    float(jax.jit(loss)(ab, x)), float(reference(ab, x)), rtol=1e-5
  )
  got = jax.jit(jax.grad(loss))(ab, x)
  want = jax.grad(reference)(ab, x)
  for k in ab:
    for name, g, r in zip('ab', got[k], want[k]):
      r = np.asarray(r)
      # Every layer's adapter has its own gradient.
      per_layer = np.abs(r).reshape(-1, *r.shape[-2:]).max(axis=(-2, -1))
      assert (per_layer > 1e-4).all(), (k, name)
      np.testing.assert_allclose(
        np.asarray(g), r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=f'{k}.{name}'
      )


# --- activation quantization (act_bits) with adapters -----------------------------------


@pytest.mark.parametrize('granularity', ['tensor', 'token'])
@pytest.mark.parametrize('bits', [4, 8])
def test_act_bits_quantize_the_input_of_base_and_adapter(adapted, bits, granularity):
  """``quantize(x) @ (W + a @ b * scale)``: the adapter sees the same quantized input
  as the base; gradients reach a and b, and x straight through the quantizer."""
  leaf = adapted[4]['dense']['kernel']
  alpha = float(np.asarray(leaf.base.alpha))
  w = jnp.asarray(pqjax.dequantize(leaf.base))
  rng = np.random.default_rng(bits)
  x = (rng.laplace(size=(5, 48)) * np.linspace(0.2, 3.0, 48)).astype(np.float32)
  axes = None if granularity == 'tensor' else (-1,)
  xq = fake_quantize(x, alpha, bits, axes)
  model = pqjax.wrap(lambda p, x: x @ p['k'], act_bits=bits, act_granularity=granularity)
  got = np.asarray(jax.jit(model)({'k': leaf}, x), np.float64)
  want = xq @ _reference_weight(leaf)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Unquantized input to the adapter or the base alone would differ by this much.
  assert np.abs(x @ _reference_weight(leaf) - want).max() > 1e-3
  assert np.abs(xq @ np.asarray(w, np.float64) - want).max() > 1e-2

  def loss(a, b, x):
    return jnp.sum(jnp.tanh(model({'k': dataclasses.replace(leaf, a=a, b=b)}, x)))

  def reference(a, b, xq):
    return jnp.sum(jnp.tanh(xq @ (w + a @ b * leaf.scale)))

  got_g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(leaf.a, leaf.b, x)
  want_g = jax.grad(reference, argnums=(0, 1, 2))(
    leaf.a, leaf.b, jnp.asarray(xq, jnp.float32)
  )
  for name, g, r in zip('abx', got_g, want_g):
    r = np.asarray(r)
    assert np.abs(r).max() > 1e-3, name
    np.testing.assert_allclose(
      np.asarray(g), r, rtol=1e-4, atol=1e-4 * np.abs(r).max(), err_msg=name
    )


# --- Flax NNX models --------------------------------------------------------------------


def _nnx_block():
  from flax import nnx

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(24, 40, rngs=rngs)
      self.down = nnx.Linear(40, 24, rngs=rngs)

    def __call__(self, x):
      return x + self.down(jax.nn.gelu(self.up(x)))

  return Block(nnx.Rngs(3))


def _nnx_reference(params_l, x, adapters=True):
  """The block in jnp on float kernels ``W + a @ b * scale`` (the base decoded alone;
  ``adapters=False``: the base alone)."""

  def weight(leaf):
    w = pqjax.dequantize(leaf.base)
    return w + leaf.a @ leaf.b * leaf.scale if adapters else w

  w = {k: weight(v['kernel']) for k, v in params_l.items()}
  h = jax.nn.gelu(x @ w['up'] + params_l['up']['bias'])
  return x + h @ w['down'] + params_l['down']['bias']


def test_nnx_model_runs_and_trains_with_adapters():
  from flax import nnx

  model_q, _ = pqjax.nnx.quantize(_nnx_block(), bits=4)
  params_l = _trained(
    pqjax.lora.init(pqjax.nnx.params(model_q), 4, key=jax.random.key(0))
  )
  assert isinstance(params_l['up']['kernel'], pqjax.lora.LoraArray)
  pqjax.nnx.load_params(model_q, params_l)
  assert isinstance(model_q.down.kernel.get_value(), pqjax.lora.LoraArray)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 24)), jnp.float32)
  want = _nnx_reference(params_l, x)
  np.testing.assert_allclose(model_q(x), want, rtol=1e-5, atol=1e-5)
  graphdef, state = nnx.split(model_q)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  base_only = _nnx_reference(params_l, x, adapters=False)
  assert np.abs(np.asarray(want) - np.asarray(base_only)).max() > 1e-2

  # Training: gradients of the adapters alone, the model rebuilt from its state.
  graphdef, params, rest = nnx.split(model_q, nnx.Param, ...)
  adapters, frozen = pqjax.lora.split(nnx.to_pure_dict(params))

  def loss(adapters, x):
    fresh = jax.tree_util.tree_map(lambda v: v, params)  # new variables in this trace
    nnx.replace_by_pure_dict(fresh, pqjax.lora.merge(adapters, frozen))
    return jnp.sum(jnp.tanh(nnx.merge(graphdef, fresh, rest)(x)))

  def reference(adapters, x):
    return jnp.sum(jnp.tanh(_nnx_reference(pqjax.lora.merge(adapters, frozen), x)))

  got = jax.jit(jax.grad(loss))(adapters, x)
  want_g = jax.grad(reference)(adapters, x)
  for k in ('up', 'down'):
    for f in ('a', 'b'):
      g, r = getattr(got[k]['kernel'], f), np.asarray(getattr(want_g[k]['kernel'], f))
      assert np.abs(r).max() > 1e-3, (k, f)
      np.testing.assert_allclose(
        np.asarray(g), r, rtol=1e-4, atol=1e-5 * np.abs(r).max(), err_msg=f'{k}.{f}'
      )
  assert got['up']['bias'] is None  # only adapters train


def test_nnx_state_takes_adapters_with_paths_without_value():
  """``init`` on ``nnx.state(model_q, nnx.Param)``: filters and the float params see
  the paths ``pqjax.nnx.quantize`` gives (no ``value``); ``nnx.update`` puts the
  adapters into the model, ``fold`` folds them in the state."""
  from flax import nnx

  model = _nnx_block()
  model_q, _ = pqjax.nnx.quantize(model, bits=3)
  state = nnx.state(model_q, nnx.Param)
  seen = []

  def only_up(path, leaf):
    seen.append(path)
    return path == 'up/kernel'

  floats = nnx.state(model, nnx.Param)
  state_l = pqjax.lora.init(
    state, 2, key=jax.random.key(0), filter=only_up, init='residual', params=floats
  )
  assert 'up/kernel' in seen and not any('value' in p for p in seen)
  nnx.update(model_q, state_l)
  up = model_q.up.kernel.get_value()
  assert isinstance(up, pqjax.lora.LoraArray) and up.rank == 2
  assert isinstance(model_q.down.kernel.get_value(), pqjax.QArray)
  # Residual start: the adapter is the quantization error's best rank-2 fit.
  w = np.asarray(model.up.kernel.get_value(), np.float64)
  error = w - np.asarray(pqjax.dequantize(up.base), np.float64)
  s = np.linalg.svd(error, compute_uv=False)
  np.testing.assert_allclose(
    np.linalg.norm(w - _reference_weight(up)), np.sqrt(np.sum(s[2:] ** 2)), rtol=1e-4
  )
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 24)), jnp.float32)
  p = pqjax.nnx.params(model_q)
  h = jax.nn.gelu(x @ _reference_weight(up) + p['up']['bias'])
  want = x + h @ pqjax.dequantize(p['down']['kernel']) + p['down']['bias']
  np.testing.assert_allclose(model_q(x), want, rtol=1e-5, atol=1e-5)
  folded = pqjax.lora.fold(nnx.state(model_q, nnx.Param))
  nnx.update(model_q, folded)
  q = model_q.up.kernel.get_value()
  assert isinstance(q, pqjax.QArray) and q.bits == 3
  want = pqjax.quantize({'w': up.dequantize()}, bits=3)[0]['w']
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(want.codes))
