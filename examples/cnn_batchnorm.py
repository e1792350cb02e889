"""A Linen CNN with BatchNorm on scikit-learn's digits images, quantized to 4 bits.

Conv kernels ``(h, w, cin, cout)`` get one scale per output channel; the BatchNorm
statistics (``batch_stats``) pass through ``pqjax.wrap`` untouched.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _digits import accuracy, compare, cross_entropy, digits

import pqjax


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for features in (16, 32):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.relu(x)
    x = nn.avg_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def main() -> None:
  x, y, x_test, y_test = digits(image=True)
  model = CNN()
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
  params, stats = variables['params'], variables['batch_stats']
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, stats, opt_state):
    def loss(p):
      logits, new = model.apply(
        {'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
      )
      return cross_entropy(logits, y), new['batch_stats']

    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  opt_state = opt.init(params)
  for _ in range(100):
    params, stats, opt_state = step(params, stats, opt_state)

  params_q, _ = pqjax.quantize(params, bits=4)
  compare(
    'Linen CNN with BatchNorm, digits',
    lambda v, x: model.apply(v, x, train=False),
    {'params': params, 'batch_stats': stats},
    {'params': params_q, 'batch_stats': stats},
    x_test,
    lambda out: accuracy(out, y_test),
  )


if __name__ == '__main__':
  main()
