"""The reconstruction error of a layer: from binned statistics, or exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pqjax._src.core import grid as grid_lib
from pqjax._src.search.stats import bin_edges, centre

# Up to this many levels a side, a lookup by code is a sum of selects, which XLA:CPU
# runs several times faster than a gather.
_SELECT_LEVELS = 17


def _lookup(table: jax.Array, k: jax.Array) -> jax.Array:
  """``table[l, k[l, i]]`` for a small per-layer table ``(L, m)`` and codes ``(L, B)``."""
  if table.shape[1] > _SELECT_LEVELS:
    return jnp.take_along_axis(table, k, axis=1)
  out = jnp.zeros(k.shape, table.dtype)
  for j in range(table.shape[1]):
    out = jnp.where(k == j, table[:, j : j + 1], out)
  return out


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
