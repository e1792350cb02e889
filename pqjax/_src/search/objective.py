"""The reconstruction error of a layer: from binned statistics, or exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pqjax._src.core import grid as grid_lib
from pqjax._src.search.stats import bin_edges, centre

# Up to this many levels a side, a lookup by code is a sum of selects, which XLA:CPU
# runs several times faster than a gather.
_SELECT_LEVELS = 17
# Above this many thresholds a side (6 to 8 bits), each bin edge's code is counted
# from the bin of each threshold rather than by comparing every edge with every
# threshold: the same integers, the objective 2 to 8 times faster there.
_COMPARE_STEPS = 16


def _lookup(table: jax.Array, k: jax.Array) -> jax.Array:
  """``table[l, k[l, i]]`` for a small per-layer table ``(L, m)`` and codes ``(L, B)``."""
  if table.shape[1] > _SELECT_LEVELS:
    return jnp.take_along_axis(table, k, axis=1)
  out = jnp.zeros(k.shape, table.dtype)
  for j in range(table.shape[1]):
    out = jnp.where(k == j, table[:, j : j + 1], out)
  return out


def _edge_codes(t: jax.Array, bins: int) -> jax.Array:
  """``k[l, e]``: how many thresholds ``t[l]`` lie at or below bin edge ``e``.

  Each threshold's first edge at or above it is found from its place in the bins
  (uniform in ``x ** (1/4)``), corrected against the edges themselves so that it
  is exact, and the counts are a running sum of those places.
  """
  edges = jnp.concatenate([bin_edges(bins), jnp.full((1,), jnp.inf, jnp.float32)])
  first = jnp.clip(jnp.ceil(jnp.sqrt(jnp.sqrt(t)) * bins).astype(jnp.int32), 0, bins + 1)
  for _ in range(2):
    below = edges[jnp.maximum(first - 1, 0)]
    first = jnp.where((first >= 1) & (below >= t), first - 1, first)
    first = jnp.where(edges[jnp.minimum(first, bins)] < t, first + 1, first)
  rows = jnp.arange(t.shape[0])[:, None]
  hits = jnp.zeros((t.shape[0], bins + 2), jnp.int32).at[rows, first].add(1)
  return jnp.cumsum(hits, axis=1)[:, : bins + 1]


def _side_error(w: jax.Array, a: jax.Array, c: jax.Array, d: int, grid: str) -> jax.Array:
  """Binned error of one sign's bins ``w`` ``(L, bins, 2)`` whose codes span 0..d.

  The ``d`` levels and thresholds of each layer cost a few ``pow``; each bin edge
  then needs only compares and lookups: its code is the number of thresholds at or
  below it. A bin whose edges take different codes straddles a threshold ``t``:
  its mass above ``t`` goes to the upper level. That share is taken from a uniform
  density inside the bin, which leaves an error of second order in the bin width.
  """
  bins = w.shape[1]
  a, c = a[:, None], c[:, None]
  levels = c * grid_lib.level_magnitude(jnp.arange(d + 1), a, d)  # (L, d + 1)
  t = c * grid_lib.side_thresholds(a, d, grid)  # (L, d)
  edges = bin_edges(bins)
  if d > _COMPARE_STEPS:
    k = _edge_codes(t, bins)
  else:
    k = jnp.zeros((t.shape[0], bins + 1), jnp.int32)
    for j in range(d):
      k = k + (edges[None, :] >= t[:, j : j + 1]).astype(jnp.int32)
  k_lo, k_hi = k[:, :-1], k[:, 1:]
  l_lo, l_hi = _lookup(levels, k_lo), _lookup(levels, k_hi)
  lo, hi = edges[:-1], edges[1:]
  w0, w1 = w[..., 0], w[..., 1]
  dist = centre(jnp.arange(bins), bins) - l_lo
  whole = 2 * dist * w1 + dist * dist * w0
  tt = jnp.clip(_lookup(t, jnp.maximum(k_hi - 1, 0)), lo, hi)
  density = w0 / (hi - lo)
  moved = density * (l_lo - l_hi) * ((hi * hi - tt * tt) - (l_lo + l_hi) * (hi - tt))
  return jnp.sum(whole + jnp.where(k_hi > k_lo, moved, 0.0), axis=-1)


def stats_error(
  stats: jax.Array, alpha: jax.Array, clip: jax.Array, bits: int, grid: str
) -> jax.Array:
  """Reconstruction error of each layer, less a constant, from binned stats: ``(L,)``."""
  d_neg, d_pos = grid_lib.steps(bits, grid)
  return _side_error(stats[:, 0], alpha, clip, d_pos, grid) + _side_error(
    stats[:, 1], alpha, clip, d_neg, grid
  )


def exact_inputs(
  xs: jax.Array, bits: int, grid: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``|x|``, ``log |x|`` and each weight's code range ``d``, for :func:`block_error`."""
  d_neg, d_pos = grid_lib.steps(bits, grid)
  x = jnp.abs(xs)
  d = jnp.where(xs < 0, jnp.float32(d_neg), jnp.float32(d_pos))
  return x, jnp.log(x), d


# The pipeline is split so that only light programs depend on a layer's shape:
