"""wrap on every kind of model a JAX user writes, against the dequantized float model.

Linen with remat and scan, NNX with ``nnx.scan`` over stacked layers, Equinox; each
with and without activation quantization (whose reference is wrap's decode path:
the same quantized activations, products in the same order).
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pqjax


def close(got, want, rtol=2e-5):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def check(fn, params_q, *args):
  """Every product path gives the float model's outputs; act_bits agrees across paths."""
  want = jax.jit(fn)(pqjax.dequantize(params_q), *args)
  for path in ('auto', 'fused', 'decode'):
    close(jax.jit(pqjax.wrap(fn, products=path))(params_q, *args), want)
  act = jax.jit(pqjax.wrap(fn, act_bits=8, products='decode'))(params_q, *args)
  close(jax.jit(pqjax.wrap(fn, act_bits=8))(params_q, *args), act)
  assert not np.allclose(np.asarray(act), np.asarray(want), rtol=1e-6, atol=0)
  close(act, want, rtol=0.1)


class RematMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.remat(nn.Dense)(24)(x)
      x = jnp.tanh(x)
    return x


@pytest.mark.parametrize('rows', [1, 40])
def test_linen_remat(rows):
  model = RematMlp()
  x = jax.random.normal(jax.random.key(0), (rows, 24))
  params_q, _ = pqjax.quantize(model.init(jax.random.key(1), x)['params'], 4)
  check(lambda p, x: model.apply({'params': p}, x), params_q, x)
  # Gradients through the rematerialised layers, to the input.
  grad = lambda apply: jax.grad(lambda x: jnp.sum(apply(x) ** 2))(x)
  close(
    grad(lambda x: pqjax.wrap(model.apply)({'params': params_q}, x)),
    grad(lambda x: model.apply({'params': pqjax.dequantize(params_q)}, x)),
    rtol=1e-4,
  )


class NnxBlock(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.linear = nnx.Linear(16, 16, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


@pytest.mark.parametrize('layer_axes', [0, 1])
def test_nnx_scan_over_stacked_layers(layer_axes):
  @nnx.split_rngs(splits=4)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def stack(rngs):
    return NnxBlock(rngs)

  blocks = stack(nnx.Rngs(0))
  graphdef, state = nnx.split(blocks)
  axes = (lambda path, leaf: layer_axes if leaf.ndim >= 3 else 0) if layer_axes else 0
  state_q, _ = pqjax.quantize(state, 4, layer_axes=axes)

  def forward(state, x):
    model = nnx.merge(graphdef, state)

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def run(x, block):
      return block(x)

    return run(x, model)

  x = jax.random.normal(jax.random.key(2), (5, 16))
  check(forward, state_q, x)


def test_equinox_mlp():
  model = eqx.nn.MLP(12, 5, width_size=32, depth=2, key=jax.random.key(3))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  forward = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
  params_q, _ = pqjax.quantize(params, 4)
  x = jax.random.normal(jax.random.key(4), (7, 12))
  check(forward, params_q, x)
