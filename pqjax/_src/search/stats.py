"""Binned statistics of a layer's normalised weights: one pass, then any error is cheap.

Statistics are jitted per layer shape and batched over the layers of that shape
(``jax.vmap``), so compilations grow with the number of distinct shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core import operator
from pqjax._src.core.blocks import block_absmax, block_view
from pqjax._src.search import tiles


def prepare(w: jax.Array, nk: int, ncol: int) -> tuple[jax.Array, jax.Array]:
  """Block absmax scales and signed normalised weights ``w / m`` of one layer."""
  w3 = block_view(w, nk)
  scale = block_absmax(w3, ncol)
  return operator.divide(w3, scale), scale


# --- scale normalisation -------------------------------------------------------------
# Each weight counts in a layer's error with its block absmax squared, which float32
# holds only for absmax in about [1e-19, 1e19]. The squares are taken of the block
# scales divided by 2 ** e, where 2 ** e <= M < 2 ** (e + 1) for the layer's largest
# block absmax M: a power of two, so the statistics are those of the raw squares
# times 2 ** (-2 e) exactly wherever the raw ones are finite (argmins, hence codes,
# unchanged), and they stay finite for any normal float32 weights.

# Exponent of a layer whose largest scale is zero or subnormal: XLA flushes those.
ZERO_EXPONENT = -126


def binary_exponent(m: Any, xp: Any = jnp) -> Any:
  """``e`` with ``2 ** e <= m < 2 ** (e + 1)`` for float32 ``m``, read from its bits.

  -126 where ``m`` is zero or subnormal, 0 where it is Inf or NaN. Integer work on
  the bit pattern, so NumPy (``xp=np``) and XLA (which flushes subnormals) agree.
  """
  bits = xp.asarray(m, xp.float32).view(xp.int32)
  biased = (bits >> 23) & 0xFF
  return xp.where(
    biased == 255, 0, xp.where(biased == 0, ZERO_EXPONENT, biased - 127)
  ).astype(xp.int32)


def layer_binary_exponent(absmax: Any, xp: Any = jnp) -> Any:
  """:func:`binary_exponent` of each layer's largest block scale, ``(L, ...) -> (L,)``."""
  return binary_exponent(xp.max(absmax.reshape(absmax.shape[0], -1), axis=1), xp)


def _pow2(e: jax.Array) -> jax.Array:
  """``2.0 ** e`` in float32 for integer ``e`` in [-126, 127], built from its bits."""
  return jax.lax.bitcast_convert_type((e + 127) << 23, jnp.float32)


def normalise(scale: jax.Array, e: jax.Array) -> jax.Array:
  """``scale * 2 ** -e`` exactly, ``e`` per layer (``(L,)``, ``scale`` ``(L, ...)``).

  Two multiplications keep each factor a normal float32 for every ``e``.
  """
  e = e.reshape(-1, *([1] * (scale.ndim - 1)))
  half = e // 2
  return scale * _pow2(-half) * _pow2(half - e)


def sum_weights(e: jax.Array) -> jax.Array:
  """Weights ``2 ** (2 (e - max e))`` that put normalised layer errors on one scale.

  Summed, they give the tree's error over ``2 ** (2 max e)``, which stays finite.
  Layers more than 2 ** 63 times smaller than the largest get weight 0.
  """
  d = 2 * (e - jnp.max(e))
  return jnp.where(d >= -126, _pow2(jnp.maximum(d, -126)), 0.0)


# --- binned statistics --------------------------------------------------------------
# The error of one layer is a sum over its normalised magnitudes x with weight m^2
# (the block absmax squared). Binning x finely, per sign, and keeping per bin the
# weight and the first and second moments of x about the bin centre gives the error
# for any (a, c) exactly, except for the few bins that straddle a threshold:
#   sum s (x - l)^2 = W2 + 2 (ctr - l) W1 + (ctr - l)^2 W0,  W_j = sum s (x - ctr)^j.
# W2 depends on neither a nor c, so only W0 and W1 are kept: the binned error is the
# exact one less a constant per layer, which leaves every argmin unchanged. Moments
# about the centre, not raw moments, keep float32 free of cancellation. Bins are
# uniform in x^(1/4): thresholds crowd near zero at small exponents.

BINS = 4096
# The grid only picks a starting point; coarser bins score it well enough.
GRID_BINS = 256


def grid_bins(bits: int) -> int:
  """Bins that score the grid at ``bits``: ``GRID_BINS`` up to 5 bits, then twice as
  many a bit, to 1024 at 7 and 8.

  A bin must stay narrower than the levels' spacing: at 8 bits 256 bins (0.016 wide
  near 1, against a spacing of 0.008) ranked exponent 0.6 above 1 on uniform
  weights, and the search, started there, ended at 0.69 with 1.3x the error of 1.
  """
  return GRID_BINS << min(2, max(0, bits - 5))


def centre(i: jax.Array, bins: int) -> jax.Array:
  """Centre of bin ``i`` (the middle of the bin in ``x ** (1/4)``)."""
  return jnp.square(jnp.square((i.astype(jnp.float32) + 0.5) / bins))


def bin_edges(bins: int = BINS) -> jax.Array:
  return jnp.square(jnp.square(jnp.arange(bins + 1, dtype=jnp.float32) / bins))


def layer_norms(binned: np.ndarray) -> np.ndarray:
  """``||W||^2`` of each layer from its binned stats ``(L, 2, bins, 2)``, in float64,
  to the bins' resolution (the moments about each centre stand for the weights)."""
  bins = binned.shape[2]
  ctr = np.asarray(centre(jnp.arange(bins), bins), np.float64)
  w = binned.astype(np.float64)
  return np.sum(ctr * ctr * w[..., 0] + 2 * ctr * w[..., 1], axis=(1, 2))


