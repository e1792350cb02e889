"""Shared by the examples: scikit-learn's 8x8 digits, a training loop, a comparison."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import pqjax


def digits(image: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train, y_train, x_test, y_test)``; images ``(n, 8, 8, 1)`` or rows of 64."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)
  x = x[..., None] if image else x.reshape(len(x), -1)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  return x[:1400], y[:1400], x[1400:], y[1400:]


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(logits: Any, y: np.ndarray) -> float:
  return float(np.mean(np.argmax(np.asarray(logits), -1) == y))


def fit(
  params: Any, loss: Callable[[Any], jax.Array], steps: int = 300, lr: float = 3e-3
) -> Any:
  """Full-batch Adam on ``loss(params)``; returns the trained params."""
  opt = optax.adam(lr)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params


def compare(
  name: str,
  forward: Callable[[Any, Any], Any],
  params: Any,
  params_q: Any,
  x: Any,
  score: Callable[[Any], float],
  metric: str = 'accuracy',
) -> None:
  """Runs ``forward`` on float and (wrapped) quantized params under jit; prints both."""
  float_out = jax.jit(forward)(params, x)
  quant_out = jax.jit(pqjax.wrap(forward))(params_q, x)
  diff = float(jnp.max(jnp.abs(jnp.asarray(float_out) - jnp.asarray(quant_out))))
  print(name)
  print(f'bytes: {pqjax.nbytes(params):,} -> {pqjax.nbytes(params_q):,}')
  print(f'float {metric}: {score(float_out):.4f}')
  print(f'pqjax 4-bit {metric}: {score(quant_out):.4f}')
  print(f'max |float - quantized| output: {diff:.4f}')
