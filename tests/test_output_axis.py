"""output_axis=-2: PyTorch-layout ``(out, in)`` weights as transposed QArrays.

The reference for every result is the same tree in Flax layout (each weight
transposed by NumPy) quantized as usual: the codes and scales must be the same bits,
the decoded weight its transpose, and every product path its product.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import pqjax

FIELDS = ('codes', 'scale', 'column_scale', 'alpha', 'table')


def _torch_tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'q_proj': {'weight': rng.standard_t(3, (96, 64)).astype(np.float32)},
    'up': {'weight': rng.standard_t(4, (80, 64)).astype(np.float32)},
    'stack': {'weight': rng.standard_t(3, (3, 40, 64)).astype(np.float32)},
    'bias': rng.standard_normal(96).astype(np.float32),
  }


def _flax(tree):
  """The reference: each torch weight transposed to (in, out)."""
  return jax.tree_util.tree_map(
    lambda x: np.ascontiguousarray(np.swapaxes(x, -1, -2)) if x.ndim >= 2 else x, tree
  )


def _axes(path, leaf):
  return 1 if path.startswith('stack') else 0


def _assert_same_codes(got, want):
  for path, q in pqjax.quantized_leaves(got).items():
    r = pqjax.quantized_leaves(want)[path]
    assert q.transposed and not r.transposed, path
    assert q.shape == (*r.shape[:-2], r.shape[-1], r.shape[-2]), path
    assert (q.bits, q.layer_axes, q.matrix_shape) == (
      r.bits,
      r.layer_axes,
      r.matrix_shape,
    )
    for f in FIELDS:
      a, b = getattr(q, f), getattr(r, f)
      assert (a is None) == (b is None), (path, f)
      if b is not None:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f'{path} {f}')


@pytest.mark.parametrize(
  'options',
  [
    dict(bits=4),
    dict(bits=3, granularity=16, scale_dtype='uint8'),
    # A narrow range: a budget compiles the encoding at every width of it.
    dict(bits=(2, 5), bits_per_weight=3.5),
  ],
  ids=['4 bits', 'groups uint8', 'budget'],
)
def test_torch_layout_equals_the_transposed_tree(options):
  tree = _torch_tree()
  got, alphas = pqjax.quantize(tree, output_axis=-2, layer_axes=_axes, **options)
  want, want_alphas = pqjax.quantize(_flax(tree), layer_axes=_axes, **options)
  _assert_same_codes(got, want)
  np.testing.assert_array_equal(
    alphas['q_proj']['weight'], want_alphas['q_proj']['weight']
  )
  decoded, ref = pqjax.dequantize(got), pqjax.dequantize(want)
  for name in ('q_proj', 'up', 'stack'):
    np.testing.assert_array_equal(
      np.asarray(decoded[name]['weight']),
      np.swapaxes(np.asarray(ref[name]['weight']), -1, -2),
    )
  # One scale per output feature: the torch weight's first axis.
  assert got['q_proj']['weight'].block_scale().shape[-1] == 96 or 'granularity' in str(
    options
  )


def test_per_leaf_functions_see_the_leaf_as_the_tree_holds_it():
  seen = {}

  def importance(path, leaf):
    seen[path] = tuple(leaf.shape)
    return 1.0

  tree = {'q_proj': _torch_tree()['q_proj']}
  pqjax.quantize(tree, bits_per_weight=3.5, output_axis=-2, importance=importance)
  assert seen == {'q_proj/weight': (96, 64)}


def test_a_function_picks_the_output_axis_per_leaf():
  tree = _torch_tree()
  pick = lambda path, leaf: -2 if path.startswith('q_proj') else -1
  got, _ = pqjax.quantize(tree, bits=4, output_axis=pick)
  assert got['q_proj']['weight'].transposed
  assert not got['up']['weight'].transposed and got['up']['weight'].scale.shape == (1, 64)


@pytest.mark.parametrize(
  'output_axis, match',
  [
    (0, 'output_axis must be -1'),
    (True, 'output_axis must be -1'),
    (lambda p, x: 1 / 0, 'stack/weight: the output_axis function raised'),
    (lambda p, x: 'last', 'must return -1 or -2'),
  ],
)
def test_bad_output_axis_names_the_leaf(output_axis, match):
  with pytest.raises(ValueError, match=match):
    pqjax.quantize(
      {'stack': {'weight': np.ones((3, 4, 8), np.float32)}}, 4, output_axis=output_axis
    )


def test_output_axis_needs_two_axes_per_layer():
  with pytest.raises(ValueError, match=r'stack/weight: output_axis -2 needs two axes'):
    pqjax.quantize(
      {'stack': {'weight': np.ones((3, 4, 8), np.float32)}}, 4, output_axis=-2
    )


@pytest.mark.parametrize('path', ['auto', 'fused', 'decode', 'kernel', 'native'])
@pytest.mark.parametrize('rows', [3, 40])
def test_products_contracting_the_last_axis_read_the_codes(path, rows):
  """``x @ W.T``, ``dot_general`` over W's last axis and ``W.T @ x.T`` equal the
  dequantized model's, and take the paths of a Flax kernel."""
  if path == 'native' and not pqjax.native_status().loaded:
    pytest.skip('native library not loaded')
  tree = _torch_tree()
  q, _ = pqjax.quantize(tree, bits=4, output_axis=-2, layer_axes=_axes)
  w = np.asarray(pqjax.dequantize(q)['q_proj']['weight'])
  x = np.random.default_rng(1).standard_normal((rows, 64)).astype(np.float32)
  fns = {
    'x @ W.T': lambda p, x: x @ p['q_proj']['weight'].T,
    'dot_general': lambda p, x: jax.lax.dot_general(
      x, p['q_proj']['weight'], (((1,), (1,)), ((), ()))
    ),
    'W @ x.T': lambda p, x: (p['q_proj']['weight'] @ x.T).T,
  }
  flax_q, _ = pqjax.quantize(_flax(tree), bits=4, layer_axes=_axes)
  flax_fn = lambda p, x: x @ p['q_proj']['weight']
  flax_path = pqjax.quantized_products(pqjax.wrap(flax_fn, products=path), flax_q, x)
  for name, fn in fns.items():
    wrapped = pqjax.wrap(fn, products=path)
    np.testing.assert_allclose(
      jax.jit(wrapped)(q, x), x @ w.T, rtol=2e-5, atol=2e-5, err_msg=name
    )
    (product,) = pqjax.quantized_products(wrapped, q, x)
    assert product.path == flax_path[0].path, name
  if path in ('fused', 'kernel', 'native') or (path == 'auto' and rows <= 16):
    assert flax_path[0].path != 'decode'


