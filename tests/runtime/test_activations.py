"""Activation quantization: wrap(act_bits=...) against NumPy references, and which
products it rewrites in Linen, NNX and plain JAX programs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core

import pqjax
from tests.reference import fake_quantize


def np_conv_same(x, w):
  """Stride-1 'SAME' convolution, NHWC input, HWIO kernel, by explicit window sums."""
  kh, kw = w.shape[:2]
  ph, pw = (kh - 1) // 2, (kw - 1) // 2
  xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  n, h, wd, _ = x.shape
  out = np.zeros((n, h, wd, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('nhwc,co->nhwo', xp[:, i : i + h, j : j + wd], w[i, j])
  return out


def count_rounds(jaxpr: core.Jaxpr) -> int:
  """Round operations in a program and its nested programs: one per quantized input."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == 'round'
    for sub in core.jaxprs_in_params(eqn.params):
      n += count_rounds(sub)
  return n


def heavy_tailed(key, shape):
  return jax.random.laplace(key, shape) * jnp.linspace(0.2, 3.0, shape[-1])


@pytest.mark.parametrize('granularity', ['tensor', 'token'])
@pytest.mark.parametrize('bits', [4, 8])
def test_dense_matches_numpy_reference(bits, granularity):
  layer = nn.Dense(24)
  x = heavy_tailed(jax.random.key(0), (3, 5, 40))
  params = layer.init(jax.random.key(1), x)['params']
  params_q, alphas = pqjax.quantize(params, bits)
  y = jax.jit(pqjax.wrap(layer.apply, act_bits=bits, act_granularity=granularity))(
    {'params': params_q}, x
  )

  alpha = float(alphas['kernel'])
  axes = None if granularity == 'tensor' else (-1,)
  w_hat = np.asarray(pqjax.dequantize(params_q)['kernel'], np.float64)
  want = fake_quantize(x, alpha, bits, axes) @ w_hat + np.asarray(params['bias'])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
  weight_only = pqjax.wrap(layer.apply)({'params': params_q}, x)
  assert np.abs(np.asarray(weight_only) - want).max() > 1e-3  # the input was quantized


@pytest.mark.parametrize('granularity', ['tensor', 'token'])
def test_conv_matches_numpy_reference(granularity):
  layer = nn.Conv(6, (3, 3), padding='SAME')
  x = jax.nn.relu(heavy_tailed(jax.random.key(2), (2, 7, 7, 5)))
  params = layer.init(jax.random.key(3), x)['params']
  params_q, alphas = pqjax.quantize(params, 4, exponent=0.6)
  y = jax.jit(pqjax.wrap(layer.apply, act_bits=4, act_granularity=granularity))(
    {'params': params_q}, x
  )

  axes = None if granularity == 'tensor' else (-1,)  # per pixel: over the channels
  x_hat = fake_quantize(x, float(alphas['kernel']), 4, axes)
  w_hat = np.asarray(pqjax.dequantize(params_q)['kernel'], np.float64)
  want = np_conv_same(x_hat, w_hat) + np.asarray(params['bias'])
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_given_exponent_and_zero_input():
  w = np.asarray(heavy_tailed(jax.random.key(4), (16, 8)))
  params_q, _ = pqjax.quantize({'w': w}, 6, exponent=0.6)
  x = np.asarray(heavy_tailed(jax.random.key(5), (4, 16)))
  apply_q = jax.jit(pqjax.wrap(lambda p, x: x @ p['w'], act_bits=6, act_exponent=1.0))
  w_hat = np.asarray(pqjax.dequantize(params_q)['w'], np.float64)
  np.testing.assert_allclose(
    np.asarray(apply_q(params_q, x)),
    fake_quantize(x, 1.0, 6) @ w_hat,
    rtol=1e-5,
    atol=1e-5,
  )
  zeros = apply_q(params_q, np.zeros((4, 16), np.float32))
  np.testing.assert_array_equal(np.asarray(zeros), np.zeros((4, 8)))


class ResNetish(nn.Module):
  """Conv stem, one residual block, pooled Dense head; BatchNorm after each conv."""

  def setup(self):
    self.stem = nn.Conv(8, (3, 3))
    self.bn0 = nn.BatchNorm(use_running_average=True)
    self.conv1 = nn.Conv(8, (3, 3))
    self.bn1 = nn.BatchNorm(use_running_average=True)
    self.conv2 = nn.Conv(8, (3, 3))
    self.bn2 = nn.BatchNorm(use_running_average=True)
    self.hidden = nn.Dense(16)
    self.head = nn.Dense(10)

  def features(self, x):
    x = nn.relu(self.bn0(self.stem(x)))
    y = nn.relu(self.bn1(self.conv1(x)))
    x = nn.relu(x + self.bn2(self.conv2(y)))
    return nn.relu(self.hidden(jnp.mean(x, axis=(1, 2))))

  def __call__(self, x):
    return self.head(self.features(x))


