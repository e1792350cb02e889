"""The number of XLA compilations grows with the number of shapes, not of layers."""

import jax
import numpy as np

import pqjax

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def _count_compiles(fn) -> int:
  count = 0

  def listener(event, duration, **kwargs):
    nonlocal count
    if event == _COMPILE_EVENT:
      count += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return count


def _tree(layers_per_shape: int, shapes) -> dict:
  rng = np.random.default_rng(0)
  return {
    f'{i}_{j}': rng.standard_normal(s).astype(np.float32)
    for i, s in enumerate(shapes)
    for j in range(layers_per_shape)
  }


def test_compilations_are_bounded_by_shapes():
  # Shapes no other test uses, so that nothing is cached yet.
  shapes = [(37, 11), (41, 13), (43, 17), (47, 19), (53, 23)]
  few = _count_compiles(lambda: pqjax.quantize(_tree(1, shapes), 4))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(_tree(10, shapes2), 4))
  assert many <= few + 5 * 2, (few, many)  # stacking 10 layers adds at most a few
  assert many <= 12 * len(shapes), many


def test_stacked_layers_compile_as_their_shapes():
  rng = np.random.default_rng(1)

  def stacks(layers, shapes):
    return {
      str(i): rng.standard_normal((layers, *s)).astype(np.float32)
      for i, s in enumerate(shapes)
    }

  # Shapes no other test uses; each stack joins its shape's group.
  shapes = [(29, 7), (31, 9), (33, 5)]
  few = _count_compiles(lambda: pqjax.quantize(stacks(3, shapes), 4, layer_axes=1))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(stacks(41, shapes2), 4, layer_axes=1))
  # 41 layers a leaf compile like 3: a few small programs depend on the number of
  # layers (their exponents, tables), none on each layer.
  assert many <= few + 2 * len(shapes), (few, many)
  assert many <= 12 * len(shapes), many