def _stats(xs: jax.Array, scale: jax.Array, bins: int) -> jax.Array:
  """``(L, 2, bins, 2)``: per layer, sign (positive, negative) and bin, W0 and W1."""
  x = jnp.abs(xs)
  s = jnp.broadcast_to(jnp.square(scale), x.shape)
  u = jnp.sqrt(jnp.sqrt(x))
  i = jnp.minimum((u * bins).astype(jnp.int32), bins - 1)
  d = x - centre(i, bins)  # computed, not gathered from the centres
  side = (xs < 0).astype(jnp.int32) * bins
  layer = jnp.arange(x.shape[0], dtype=jnp.int32).reshape(-1, 1, 1, 1) * (2 * bins)
  # One complex scatter-add carries both moments: on CPU it costs much less than
  # a scatter of pairs.
  data = jax.lax.complex(s, s * d).reshape(-1)
  seg = (i + side + layer).reshape(-1)
  sums = jax.ops.segment_sum(data, seg, num_segments=x.shape[0] * 2 * bins)
  return jnp.stack([sums.real, sums.imag], axis=-1).reshape(x.shape[0], 2, bins, 2)


# Up to this many levels a side, a lookup by code is a sum of selects, which XLA:CPU
# runs several times faster than a gather.
def coarsen(stats: jax.Array, factor: int) -> jax.Array:
  """Stats of bins ``factor`` times wider: W0 summed, W1 moved to the new centres."""
  n, sides, bins, _ = stats.shape
  fine = centre(jnp.arange(bins), bins).reshape(bins // factor, factor)
  coarse = centre(jnp.arange(bins // factor), bins // factor)[:, None]
  w = stats.reshape(n, sides, bins // factor, factor, 2)
  w0 = jnp.sum(w[..., 0], axis=-1)
  w1 = jnp.sum(w[..., 1] + (fine - coarse) * w[..., 0], axis=-1)
  return jnp.stack([w0, w1], axis=-1)


def prepare_stack(ws: jax.Array, nk: int, ncol: int) -> tuple[jax.Array, jax.Array]:
  return jax.vmap(functools.partial(prepare, nk=nk, ncol=ncol))(ws)


def stack(leaves: Sequence[jax.Array], k: int, n: int) -> jax.Array:
  """``(L, k, n)`` float32: every layer of ``leaves`` (all layers of a stacked one)."""
  return jnp.concatenate(
    [jnp.asarray(w).astype(jnp.float32).reshape(-1, k, n) for w in leaves]
  )


# statistics and encoding (one pass over the weights each) are compiled per shape,
# the search per width, on the stats of a few layers at a time (``fit.CHUNK``).


@functools.partial(jax.jit, static_argnames=('k', 'n', 'nk', 'ncol', 'bins'))
def group_stats(
  leaves: Sequence[jax.Array], *, k: int, n: int, nk: int, ncol: int, bins: int = BINS
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finiteness ``(L,)``, absmax ``(L, nk, 1, ncol)`` and stats ``(L, 2, bins, 2)``."""
  xs, scale = prepare_stack(stack(leaves, k, n), nk, ncol)
  # NaN and Inf reach the block absmax, so the scales tell without another pass.
  finite = jnp.all(jnp.isfinite(scale), axis=(1, 2, 3))
  tk, tn = tiles.counts(xs.shape[1] * xs.shape[2], n)
  weight = normalise(scale, layer_binary_exponent(scale))
  return finite, scale, tile_stats(xs, weight, tk, tn, bins, fold=True)


def tile_stats(
  xs: jax.Array, scale: jax.Array, tk: int, tn: int, bins: int, fold: bool
) -> jax.Array:
  """Stats of each of ``tk x tn`` tiles of ``xs`` ``(L, nk, rows, N)``, row-major.

  ``scale`` ``(L, nk, 1, ncol)`` weighs each block (squared): the block scales,
  normalised per layer (:func:`normalise`).

  ``(L, tk * tn, 2, bins, 2)``, or with ``fold`` their sum in tile order
  ``(L, 2, bins, 2)`` (see :mod:`pqjax.tiles`). One tile at a time keeps the
  scatter's target small.
  """
  n_layers, nk, rows, n = xs.shape
  x = xs.reshape(n_layers, nk * rows, n)
  kt, nt = nk * rows // tk, n // tn
  # Group scales change along K inside a tile: slice them row by row.
  per_row = jnp.broadcast_to(scale, (n_layers, nk, rows, scale.shape[3])).reshape(
    n_layers, nk * rows, scale.shape[3]
  )

  def tile(t: jax.Array) -> jax.Array:
    i, j = t // tn, t % tn
    xt = jax.lax.dynamic_slice(x, (0, i * kt, j * nt), (n_layers, kt, nt))
    if nk == 1:
      st = (
        scale
        if scale.shape[3] == 1
        else jax.lax.dynamic_slice(scale, (0, 0, 0, j * nt), (n_layers, 1, 1, nt))
      )
    else:
      cols = (j * nt, nt) if scale.shape[3] > 1 else (0, 1)
      st = jax.lax.dynamic_slice(per_row, (0, i * kt, cols[0]), (n_layers, kt, cols[1]))[
        :, None
      ]
    return _stats(xt[:, None], st, bins)

  first = tile(jnp.int32(0))
  if fold:
    return jax.lax.fori_loop(1, tk * tn, lambda t, acc: acc + tile(t), first)
  out = jnp.zeros((tk * tn, *first.shape), first.dtype).at[0].set(first)
  out = jax.lax.fori_loop(1, tk * tn, lambda t, o: o.at[t].set(tile(t)), out)
  return jnp.moveaxis(out, 0, 1)