@pytest.fixture(scope='module')
def cnn():
  model = ResNetish()
  x = jax.nn.relu(heavy_tailed(jax.random.key(6), (4, 8, 8, 1)))
  variables = model.init(jax.random.key(7), x)
  # Every layer quantized but the head, whose input must stay float.
  params_q, _ = pqjax.quantize(
    variables['params'],
    4,
    exponent=0.6,
    filter=lambda path, leaf: leaf.ndim >= 2 and not path.startswith('head'),
  )
  return model, x, {'params': params_q, 'batch_stats': variables['batch_stats']}


def test_cnn_rewrites_exactly_the_quantized_layers_under_jit(cnn):
  model, x, variables_q = cnn
  products = pqjax.quantized_products(model.apply, variables_q, x)
  assert [(p.primitive, p.weight) for p in products] == [
    ('conv_general_dilated', '0/params/stem/kernel'),
    ('conv_general_dilated', '0/params/conv1/kernel'),
    ('conv_general_dilated', '0/params/conv2/kernel'),
    ('dot_general', '0/params/hidden/kernel'),
  ]
  quantized = jax.make_jaxpr(jax.jit(pqjax.wrap(model.apply, act_bits=4)))(variables_q, x)
  weight_only = jax.make_jaxpr(jax.jit(pqjax.wrap(model.apply)))(variables_q, x)
  assert count_rounds(quantized.jaxpr) == 4
  assert count_rounds(weight_only.jaxpr) == 0


def test_cnn_leaves_the_float_layers_input_untouched(cnn):
  model, x, variables_q = cnn
  apply_q = jax.jit(pqjax.wrap(model.apply, act_bits=4), static_argnames='method')
  features = np.asarray(apply_q(variables_q, x, method='features'), np.float64)
  head = variables_q['params']['head']
  want = features @ np.asarray(head['kernel']) + np.asarray(head['bias'])
  np.testing.assert_allclose(
    np.asarray(apply_q(variables_q, x)), want, rtol=1e-5, atol=1e-5
  )
  assert (
    np.abs(want - fake_quantize(features, 1.0, 4) @ np.asarray(head['kernel'])).max()
    > 1e-3
  )  # a quantized head input would be told apart


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(12, 32, rngs=rngs)
    self.l2 = nnx.Linear(32, 16, rngs=rngs)
    self.l3 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(nnx.relu(self.l1(x)))))


def test_nnx_model_against_numpy_with_one_float_layer():
  graphdef, state = nnx.split(NnxMlp(nnx.Rngs(0)))
  state_q, alphas = pqjax.quantize(
    state,
    5,
    exponent=0.7,
    filter=lambda path, leaf: leaf.ndim >= 2 and not path.startswith('l3'),
  )
  forward = lambda state, x: nnx.merge(graphdef, state)(x)
  x = heavy_tailed(jax.random.key(8), (6, 12))
  y = jax.jit(pqjax.wrap(forward, act_bits=5))(state_q, x)

  dq = pqjax.dequantize(state_q)
  w = {k: np.asarray(dq[k]['kernel'].get_value(), np.float64) for k in ('l1', 'l2', 'l3')}
  b = {k: np.asarray(dq[k]['bias'].get_value(), np.float64) for k in ('l1', 'l2', 'l3')}
  a = {k: float(alphas[k]['kernel'].get_value()) for k in ('l1', 'l2')}
  h = np.maximum(fake_quantize(x, a['l1'], 5) @ w['l1'] + b['l1'], 0)
  h = np.maximum(fake_quantize(h, a['l2'], 5) @ w['l2'] + b['l2'], 0)
  np.testing.assert_allclose(np.asarray(y), h @ w['l3'] + b['l3'], rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(jax.jit(pqjax.wrap(forward, act_bits=5)))(state_q, x)
  assert count_rounds(jaxpr.jaxpr) == 2
  assert [p.weight for p in pqjax.quantized_products(forward, state_q, x)] == [
    '0/l1/kernel/value',
    '0/l2/kernel/value',
  ]


def test_weights_are_followed_into_nested_programs():
  params = {
    'a': heavy_tailed(jax.random.key(9), (8, 8)),
    'stack': heavy_tailed(jax.random.key(10), (3, 8, 8)),
    'table': heavy_tailed(jax.random.key(11), (20, 8)),
  }
  params_q, alphas = pqjax.quantize(params, 6, exponent=0.65)

  def forward(p, ids):
    x = p['table'][ids]  # a gather: the table's rows are not a product's input
    x = jax.jit(lambda x, w: x @ w.T)(x, p['a'])
    x = jax.checkpoint(lambda x, w: jax.nn.relu(x @ w))(x, p['a'])
    x, _ = jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, p['stack'])
    return x

  ids = jnp.array([1, 4, 19, 7])
  y = jax.jit(pqjax.wrap(forward, act_bits=6))(params_q, ids)
  uses = [
    (p.primitive, p.weight) for p in pqjax.quantized_products(forward, params_q, ids)
  ]
  # The table is only gathered (its rows decoded alone); the products take the rest.
  assert uses == [
    ('gather', '0/table'),
    ('dot_general', '0/a'),
    ('dot_general', '0/a'),
    ('dot_general', '0/stack'),
  ]

  dq = {k: np.asarray(v, np.float64) for k, v in pqjax.dequantize(params_q).items()}
  a = {k: float(v) for k, v in alphas.items()}
  x = dq['table'][np.asarray(ids)]
  x = fake_quantize(x, a['a'], 6) @ dq['a'].T
  x = np.maximum(fake_quantize(x, a['a'], 6) @ dq['a'], 0)
  for w in dq['stack']:
    x = np.tanh(fake_quantize(x, a['stack'], 6) @ w)
  np.testing.assert_allclose(np.asarray(y), x, rtol=1e-4, atol=1e-5)


