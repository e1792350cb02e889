"""A Flax NNX model on scikit-learn's digits: quantize the state from ``nnx.split``."""

import jax
from _digits import accuracy, compare, cross_entropy, digits, fit
from flax import nnx

import pqjax


class Classifier(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, 256, rngs=rngs)
    self.out = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.out(nnx.relu(self.hidden(x)))


def main() -> None:
  x, y, x_test, y_test = digits()
  graphdef, state = nnx.split(Classifier(nnx.Rngs(0)))

  def forward(state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)

  state = fit(state, lambda s: cross_entropy(forward(s, x), y))
  state_q, _ = pqjax.quantize(state, bits=4)
  compare(
    'NNX model, digits',
    forward,
    state,
    state_q,
    x_test,
    lambda out: accuracy(out, y_test),
  )


if __name__ == '__main__':
  main()
