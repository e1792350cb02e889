"""Exponent search: binned statistics, a coarse grid, golden-section, exact refinement.

The reconstruction error ``E(a) = ||W - W_hat(a)||^2`` is locally convex with a single
minimum for real weight distributions, but rounding makes it slightly ragged and a
bracket far from the minimum can hold a shallow local one. One pass over each layer
bins its normalised magnitudes; the binned statistics give E for any exponent at a
cost independent of the layer's size. A coarse grid on them picks the bracket around
the best grid point and golden-section narrows it, for all layers of the tree at once.
Small layers, where binning can misplace a few weights at a threshold, then get a
golden-section on the exact error in a narrow bracket. Each stage keeps the best point
seen, so the search never returns worse than the grid.

Statistics and encoding are jitted per layer shape and batched over the layers of
that shape (``jax.vmap``); the search is one jitted program for the whole tree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import power

_INV_PHI = (5 ** 0.5 - 1) / 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
  """Settings of the exponent search.

  Attributes:
    lo: smallest exponent considered.
    hi: largest exponent considered. ``a = 1`` is uniform quantization; ``a < 1``
      puts more levels near zero, ``a > 1`` near the block maximum.
    grid: points of the coarse grid over ``[lo, hi]``.
    iters: golden-section steps inside the grid bracket; the bracket shrinks by
      0.618 each step, so 24 steps narrow ``2 (hi - lo) / (grid - 1)`` about
      100000 times. These steps cost nothing per weight: they run on binned
      statistics of the layer.
    refine_width: half-width of the bracket, around the optimum of the binned
      error, in which the exact error is minimised.
    refine_iters: golden-section steps on the exact error (each one a pass over
      the weights); 14 steps narrow ``2 refine_width`` to about 1e-4.
    refine_below: only layers with fewer weights than this get the exact
      refinement. Binning misplaces at most a few weights per rounding threshold,
      which matters in a small layer; in larger ones the binned error is within
      about 1e-4 of the exact one and the refinement would only cost time.
    bins: bins of the statistics.
  """

  lo: float = 0.05
  hi: float = 2.0
  grid: int = 24
  iters: int = 24
  refine_width: float = 0.05
  refine_iters: int = 14
  refine_below: int = 2 ** 17
  bins: int = 4096

  def __post_init__(self):
    if not 0 < self.lo < self.hi:
      raise ValueError(
          f'search range must satisfy 0 < lo < hi, got ({self.lo}, {self.hi})')
    if self.grid < 3 or self.iters < 1 or self.refine_iters < 0 or self.bins < 16:
      raise ValueError(
          f'grid must be >= 3, iters >= 1, refine_iters >= 0 and bins >= 16, got'
          f' {self.grid}, {self.iters}, {self.refine_iters}, {self.bins}')


def golden(f: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array,
           iters: int) -> tuple[jax.Array, jax.Array]:
  """Golden-section search of ``f`` on ``[lo, hi]``: ``(argmin, min)`` found."""
  c = hi - _INV_PHI * (hi - lo)
  d = lo + _INV_PHI * (hi - lo)

  def step(_, s):
    lo, hi, c, d, fc, fd = s
    left = fc < fd
    lo = jnp.where(left, lo, c)
    hi = jnp.where(left, d, hi)
    p = jnp.where(left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
    fp = f(p)
    c, d, fc, fd = (jnp.where(left, p, d), jnp.where(left, c, p),
                    jnp.where(left, fp, fd), jnp.where(left, fc, fp))
    return lo, hi, c, d, fc, fd

  _, _, c, d, fc, fd = jax.lax.fori_loop(0, iters, step, (lo, hi, c, d, f(c), f(d)))
  return jnp.where(fc <= fd, c, d), jnp.minimum(fc, fd)


def minimise(f: Callable[[jax.Array], jax.Array], shape: tuple[int, ...],
             config: SearchConfig) -> jax.Array:
  """Minimises an elementwise objective ``f: a -> E`` over ``a`` of ``shape``.

  Each element of ``a`` is an independent 1-D problem (one per layer), so all of
  them are solved with the same number of evaluations of ``f``.
  """
  grid = jnp.linspace(config.lo, config.hi, config.grid, dtype=jnp.float32)
  errs = jax.lax.map(lambda g: f(jnp.full(shape, g, jnp.float32)), grid)
  best = jnp.argmin(errs, axis=0)
  a_grid = grid[best]
  e_grid = jnp.min(errs, axis=0)
  lo = grid[jnp.maximum(best - 1, 0)]
  hi = grid[jnp.minimum(best + 1, config.grid - 1)]
  a_gs, e_gs = golden(f, lo, hi, config.iters)
  return jnp.where(e_gs <= e_grid, a_gs, a_grid)


def golden_refine(f: Callable[[jax.Array], jax.Array], a0: jax.Array,
                  config: SearchConfig) -> jax.Array:
  """Golden-section on the exact error ``f`` around ``a0``; never worse than ``a0``."""
  lo = jnp.maximum(a0 - config.refine_width, config.lo)
  hi = jnp.minimum(a0 + config.refine_width, config.hi)
  a, e = golden(f, lo, hi, config.refine_iters)
  return jnp.where(e <= f(a0), a, a0)


def prepare(w: jax.Array, nk: int, ncol: int) -> tuple[jax.Array, jax.Array]:
  """Block scales and normalised magnitudes of one ``(K, N)`` layer."""
  w3 = power.block_view(w, nk)
  scale = power.block_absmax(w3, ncol)
  return power.normalise(w3, scale), scale


# --- binned statistics --------------------------------------------------------------
# The error of one layer is a sum over its normalised magnitudes x with weight m^2
# (the block scale squared). Binning x finely and keeping, per bin, the weight and
# the first and second moments of x about the bin centre gives the error for any
# exponent exactly, except for the few bins that straddle a rounding threshold:
#   sum s (x - l)^2 = W2 + 2 (c - l) W1 + (c - l)^2 W0,  W_j = sum s (x - c)^j.
# W2 does not depend on the exponent, so only W0 and W1 are kept: the binned error
# is the exact one less a constant per layer, which leaves every argmin unchanged.
# Moments about the centre, not raw moments, keep float32 free of cancellation.
# Bins are uniform in x^(1/4): thresholds crowd near zero at small exponents.

BINS = 4096


def _centre(i: jax.Array, bins: int) -> jax.Array:
  """Centre of bin ``i`` (the middle of the bin in ``x ** (1/4)``)."""
  return jnp.square(jnp.square((i.astype(jnp.float32) + 0.5) / bins))


def bin_centres(bins: int = BINS) -> jax.Array:
  return _centre(jnp.arange(bins), bins)


def _bin_index(x: jax.Array, bins: int) -> jax.Array:
  u = jnp.sqrt(jnp.sqrt(x))
  return jnp.minimum((u * bins).astype(jnp.int32), bins - 1)


def _stats(x: jax.Array, scale: jax.Array, bins: int) -> jax.Array:
  s = jnp.broadcast_to(jnp.square(scale), x.shape)
  i = _bin_index(x, bins)
  d = x - _centre(i, bins)  # computed, not gathered from bin_centres
  layer = jnp.arange(x.shape[0], dtype=jnp.int32).reshape(-1, 1, 1, 1) * bins
  # One complex scatter-add carries both moments: on CPU it costs much less than
  # a scatter of pairs.
  data = jax.lax.complex(s, s * d).reshape(-1)
  seg = (i + layer).reshape(-1)
  sums = jax.ops.segment_sum(data, seg, num_segments=x.shape[0] * bins)
  return jnp.stack([sums.real, sums.imag], axis=-1).reshape(x.shape[0], bins, 2)


def bin_edges(bins: int = BINS) -> jax.Array:
  return jnp.square(jnp.square(jnp.arange(bins + 1, dtype=jnp.float32) / bins))


def stats_error(stats: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """Reconstruction error of each layer, less a constant, from binned stats: ``(L,)``.

  A bin whose two edges round to different codes straddles a threshold ``t``: its
  mass above ``t`` goes to the upper level. That share is taken from a uniform
  density inside the bin, which leaves an error of second order in the bin width.
  """
  bins = stats.shape[1]
  edges = bin_edges(bins)
  lo, hi = edges[:-1], edges[1:]
  a = alpha[:, None]
  k = power.encode_magnitude(edges[None, :], a, bits)
  k_lo, k_hi = k[:, :-1], k[:, 1:]
  l_lo = power.decode_magnitude(k_lo, a, bits)
  l_hi = power.decode_magnitude(k_hi, a, bits)
  w0, w1 = stats[..., 0], stats[..., 1]
  d = bin_centres(bins) - l_lo
  whole = 2 * d * w1 + d * d * w0
  t = jnp.clip(power.decode_magnitude(k_hi, a, bits, offset=-0.5), lo, hi)
  density = w0 / (hi - lo)
  moved = density * (l_lo - l_hi) * ((hi * hi - t * t) - (l_lo + l_hi) * (hi - t))
  return jnp.sum(whole + jnp.where(k_hi > k_lo, moved, 0.0), axis=-1)


def _prepare_stack(stack: jax.Array, nk: int, ncol: int
                   ) -> tuple[jax.Array, jax.Array]:
  return jax.vmap(functools.partial(prepare, nk=nk, ncol=ncol))(stack)


def _exact_errors(x: jax.Array, scale: jax.Array, bits: int
                  ) -> Callable[[jax.Array], jax.Array]:
  err = jax.vmap(functools.partial(power.block_error, bits=bits))
  log_x = jnp.log(x)
  return lambda a: err(x, log_x, scale, a)


def _stack(leaves: Sequence[jax.Array], k: int, n: int) -> jax.Array:
  return jnp.stack([jnp.asarray(w).astype(jnp.float32).reshape(k, n) for w in leaves])


# The pipeline is split so that only light programs depend on a layer's shape:
# statistics and encoding (one pass over the weights each) are compiled per shape,
# the search itself once for all layers of the tree, on their concatenated stats.


@functools.partial(jax.jit, static_argnames=('k', 'n', 'nk', 'ncol', 'bins'))
def group_stats(leaves: Sequence[jax.Array], *, k: int, n: int, nk: int, ncol: int,
                bins: int = BINS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finiteness ``(L,)``, block scales ``(L, nk, 1, ncol)`` and stats ``(L, bins, 2)``."""
  stack = _stack(leaves, k, n)
  x, scale = _prepare_stack(stack, nk, ncol)
  # NaN and Inf reach the block absmax, so the scales tell without another pass.
  finite = jnp.all(jnp.isfinite(scale), axis=(1, 2, 3))
  return finite, scale, _stats(x, scale, bins)