def test_act_bits_none_is_the_weight_only_wrap(cnn):
  model, x, variables_q = cnn
  want = jax.jit(model.apply)(pqjax.dequantize(variables_q), x)
  for wrapped in (
    pqjax.wrap(model.apply, act_bits=None, products='decode'),
    pqjax.wrap(model.apply, act_bits=None, act_granularity='token', products='decode'),
  ):
    np.testing.assert_array_equal(
      np.asarray(jax.jit(wrapped)(variables_q, x)), np.asarray(want)
    )


def test_weights_are_followed_into_while_loops():
  params = {'w': heavy_tailed(jax.random.key(12), (4, 4)) * 0.5}
  params_q, alphas = pqjax.quantize(params, 8)

  def loop(p, x, n):
    return jax.lax.fori_loop(0, n, lambda i, x: jnp.tanh(x @ p['w']), x)

  x = heavy_tailed(jax.random.key(13), (2, 4))
  y = jax.jit(pqjax.wrap(loop, act_bits=8))(params_q, x, jnp.int32(3))
  w = np.asarray(pqjax.dequantize(params_q)['w'], np.float64)
  want = np.asarray(x, np.float64)
  for _ in range(3):
    want = np.tanh(fake_quantize(want, float(alphas['w']), 8) @ w)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  'options, message',
  [
    ({'act_bits': 1}, 'act_bits'),
    ({'act_bits': 9}, 'act_bits'),
    ({'act_bits': 4.0}, 'act_bits'),
    ({'act_bits': True}, 'act_bits'),
    ({'act_bits': 4, 'act_granularity': 'channel'}, 'act_granularity'),
    ({'act_granularity': 'row'}, 'act_granularity'),
    ({'act_bits': 4, 'act_exponent': 0.0}, 'act_exponent'),
    ({'act_bits': 4, 'act_exponent': float('nan')}, 'act_exponent'),
  ],
)
def test_bad_options_raise(options, message):
  with pytest.raises(ValueError, match=message):
    pqjax.wrap(lambda p, x: x, **options)


@pytest.mark.slow
def test_minilm_w8a8_embeddings():
  from pqjax.tools import corpus, minilm

  model = minilm.load()
  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(64))
  batch = text.batches[0]
  reference = minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)
  params_q, _ = pqjax.quantize(model.params, 8)
  products = pqjax.quantized_products(
    model.module.apply,
    {'params': params_q},
    batch['input_ids'],
    batch['attention_mask'],
    batch['token_type_ids'],
  )
  # The 37 Dense kernels are products; the three embedding tables are only gathered,
  # each decoding just the rows it takes.
  dots = [p for p in products if p.primitive == 'dot_general']
  lookups = [p for p in products if p.primitive == 'gather']
  assert len(dots) == 37 and all('embeddings' not in p.weight for p in dots)
  assert len(lookups) == 3 and all(
    'embeddings' in p.weight and p.path == 'rows' for p in lookups
  )

  def cosine(**options):
    embed = minilm.embed_fn(pqjax.wrap(model.module.apply, act_bits=8, **options))
    return minilm.cosines(reference, minilm.embed_all(embed, params_q, text)).mean()

  assert cosine(act_granularity='token') >= 0.999
  # Per tensor, the layers' power exponents beat a uniform activation grid.
  assert cosine() > cosine(act_exponent=1.0) + 0.005
