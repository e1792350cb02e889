"""wrap and dequantize with Flax Linen (BatchNorm, mutable collections) and NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(32)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(10)(x)


@pytest.fixture(scope='module')
def linen():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  params_q, _ = pqjax.quantize(variables['params'], 4)
  return model, x, variables, params_q


def assert_same_up_to_summation_order(got, want):
  """Outputs of the same products whose float sums may run in another order."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


PATHS = ('auto', 'decode', 'fused')


@pytest.mark.parametrize('path', PATHS)
def test_linen_inference_matches_dequantized_params(linen, path):
  model, x, variables, params_q = linen
  apply_q = jax.jit(pqjax.wrap(model.apply, products=path), static_argnames='train')
  y = apply_q(
    {'params': params_q, 'batch_stats': variables['batch_stats']}, x, train=False
  )
  want = jax.jit(model.apply, static_argnames='train')(
    {'params': pqjax.dequantize(params_q), 'batch_stats': variables['batch_stats']},
    x,
    train=False,
  )
  if path == 'decode':  # the same decoded weights, the same products
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  assert_same_up_to_summation_order(y, want)
  float_y = model.apply(variables, x, train=False)
  assert not np.array_equal(np.asarray(y), np.asarray(float_y))  # really quantized
  np.testing.assert_allclose(np.asarray(y), np.asarray(float_y), atol=0.3)


@pytest.mark.parametrize('path', PATHS)
def test_linen_training_step_with_mutable_batch_stats_and_rngs(linen, path):
  model, x, variables, params_q = linen

  def run(apply_fn, params):
    return jax.jit(apply_fn, static_argnames=('train', 'mutable'))(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=('batch_stats',),
      rngs={'dropout': jax.random.key(2)},
    )

  y, updates = run(pqjax.wrap(model.apply, products=path), params_q)
  y_ref, updates_ref = run(model.apply, pqjax.dequantize(params_q))
  assert_same_up_to_summation_order(y, y_ref)
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(updates), leaves(updates_ref)):
    assert_same_up_to_summation_order(a, b)
  assert set(updates) == {'batch_stats'}


class NnxMlp(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(12, 32, rngs=rngs)
    self.bn = nnx.BatchNorm(32, rngs=rngs)
    self.l2 = nnx.Linear(32, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.bn(self.l1(x))))


def test_nnx_state_round_trip_through_merge():
  model = NnxMlp(nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  state_q, alphas = pqjax.quantize(state, 4)
  assert isinstance(state_q['l1']['kernel'].get_value(), pqjax.QArray)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.random.normal(jax.random.key(3), (5, 12))
  want = jax.jit(forward)(pqjax.dequantize(state_q), x)
  for path in PATHS:
    y = jax.jit(pqjax.wrap(forward, products=path))(state_q, x)
    assert_same_up_to_summation_order(y, want)
  y8 = jax.jit(pqjax.wrap(forward))(pqjax.quantize(state, 8)[0], x)
  np.testing.assert_allclose(np.asarray(y8), np.asarray(forward(state, x)), atol=0.02)
  assert (
    sum(
      a is not None
      for a in jax.tree_util.tree_leaves(alphas, is_leaf=lambda a: a is None)
    )
    == 2
  )


def test_wrap_passes_other_arguments_untouched():
  seen = {}

  def apply_fn(variables, x, *, flag, extra):
    seen.update(variables=variables, flag=flag, extra=extra)
    return x, variables['params']['w'] * extra['scale'], variables['stats']

  params_q, _ = pqjax.quantize({'w': np.ones((4, 4), np.float32)}, 8)
  marker = object()
  extra = {'mutable': ['batch_stats'], 'obj': marker, 'scale': np.float32(2)}
  out, w, stats = pqjax.wrap(apply_fn)(
    {'params': params_q, 'stats': jnp.ones(2)}, 'x', flag=True, extra=extra
  )
  # Arguments without quantized leaves reach apply_fn as the same objects.
  assert out == 'x' and seen['flag'] is True and seen['extra'] is extra
  assert isinstance(seen['variables']['params']['w'], jax.Array)
  np.testing.assert_array_equal(w, np.full((4, 4), 2.0))
  np.testing.assert_array_equal(stats, np.ones(2))
  assert pqjax.wrap(apply_fn).__name__ == 'apply_fn'


def test_decoding_happens_inside_the_compiled_program():
  params_q, _ = pqjax.quantize({'w': np.ones((64, 32), np.float32)}, 4)
  apply_q = jax.jit(pqjax.wrap(lambda v, x: x @ v['w']))
  lowered = apply_q.lower(params_q, jnp.ones((2, 64)))
  args = jax.tree_util.tree_leaves(lowered.args_info)
  assert any(a.dtype == np.uint8 and a.shape == (32, 32) for a in args)
  assert not any(a.dtype == np.float32 and a.shape == (64, 32) for a in args)


def test_wrap_takes_quantized_positional_and_keyword_arguments():
  rng = np.random.default_rng(0)
  enc, _ = pqjax.quantize({'w': rng.normal(size=(16, 8)).astype(np.float32)}, 4)
  dec, _ = pqjax.quantize({'w': rng.normal(size=(8, 4)).astype(np.float32)}, 4)

  def apply_fn(enc, x, decoder):
    return (x @ enc['w']) @ decoder['w']

  x = jnp.ones((2, 16))
  want = apply_fn(pqjax.dequantize(enc), x, decoder=pqjax.dequantize(dec))
  for path in PATHS:
    y = pqjax.wrap(apply_fn, products=path)(enc, x, decoder=dec)
    assert_same_up_to_summation_order(y, want)
  products = pqjax.quantized_products(pqjax.wrap(apply_fn), enc, x, decoder=dec)
  assert [p.weight for p in products] == ['0/w', 'decoder/w']