@functools.partial(jax.jit, static_argnames=('bits', 'config', 'shared'))
def search_stats(stats: jax.Array, *, bits: int, config: SearchConfig,
                 shared: bool = False) -> jax.Array:
  """Exponent of each layer from binned stats ``(L, bins, 2)``: shape ``(L,)``.

  With ``shared``, one exponent minimising the summed error, repeated L times.
  """
  n = stats.shape[0]
  if shared:
    a = minimise(lambda a: jnp.sum(stats_error(stats, jnp.full((n,), a), bits)), (),
                 config)
    return jnp.full((n,), a)
  return minimise(lambda a: stats_error(stats, a, bits), (n,), config)


def needs_refine(size: int, config: SearchConfig) -> bool:
  """Whether layers of ``size`` weights get the exact refinement."""
  return config.refine_iters > 0 and size < config.refine_below


@functools.partial(jax.jit, static_argnames=('views', 'bits', 'config', 'shared'))
def refine_layers(groups: Sequence[Sequence[jax.Array]], alpha: jax.Array, *,
                  views: Sequence[tuple[int, int, int, int]], bits: int,
                  config: SearchConfig, shared: bool = False) -> jax.Array:
  """Exact refinement of the exponents ``alpha`` (one per layer, groups in order).

  ``views[i]`` is ``(K, N, nk, ncol)`` of group ``i``. With ``shared``, the summed
  error of all layers is minimised over one exponent (``alpha`` all equal).
  """
  prepared = [_prepare_stack(_stack(g, k, n), nk, ncol)
              for g, (k, n, nk, ncol) in zip(groups, views)]
  fs = [_exact_errors(x, scale, bits) for x, scale in prepared]
  sizes = [x.shape[0] for x, _ in prepared]
  offsets = np.cumsum([0] + sizes)

  def per_layer(a):
    return jnp.concatenate([f(a[o:o + s]) for f, o, s in zip(fs, offsets, sizes)])

  if shared:
    a = golden_refine(lambda a: jnp.sum(per_layer(jnp.full(alpha.shape, a))),
                      alpha[0], config)
    return jnp.full(alpha.shape, a)
  return golden_refine(per_layer, alpha, config)


def _encode(w: jax.Array, alpha: jax.Array, scale: jax.Array, nk: int, bits: int
            ) -> tuple[jax.Array, jax.Array]:
  q = power.encode(power.block_view(w, nk), scale, alpha, bits).reshape(w.shape)
  return power.pack(q, bits), scale[:, 0, :]


@functools.partial(jax.jit, static_argnames=('k', 'n', 'nk', 'bits'))
def encode_layers(leaves: Sequence[jax.Array], alpha: jax.Array, scale: jax.Array, *,
                  k: int, n: int, nk: int, bits: int
                  ) -> tuple[list[jax.Array], list[jax.Array]]:
  """Each layer's packed codes and ``(nk, ncol)`` scales, as separate buffers.

  ``scale`` is :func:`group_stats`' ``(L, nk, 1, ncol)``, so the absmax pass is not
  repeated.
  """
  codes, scales = jax.vmap(functools.partial(_encode, nk=nk, bits=bits))(
      _stack(leaves, k, n), alpha, scale)
  return list(codes), list(scales)
