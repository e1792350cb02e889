"""What :func:`quantize`'s stages hand each other: selected leaves, their groups, the
statistics of a group and its encoded arrays, and the search's starting point.

The in-memory pipeline (:mod:`pqjax._src.quantize`), the choice of widths under a bit
budget (:mod:`pqjax._src.widths`), the scale storage
(:mod:`pqjax._src.scale_storage`) and the streamed pipeline
(:mod:`pqjax._src.streaming`) all speak these types.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from pqjax._src import encoding, sharding
from pqjax._src.core.blocks import Blocks
from pqjax._src.options import QuantizeOptions
from pqjax._src.search import stats
from pqjax._src.search.config import Plan

# A selected leaf's values: a JAX or NumPy array in memory, or a tensor of a
# checkpoint (``sources.Tensor``) that the streamed pipeline reads when a pass needs
# it. They share ``shape``, ``dtype`` and ``swapaxes``; each pass knows which it has.
LeafValue = Any


class Leaf(NamedTuple):
  """A selected leaf: its position among the flattened leaves, its path and value.

  Its first ``layer_axes`` axes index stacked layers, each quantized on its own.
  ``value`` has the output features last; ``transposed`` says the tree holds it
  with its last two axes swapped (PyTorch's ``(out, in)``).
  """

  position: int
  path: str
  value: LeafValue
  layer_axes: int = 0
  transposed: bool = False
  # Where a leaf replicated on several devices is put back (its value is one copy).
  replicated: NamedSharding | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    """The leaf's shape in the tree."""
    shape = tuple(self.value.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

  @property
  def layers(self) -> tuple[int, ...]:
    """The stacked-layer axes, ``()`` for a single matrix."""
    return tuple(self.value.shape[: self.layer_axes])

  @property
  def layer_count(self) -> int:
    """How many ``(K, N)`` layers the leaf holds."""
    return math.prod(self.layers)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """The shape of one layer."""
    return tuple(self.value.shape[self.layer_axes :])


@dataclasses.dataclass(frozen=True)
class Group:
  """Leaves quantized together: the same scale blocks, sharding and width."""

  blocks: Blocks
  layout: sharding.Layout | None
  leaves: tuple[Leaf, ...]
  # The code width; 0 until a bit budget has chosen it.
  bits: int = 0

  @property
  def values(self) -> tuple[LeafValue, ...]:
    return tuple(leaf.value for leaf in self.leaves)

  @property
  def layer_count(self) -> int:
    """Layers in the group: a stacked leaf counts each of its layers."""
    return sum(leaf.layer_count for leaf in self.leaves)

  @property
  def layers(self) -> tuple[tuple[int, ...], ...]:
    """Each leaf's stacked-layer axes, in order."""
    return tuple(leaf.layers for leaf in self.leaves)

  @property
  def weights(self) -> int:
    return self.blocks.k * self.blocks.n * self.layer_count

  def owner(self, layer: int) -> tuple[Leaf, tuple[int, ...]]:
    """The leaf holding the group's ``layer``-th layer, and its index in the leaf."""
    for leaf in self.leaves:
      if layer < leaf.layer_count:
        return leaf, tuple(int(i) for i in np.unravel_index(layer, leaf.layers))
      layer -= leaf.layer_count
    raise IndexError(layer)


class GroupStats(NamedTuple):
  """One pass over a group: finiteness ``(L,)``, absmax ``(L, nk, 1, ncol)``, stats.

  ``L`` counts layers: every layer of a stacked leaf, in order.
  """

  finite: jax.Array
  absmax: jax.Array
  stats: jax.Array


class Encoded(NamedTuple):
  """A group's packed codes and scales per leaf, and how its scales are stored.

  Each leaf's arrays have its stacked-layer axes first: ``scales`` the float32
  values, ``steps`` and ``columns`` the uint8 form (:class:`encoding.Encoding`).
  ``storage`` is per layer, the same for every layer of a leaf.
  """

  arrays: encoding.Encoding
  storage: np.ndarray


def binary_exponents(group_stats: Sequence[GroupStats]) -> jax.Array:
  """Each layer's scale exponent ``(L,)``, groups in order (see ``stats.normalise``)."""
  return jnp.asarray(
    np.concatenate(
      [
        stats.layer_binary_exponent(np.asarray(sharding.to_host(s.absmax)), np)
        for s in group_stats
      ]
    )
  )


def plan_of(options: QuantizeOptions) -> Plan:
  """What the search varies under ``options``."""
  return Plan(
    search_alpha=options.exponent in ('layer', 'global'),
    search_clip=options.clip_mode != 'fixed',
    shared=options.exponent == 'global',
  )


def starting_point(n: int, options: QuantizeOptions) -> tuple[jax.Array, jax.Array]:
  """Exponents and clip ratios ``(n,)`` before the search: the fixed ones, or 1."""
  fixed = options.exponent if isinstance(options.exponent, float) else 1.0
  return (
    jnp.full((n,), fixed, jnp.float32),
    jnp.full((n,), options.clip_ratio, jnp.float32),
  )
