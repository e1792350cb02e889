"""Tiles of a layer, the canonical order in which its statistics are summed.

Float32 sums depend on their order, so the binned statistics of a layer are summed
per tile, a fixed grid of at most ``TILES x TILES`` blocks of its ``(K, N)`` view, and
the tiles' sums are then added in a fixed order. A device that holds whole tiles of
a sharded layer computes their sums exactly as one device holding the whole layer
does, so the statistics, and everything searched from them, do not depend on how
the layer is sharded.
"""

from __future__ import annotations

import math

import jax

# Meshes with up to this many shards on an axis (a divisor of it) give results
# bit-identical to one device.
TILES = 8


def counts(k: int, n: int) -> tuple[int, int]:
  """Tiles along K and along N of a ``(K, N)`` view."""
  return math.gcd(k, TILES), math.gcd(n, TILES)


def split(x: jax.Array, tk: int, tn: int) -> jax.Array:
  """``(L, K, N)`` as ``(L * tk * tn, K / tk, N / tn)`` tiles, row-major in each."""
  n_layers, k, n = x.shape
  x = x.reshape(n_layers, tk, k // tk, tn, n // tn).transpose(0, 1, 3, 2, 4)
  return x.reshape(n_layers * tk * tn, k // tk, n // tn)


def fold(sums: jax.Array) -> jax.Array:
  """Adds ``(L, T, ...)`` tile sums in tile order: ``(L, ...)``."""
  total = sums[:, 0]
  for t in range(1, sums.shape[1]):
    total = total + sums[:, t]
  return total
