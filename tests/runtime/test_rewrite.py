"""wrap's program rewrite: weights decoded where they are used, in every kind of program.

Each result is compared with the same function run on ``pqjax.dequantize(params_q)``
(the float reference), up to the order of float summation; the memory of compiled
programs is read from ``memory_analysis()``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from pqjax._src.runtime import products, weights

PATHS = ('auto', 'decode', 'fused')


def close(got, want, rtol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(
    got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30)
  )


def quantized(shapes, bits=4, seed=0, **options):
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  params = {
    name: jax.random.normal(k, shape) * 0.3
    for k, (name, shape) in zip(keys, shapes.items())
  }
  params_q, _ = pqjax.quantize(params, bits, **options)
  return params_q, pqjax.dequantize(params_q)


@pytest.mark.parametrize('path', PATHS)
def test_nested_programs(path):
  params_q, dq = quantized(
    {'a': (16, 16), 'b': (16, 16), 'stack': (3, 16, 16), 'table': (30, 16)}, bits=5
  )

  def forward(p, ids):
    x = p['table'][ids]
    x = jax.jit(lambda x, w: x @ w.T)(x, p['a'])  # a transposed use
    x = jax.checkpoint(lambda x, w: jax.nn.relu(x @ w))(x, p['b'])
    x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, p['stack'])
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ p['a'], lambda x: x @ p['b'], x)
    x = jax.lax.fori_loop(0, 2, lambda i, x: jnp.sin(x @ p['b']), x)
    return x * p['a'][0]  # arithmetic on a weight

  ids = jnp.array([[1, 4, 29], [7, 0, 3]])
  got = jax.jit(pqjax.wrap(forward, products=path))(params_q, ids)
  close(got, jax.jit(forward)(dq, ids))


def test_gradients_flow_to_activations_and_float_parameters():
  params_q, dq = quantized({'w': (12, 8)})
  bias = jnp.linspace(-1, 1, 8)

  def loss(p, b, x):
    return jnp.sum(jnp.tanh(x @ p['w'] + b) ** 2)

  x = jax.random.normal(jax.random.key(3), (5, 12))
  for path in PATHS:
    got = jax.jit(jax.grad(pqjax.wrap(loss, products=path), argnums=(1, 2)))(
      params_q, bias, x
    )
    want = jax.grad(loss, argnums=(1, 2))(dq, bias, x)
    for g, w in zip(got, want):
      close(g, w, rtol=1e-4)


@pytest.mark.parametrize('bits', [3, 4])
def test_pallas_kernel_products_differentiate(bits):
  # A Pallas kernel has no derivative of its own (jax.grad failed to linearize it).
  params_q, dq = quantized({'w': (24, 8)}, bits=bits)
  loss = lambda p, x: jnp.sum(jnp.tanh(x @ p['w']) ** 2)
  x = jax.random.normal(jax.random.key(4), (5, 24))
  wrapped = pqjax.wrap(loss, products='kernel')
  assert [u.path for u in pqjax.quantized_products(wrapped, params_q, x)] == ['kernel']
  close(
    jax.jit(jax.grad(wrapped, argnums=1))(params_q, x), jax.grad(loss, 1)(dq, x), 1e-4
  )
  t = jnp.cos(x)
  got = jax.jvp(lambda x: wrapped(params_q, x), (x,), (t,))
  want = jax.jvp(lambda x: loss(dq, x), (x,), (t,))
  close(got[0], want[0])
  close(got[1], want[1], 1e-4)


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize('granularity', ['channel', 'tensor', 7])
def test_row_lookups_decode_only_their_rows(bits, granularity):
  params_q, dq = quantized({'e': (45, 6)}, bits=bits, granularity=granularity)
  ids = jnp.array([[0, 44, 13], [31, 2, 44]])
  take = lambda p, i: p['e'][i]
  got = jax.jit(pqjax.wrap(take))(params_q, ids)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(dq['e'])[np.asarray(ids)])
  uses = pqjax.quantized_products(take, params_q, ids)
  assert [(u.primitive, u.path) for u in uses] == [('gather', 'rows')]
  # Out of range: jnp.take's default fills with NaN, as on the float table.
  fill = lambda p, i: jnp.take(p['e'], i, axis=0)
  bad = jnp.array([3, 45, -50])
  np.testing.assert_array_equal(
    np.asarray(jax.jit(pqjax.wrap(fill))(params_q, bad)),
    np.asarray(jnp.take(dq['e'], bad, axis=0)),
  )


def test_scan_slices_stacked_weights_one_layer_a_step():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return jnp.tanh(nn.Dense(32)(x)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      scan = nn.scan(
        Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=6
      )
      return scan()(x, None)[0]

  net = Net()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  params = net.init(jax.random.key(1), x)['params']
  params_q, _ = pqjax.quantize(params, 4)
  apply = lambda p, x: net.apply({'params': p}, x)
  want = apply(pqjax.dequantize(params_q), x)
  for path in PATHS:
    close(jax.jit(pqjax.wrap(apply, products=path))(params_q, x), want)
  stacked = params_q['ScanBlock_0']['Dense_0']['kernel']
  layers = weights.as_layers(stacked, 6)
  assert layers is not None and layers.codes.shape == (6, 16, 32)
  np.testing.assert_array_equal(
    np.asarray(layers.dequantize()), np.asarray(stacked.dequantize())
  )


def test_as_layers_refuses_blocks_that_straddle_layers():
  params_q, _ = quantized({'w': (4, 6, 8)}, bits=3, granularity='channel')
  assert weights.as_layers(params_q['w'], 4) is None  # 6 rows: not whole 8-row units
  params_q, _ = quantized({'w': (4, 8, 8)}, bits=4, granularity=5)
  assert weights.as_layers(params_q['w'], 4) is None  # groups of 5 cross layers
  params_q, _ = quantized({'w': (4, 8, 8)}, bits=4, granularity=4)
  assert weights.as_layers(params_q['w'], 4) is not None


def test_tie_keeps_values_and_blocks_nothing_from_nan():
  scale = jnp.array([[0.5, 2.0]])
  for t in (jnp.array([3.0]), jnp.array([jnp.inf]), jnp.array([jnp.nan]), jnp.ones((0,))):
    np.testing.assert_array_equal(np.asarray(weights.tied(scale, t)), np.asarray(scale))


def chain(n, d, scan):
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
      return jnp.tanh(nn.Dense(d, use_bias=False)(x)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      if scan:
        layers = nn.scan(
          Layer, variable_axes={'params': 0}, split_rngs={'params': True}, length=n
        )
        return layers()(x, None)[0]
      for _ in range(n):
        x = Layer()(x)[0]
      return x

  return Net()


def temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize('scan', [False, True])
def test_temp_memory_holds_at_most_one_decoded_weight(scan):
  n, d = 8, 512
  net = chain(n, d, scan)
  params = net.init(jax.random.key(0), jnp.ones((1, d)))['params']
  params_q, _ = pqjax.quantize(params, 4)
  apply = lambda p, x: net.apply({'params': p}, x)
  weight = d * d * 4  # one decoded float32 weight
  for rows in (1, 16, 96):
    x = jnp.ones((rows, d))
    float_temp = temp_bytes(apply, params, x)
    temp = temp_bytes(pqjax.wrap(apply), params_q, x)
    assert temp <= (float_temp + weight) * 1.1, (rows, temp, float_temp)
    decode_temp = temp_bytes(pqjax.wrap(apply, products='decode'), params_q, x)
    assert decode_temp <= (float_temp + weight) * 1.1, (rows, decode_temp, float_temp)
    # Decoding every weight at the start would need all of them at once.
    assert decode_temp < n * weight / 2
  # One row reads the codes inside each product: no weight is decoded whole.
  x = jnp.ones((1, d))
  assert temp_bytes(pqjax.wrap(apply), params_q, x) < weight / 2


def test_products_option_is_checked():
  with pytest.raises(ValueError, match='products'):
    pqjax.wrap(lambda p: p, products='fast')
  assert products.check_path('fused') == 'fused'


def test_kernel_path_runs_the_pallas_kernel_interpreted_on_cpu():
  params_q, dq = quantized({'a': (40, 24), 'b': (24, 16)}, bits=4)
  forward = lambda p, x: jnp.tanh(x @ p['a']) @ p['b']
  x = jax.random.normal(jax.random.key(2), (3, 40))
  wrapped = pqjax.wrap(forward, products='kernel')
  close(jax.jit(wrapped)(params_q, x), forward(dq, x))
  uses = pqjax.quantized_products(wrapped, params_q, x)
  assert [u.path for u in uses] == ['kernel', 'kernel']
  # Small weights: read inside the product by the native kernel for a few rows;
  # without it, inside an XLA product for one row, decoded for more.
  native = 'native' if pqjax.native_status().loaded else None
  assert [u.path for u in pqjax.quantized_products(forward, params_q, x)] == [
    native or 'decode'
  ] * 2
  one = pqjax.quantized_products(forward, params_q, x[:1])
  assert [u.path for u in one] == [native or 'fused'] * 2


def test_large_weights_are_decoded_in_blocks_of_columns(monkeypatch):
  # Blocks of 64 KB: a 96 x 700 weight (269 KB as float32) is decoded 170 columns
  # at a time, each block tied to the last.
  monkeypatch.setattr(products, 'DECODE_BLOCK_BYTES', 1 << 16)
  params_q, dq = quantized({'w': (96, 700)}, bits=4)
  forward = lambda p, x: jnp.tanh(x @ p['w'])
  x = jax.random.normal(jax.random.key(5), (40, 96))
  wrapped = pqjax.wrap(forward, products='decode')
  close(jax.jit(wrapped)(params_q, x), forward(dq, x))
  temp = temp_bytes(wrapped, params_q, x)
  assert temp < 96 * 700 * 4, temp  # never the whole decoded weight