def test_row_lookups_of_a_transposed_table_decode_only_their_rows():
  table = np.random.default_rng(2).standard_t(3, (50, 24)).astype(np.float32)
  q, _ = pqjax.quantize({'e': table}, bits=5, output_axis=-2)
  ids = jnp.array([[0, 49], [7, 7], [13, 2]])
  fn = pqjax.wrap(lambda p, i: p['e'][i])
  got = jax.jit(fn)(q, ids)
  np.testing.assert_array_equal(
    got, np.asarray(pqjax.dequantize(q)['e'])[np.asarray(ids)]
  )
  assert [p.path for p in pqjax.quantized_products(fn, q, ids)] == ['rows']


def test_gradients_through_a_transposed_weight():
  tree = _torch_tree()
  q, _ = pqjax.quantize(tree, bits=4, output_axis=-2, layer_axes=_axes)
  w = jnp.asarray(pqjax.dequantize(q)['up']['weight'])
  x = jnp.asarray(np.random.default_rng(3).standard_normal((4, 64)), jnp.float32)
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p['up']['weight'].T))
  got = jax.grad(pqjax.wrap(loss), argnums=1)(q, x)
  want = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ w.T)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_checkpoints_keep_the_transposed_layout(tmp_path, fmt):
  q, _ = pqjax.quantize(_torch_tree(), bits=4, output_axis=-2, layer_axes=_axes)
  path = tmp_path / ('q.safetensors' if fmt == 'safetensors' else 'q')
  pqjax.save(path, q, format=fmt)
  back = pqjax.load(path)
  for name, x in pqjax.quantized_leaves(q).items():
    y = pqjax.quantized_leaves(back)[name]
    assert y.transposed and y.shape == x.shape and y.layer_axes == x.layer_axes
    np.testing.assert_array_equal(np.asarray(y.codes), np.asarray(x.codes))


def test_a_transposed_qarray_checks_its_shape():
  q, _ = pqjax.quantize({'w': np.ones((6, 8), np.float32)}, 4, output_axis=-2)
  w = q['w']
  with pytest.raises(ValueError, match='codes shape'):
    type(w)(
      **{
        **{f: getattr(w, f) for f in FIELDS},
        'bits': 4,
        'shape': (8, 6),
        'dtype': w.dtype,
        'transposed': True,
      }
    )
  assert not w.swapped().transposed and w.swapped().shape == (8, 6)
  assert w.swapped().swapped().shape == w.shape and w.swapped().swapped().transposed
  np.testing.assert_array_equal(w.swapped().dequantize(), w.dequantize().T)


def test_streamed_torch_layout_equals_in_memory(tmp_path):
  """quantize_checkpoint(layout="torch") of a safetensors file with PyTorch names
  and layouts gives in-memory quantize(output_axis=-2 for 2-D tensors), bit for bit,
  whole or a tile at a time."""
  rng = np.random.default_rng(4)
  bf16 = ml_dtypes.bfloat16
  tensors = {
    'embed.weight': rng.standard_t(3, (300, 64)).astype(bf16),
    'proj.weight': rng.standard_t(3, (200, 64)).astype(bf16),
    'proj.bias': rng.standard_normal(200).astype(bf16),
    'conv.weight': rng.standard_t(3, (8, 4, 3, 3)).astype(bf16),
  }
  save_file(tensors, tmp_path / 'model.safetensors')
  tree = {k: jnp.asarray(v) for k, v in tensors.items()}
  pick = lambda path, leaf: -2 if leaf.ndim == 2 else -1
  want, _ = pqjax.quantize(tree, bits=4, output_axis=pick)
  for working_set in (1 << 30, 1 << 12):
    out = tmp_path / f'out{working_set}'
    pqjax.quantize_checkpoint(
      tmp_path / 'model.safetensors', out, bits=4, layout='torch', working_set=working_set
    )
    got = pqjax.quantized_leaves(pqjax.load(out))  # names split at dots
    for name, r in pqjax.quantized_leaves(want).items():
      g = got[name.replace('.', '/')]
      assert (g.transposed, g.shape) == (r.transposed, r.shape), name
      for f in FIELDS:
        a, b = getattr(g, f), getattr(r, f)
        assert (a is None) == (b is None)
        if b is not None:
          np.testing.assert_array_equal(
            np.asarray(a), np.asarray(b), err_msg=f'{name} {f}'
          )
  assert got['embed/weight'].transposed and not got['conv/weight'].transposed
