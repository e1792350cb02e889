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
# At most this many weights a tile (4 MB of float32), where the shape allows. The
# 128256 x 4096 embedding of an 8B model had 33 MB tiles, which made the peak RSS
# of streaming it grow from 1B to 8B; Llama's and MiniLM's other layers are smaller.
TILE_WEIGHTS = 1 << 20


def counts(k: int, n: int) -> tuple[int, int]:
  """Tiles along K and along N of a ``(K, N)`` view.

  ``gcd(K, TILES) x gcd(N, TILES)`` tiles, each halved along its longer even side
  until it holds at most ``TILE_WEIGHTS`` weights: a tile is what streaming
  quantization reads at once (with about four float32 temporaries of its size), so
  its size, not the largest tensor's, bounds that memory. Counts stay multiples of
  the first ones, so sharded layers still hold whole tiles.
  """
  tk, tn = math.gcd(k, TILES), math.gcd(n, TILES)
  while (k // tk) * (n // tn) > TILE_WEIGHTS:
    kt, nt = k // tk, n // tn
    if kt % 2 == 0 and (kt >= nt or nt % 2):
      tk *= 2
    elif nt % 2 == 0:
      tn *= 2
    else:
      break
  return tk, tn


def split(x: jax.Array, tk: int, tn: int) -> jax.Array:
  """``(L, K, N)`` as ``(L * tk * tn, K / tk, N / tn)`` tiles, row-major in each."""
  n_layers, k, n = x.shape
  x = x.reshape(n_layers, tk, k // tk, tn, n // tn).transpose(0, 1, 3, 2, 4)
  return x.reshape(n_layers * tk * tn, k // tk, n // tn)


def fold(sums: jax.Array) -> jax.Array:
  """Adds ``(L, T, ...)`` tile sums in tile order: ``(L, ...)``."""
  return jax.lax.fori_loop(1, sums.shape[1], lambda t, acc: acc + sums[:, t], sums[:, 0])
