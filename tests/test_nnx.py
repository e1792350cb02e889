"""pqjax.nnx: quantized NNX models that run wherever they are called.

The reference for every output is the same model on dequantized parameters
(``pqjax.nnx.dequantize``), and for state updates the float model's own.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax

D, VOCAB = 32, 64


class Block(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(D, 4 * D, rngs=rngs)
    self.down = nnx.Linear(4 * D, D, rngs=rngs)
    self.calls = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return x + self.down(jax.nn.gelu(self.up(x)))


class Decoder(nnx.Module):
  """Embedding, two blocks, a tied head and a KV-like cache updated per call."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.blocks = nnx.List([Block(rngs) for _ in range(2)])
    self.cache = nnx.Cache(jnp.zeros((4, D)))
    self.dropout = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, ids, *, train=False):
    x = self.embed(ids)
    for block in self.blocks:
      x = block(x)
    x = self.dropout(x, deterministic=not train)
    self.cache[...] = jnp.roll(self.cache[...], 1, axis=0).at[0].set(x[0, -1])
    return x @ self.embed.embedding[...].T

  def decode(self, ids):
    return jnp.argmax(self(ids)[:, -1], -1)

  def logits(self, x):
    return x @ self.embed.embedding[...].T


def _model(seed=0):
  return Decoder(nnx.Rngs(seed))


IDS = jnp.array([[1, 5, 9], [2, 0, 63]])


def _host(tree):
  """Every array of a state on the host (random keys as their data)."""
  keys = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
  return jax.tree_util.tree_map(
    lambda x: np.asarray(jax.random.key_data(x) if keys(x) else x), tree
  )


