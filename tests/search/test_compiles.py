"""The number of XLA compilations grows with the number of shapes, not of layers."""

import collections
import logging
import re

import jax
import numpy as np

import pqjax

# The programs that make a pass over the weights, compiled per layer shape.
PASSES = ('group_stats', 'encode_layers')


class _Compiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.names = collections.Counter()

  def emit(self, record):
    m = re.match(r'Finished XLA compilation of jit\((\w+)\)', record.getMessage())
    if m:
      self.names[m.group(1)] += 1


def _count_compiles(fn) -> collections.Counter:
  """Programs compiled while ``fn`` runs, by name."""
  handler = _Compiles()
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  with jax.log_compiles(True):
    try:
      fn()
    finally:
      logger.removeHandler(handler)
  return handler.names


def _passes(names: collections.Counter) -> int:
  return sum(names[p] for p in PASSES)


def _tree(layers_per_shape: int, shapes) -> dict:
  rng = np.random.default_rng(0)
  return {
    f'{i}_{j}': rng.standard_normal(s).astype(np.float32)
    for i, s in enumerate(shapes)
    for j in range(layers_per_shape)
  }


def test_compilations_are_bounded_by_shapes():
  # Programs that depend on no shape are compiled once, by whichever test comes
  # first: a first call here makes the counts below the same in any test order.
  pqjax.quantize(_tree(2, [(59, 29)]), 4)
  # Shapes no other test uses, so that nothing is cached yet.
  shapes = [(37, 11), (41, 13), (43, 17), (47, 19), (53, 23)]
  few = _count_compiles(lambda: pqjax.quantize(_tree(1, shapes), 4))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(_tree(10, shapes2), 4))
  # One statistics and one encoding pass a shape, and one search for the tree, with
  # 1 layer a shape as with 10.
  assert _passes(few) == _passes(many) == 2 * len(shapes), (few, many)
  for names in (few, many):
    assert names['search_stats'] <= 1 and names['refine_layers'] <= 1, names
    # Small programs on the (L,) exponents: a few, none per layer (other tests may
    # have compiled some of them already).
    assert sum(names.values()) - _passes(names) <= 20, names


def test_stacked_layers_compile_as_their_shapes():
  rng = np.random.default_rng(1)

  def stacks(layers, shapes):
    return {
      str(i): rng.standard_normal((layers, *s)).astype(np.float32)
      for i, s in enumerate(shapes)
    }

  pqjax.quantize(stacks(2, [(61, 3)]), 4, layer_axes=1)
  # Shapes no other test uses; each stack joins its shape's group.
  shapes = [(29, 7), (31, 9), (33, 5)]
  few = _count_compiles(lambda: pqjax.quantize(stacks(3, shapes), 4, layer_axes=1))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(stacks(41, shapes2), 4, layer_axes=1))
  # 41 layers a leaf compile like 3: one pass of each kind a shape.
  assert _passes(few) == _passes(many) == 2 * len(shapes), (few, many)
  assert sum(many.values()) - _passes(many) <= 20, many
