"""An Equinox MLP on scikit-learn's digits: quantize the arrays of ``eqx.partition``.

Equinox's ``Linear`` stores its weight as ``(out, in)``; pqjax puts one scale per
last-axis column, so here that is one scale per input feature.
"""

import equinox as eqx
import jax
from _digits import accuracy, compare, cross_entropy, digits, fit

import pqjax


def main() -> None:
  x, y, x_test, y_test = digits()
  model = eqx.nn.MLP(64, 10, width_size=256, depth=2, key=jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def forward(params, x: jax.Array) -> jax.Array:
    return jax.vmap(eqx.combine(params, static))(x)

  params = fit(params, lambda p: cross_entropy(forward(p, x), y))
  # `params` is the model with None in place of its static parts: a plain pytree.
  params_q, _ = pqjax.quantize(params, bits=4)
  compare(
    'Equinox MLP, digits',
    forward,
    params,
    params_q,
    x_test,
    lambda out: accuracy(out, y_test),
  )


if __name__ == '__main__':
  main()