def test_direct_calls_match_the_dequantized_model_and_leave_the_original_alone():
  model = _model()
  before = _host(nnx.to_pure_dict(nnx.state(model)))
  model_q, alphas = pqjax.nnx.quantize(model, bits=4)
  assert isinstance(model_q.blocks[0].up.kernel.get_value(), pqjax.QArray)
  assert isinstance(model_q, Decoder) and type(model_q) is not Decoder
  assert set(pqjax.quantized_leaves(alphas)) == set() and alphas['embed']['embedding'] > 0
  model_f = pqjax.nnx.dequantize(model_q)
  assert type(model_f) is Decoder and type(model_f.blocks[0]) is Block
  np.testing.assert_allclose(model_q(IDS), model_f(IDS), rtol=1e-5, atol=1e-5)
  # Submodules called directly run quantized too.
  x = jnp.ones((2, D))
  np.testing.assert_allclose(
    model_q.blocks[1](x), model_f.blocks[1](x), rtol=1e-5, atol=1e-5
  )
  # State changes are the model's own: the original's are untouched.
  assert int(model_q.blocks[0].calls[...]) == 1 and int(model_q.blocks[1].calls[...]) == 2
  np.testing.assert_allclose(model_q.cache[...], model_f.cache[...], rtol=1e-5, atol=1e-5)
  after = _host(nnx.to_pure_dict(nnx.state(model)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


def test_split_and_merge_under_jit_and_nnx_jit():
  model_q, _ = pqjax.nnx.quantize(_model(), bits=4)
  model_f = pqjax.nnx.dequantize(model_q)
  want = model_f(IDS)
  graphdef, state = nnx.split(model_q)

  @jax.jit
  def step(state, ids):  # what a sampler does: it knows nothing of pqjax
    model = nnx.merge(graphdef, state)
    out = model(ids)
    return out, nnx.state(model)

  out, new_state = step(state, IDS)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  nnx.update(model_q, new_state)
  np.testing.assert_allclose(model_q.cache[...], model_f.cache[...], rtol=1e-5, atol=1e-5)
  assert int(model_q.blocks[0].calls[...]) == 1
  out = nnx.jit(lambda m, ids: m(ids))(model_q, IDS)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  assert int(model_q.blocks[0].calls[...]) == 2  # nnx.jit wrote the update back
  # Quantized parameters are the program's arguments: codes, not floats.
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  assert nbytes(nnx.state(model_q, nnx.Param)) < nbytes(nnx.state(model_f, nnx.Param)) / 3


def test_rngs_advance_as_the_float_models_do():
  model_q, _ = pqjax.nnx.quantize(_model(), bits=4)
  model_f = pqjax.nnx.dequantize(model_q)
  a, b = model_q(IDS, train=True), model_f(IDS, train=True)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  key_q = _host(nnx.to_pure_dict(nnx.state(model_q, nnx.RngState)))
  key_f = _host(nnx.to_pure_dict(nnx.state(model_f, nnx.RngState)))
  jax.tree_util.tree_map(np.testing.assert_array_equal, key_q, key_f)


def test_listed_methods_run_quantized():
  """A method reading a parameter itself (not through ``__call__``) runs quantized
  when listed; unlisted, it meets the QArray."""
  model_q, _ = pqjax.nnx.quantize(_model(), bits=4, methods=('__call__', 'logits'))
  model_f = pqjax.nnx.dequantize(model_q)
  x = jnp.ones((2, D))
  np.testing.assert_allclose(model_q.logits(x), model_f.logits(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(model_q.decode(IDS), model_f.decode(IDS))
  plain, _ = pqjax.nnx.quantize(_model(), bits=4)
  with pytest.raises(TypeError):
    plain.logits(x)


def test_filters_see_paths_without_value():
  seen = []

  def only_up(path, leaf):
    seen.append(path)
    return path.endswith('up/kernel')

  model_q, _ = pqjax.nnx.quantize(_model(), bits=4, filter=only_up)
  assert 'blocks/0/up/kernel' in seen and not any('value' in p for p in seen)
  assert isinstance(model_q.blocks[0].up.kernel.get_value(), pqjax.QArray)
  assert not isinstance(model_q.blocks[0].down.kernel.get_value(), pqjax.QArray)
  assert not isinstance(model_q.embed.embedding.get_value(), pqjax.QArray)


def test_options_and_products_apply():
  model_q, _ = pqjax.nnx.quantize(_model(), bits=3, granularity=16, products='decode')
  assert model_q.blocks[0].down.kernel.get_value().scale.shape == (8, D)
  model_f = pqjax.nnx.dequantize(model_q)
  np.testing.assert_allclose(model_q(IDS), model_f(IDS), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='products must be one of'):
    pqjax.nnx.quantize(_model(), bits=4, products='nope')


class Stack(nnx.Module):
  """Layers stacked by nnx.vmap and run by nnx.scan."""

  def __init__(self, layers, rngs):
    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return nnx.Linear(D, D, rngs=rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def step(x, layer):
      return jnp.tanh(layer(x))

    return step(x, self.layers)


def test_nnx_scan_stacks_with_layer_axes():
  model = Stack(3, nnx.Rngs(1))
  axes = lambda path, leaf: 1 if path == 'layers/kernel' else 0
  model_q, alphas = pqjax.nnx.quantize(model, bits=4, layer_axes=axes)
  q = model_q.layers.kernel.get_value()
  assert isinstance(q, pqjax.QArray) and q.layer_axes == 1 and q.shape == (3, D, D)
  assert alphas['layers']['kernel'].shape == (3,)
  model_f = pqjax.nnx.dequantize(model_q)
  x = jnp.linspace(-1, 1, 2 * D).reshape(2, D)
  np.testing.assert_allclose(model_q(x), model_f(x), rtol=1e-5, atol=1e-5)
  graphdef, state = nnx.split(model_q)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
  np.testing.assert_allclose(out, model_f(x), rtol=1e-5, atol=1e-5)


def test_checkpoints_save_and_load_the_quantized_parameters(tmp_path):
  model_q, _ = pqjax.nnx.quantize(_model(), bits=4)
  pqjax.save(tmp_path / 'q.safetensors', pqjax.nnx.params(model_q))
  other, _ = pqjax.nnx.quantize(_model(seed=7), bits=4)
  pqjax.nnx.load_params(other, pqjax.load(tmp_path / 'q.safetensors'))
  np.testing.assert_array_equal(other(IDS), model_q(IDS))


def _loop_memory(model, steps=8):
  """args + temp of a jitted greedy loop that merges the model in its body."""
  graphdef, state = nnx.split(model)

  def generate(state, ids):
    def body(i, ids):
      logits = nnx.merge(graphdef, state)(ids)
      return jnp.argmax(logits, -1).astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, ids)

  ids = jnp.zeros((1, 1), jnp.int32)
  compiled = jax.jit(generate).lower(state, ids).compile()
  return compiled.memory_analysis().temp_size_in_bytes, compiled(state, ids)


class Wide(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(4096, 256, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(256, 256, rngs=rngs) for _ in range(4)])
    self.head = nnx.Linear(256, 4096, use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return self.head(x)


@pytest.mark.parametrize('products', ['auto', 'fused', 'decode'])
def test_a_generation_loop_decodes_inside_its_body(products):
  """A quantized weight used in a while loop's step is decoded there, at its use:
  the loop's temp memory is the float loop's plus at most the largest decoded
  weight (4096 x 256 float32, 4 MB), not every weight decoded before the loop."""
  model = Wide(nnx.Rngs(0))
  model_q, _ = pqjax.nnx.quantize(model, bits=4, products=products)
  float_temp, _ = _loop_memory(model)
  temp, tokens = _loop_memory(model_q)
  largest = 4096 * 256 * 4
  # The embedding's decode may share its step with the first layer's (1/16 of it).
  assert temp <= float_temp + largest * 1.1, (temp, float_temp)
  _, want = _loop_memory(pqjax.nnx.dequantize(model_q))
  np.testing.assert_array_equal(tokens, want)
