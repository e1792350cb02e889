"""A Flax Linen MLP on scikit-learn's digits, quantized to 4 bits with pqjax."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from _digits import accuracy, compare, cross_entropy, digits, fit

import pqjax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Dense(256)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(10)(x)


def main() -> None:
  x, y, x_test, y_test = digits()
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 64)))['params']
  params = fit(params, lambda p: cross_entropy(model.apply({'params': p}, x), y))

  params_q, alphas = pqjax.quantize(params, bits=4)
  print('exponents:', {k: round(v['kernel'], 3) for k, v in alphas.items()})
  compare(
    'Linen MLP, digits',
    lambda p, x: model.apply({'params': p}, x),
    params,
    params_q,
    x_test,
    lambda out: accuracy(out, y_test),
  )


if __name__ == '__main__':
  main()
