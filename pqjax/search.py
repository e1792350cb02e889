"""Search of the exponent and clip ratio: binned statistics, a grid, golden-section.

The reconstruction error ``E(a, c) = ||W - W_hat||^2`` of a layer, for exponent ``a``
and clip ratio ``c`` (the block scale is ``c`` times the block's absmax), is locally
convex in each variable with a single minimum for real weight distributions, but
rounding makes it slightly ragged and a bracket far from the minimum can hold a
shallow local one. One pass over each layer bins its normalised magnitudes, per sign;
the binned statistics give E for any ``(a, c)`` at a cost independent of the layer's
size. A coarse grid over ``(a, c)`` on them picks the starting point, then
golden-section steps alternate between ``a`` and ``c``, for all layers of the tree
at once. Small layers, where binning can misplace a few weights at a threshold, then
get the same alternation on the exact error in a narrow bracket. Each stage keeps the
best point seen, so the search never returns worse than the grid.

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

from pqjax import power, tiles

_INV_PHI = (5 ** 0.5 - 1) / 2

Objective = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
  """Settings of the exponent and clip search.

  Attributes:
    lo: smallest exponent considered.
    hi: largest exponent considered. ``a = 1`` is uniform quantization; ``a < 1``
      puts more levels near zero, ``a > 1`` near the block maximum.
    grid: points of the coarse exponent grid over ``[lo, hi]``.
    iters: golden-section steps on the exponent in each round; the bracket shrinks
      by 0.618 each step. These steps cost nothing per weight: they run on binned
      statistics of the layer.
    clip_lo: smallest clip ratio considered (the block scale over its absmax).
    clip_grid: points of the coarse clip grid over ``[clip_lo, 1]``.
    clip_iters: golden-section steps on the clip ratio in each round.
    rounds: rounds of alternating exponent and clip steps after the grid.
    refine_width: half-width of the exponent bracket, around the optimum of the
      binned error, in which the exact error is minimised.
    refine_clip_width: the same for the clip ratio.
    refine_iters: golden-section steps on the exact error (each one a pass over
      the weights), per variable.
    refine_below: only layers with fewer weights than this get the exact
      refinement. Binning misplaces at most a few weights per threshold, which
      matters in a small layer; in larger ones the binned error is within about
      1e-4 of the exact one and the refinement would only cost time.
    bins: bins of the statistics, per sign.
    block_clips: candidate ratios per block with ``clip="block"``, spread over the
      layer's ratio +- ``block_clip_width``.
    block_clip_width: half-width of the block candidates around the layer's ratio.
  """

  lo: float = 0.05
  hi: float = 2.0
  grid: int = 24
  iters: int = 24
  clip_lo: float = 0.3
  clip_grid: int = 8
  clip_iters: int = 16
  rounds: int = 2
  refine_width: float = 0.05
  refine_clip_width: float = 0.03
  refine_iters: int = 14
  refine_below: int = 2 ** 17
  bins: int = 4096
  block_clips: int = 9
  block_clip_width: float = 0.2

  def __post_init__(self):
    if not 0 < self.lo < self.hi:
      raise ValueError(
          f'search range must satisfy 0 < lo < hi, got ({self.lo}, {self.hi})')
    if not 0 < self.clip_lo < 1:
      raise ValueError(f'clip_lo must be in (0, 1), got {self.clip_lo}')
    if (self.grid < 3 or self.clip_grid < 2 or self.iters < 1 or self.clip_iters < 1
        or self.rounds < 1 or self.refine_iters < 0 or self.bins < 16
        or self.block_clips < 1):
      raise ValueError(
          f'grid must be >= 3, clip_grid >= 2, iters, clip_iters, rounds and'
          f' block_clips >= 1, refine_iters >= 0 and bins >= 16; got {self}')


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
  """What the search varies: the exponent unless fixed, the clip ratio if searched.

  Attributes:
    search_alpha: whether the exponent is searched (else it stays as given).
    search_clip: whether the clip ratio is searched (else it stays as given).
    shared: one exponent for all layers, minimising their summed error; clip
      ratios stay per layer.
  """

  search_alpha: bool = True
  search_clip: bool = True
  shared: bool = False


# Golden-section phases, alternating between the exponent and the clip ratio, run as
# one loop that evaluates the objective once per step: XLA then compiles the
# objective once, not once per phase. Each phase spends two steps on its first two
# points, then narrows the bracket; at its end the better point replaces the current
# one only if it is no worse. Step kinds:
_FIRST, _SECOND, _NARROW, _EVAL = 0, 1, 2, 3


def _schedule(plan: Plan, a_half: float, c_half: float, iters: int, clip_iters: int,
              rounds: int) -> tuple[np.ndarray, ...]:
  """Per step: kind, variable (0 exponent, 1 clip), bracket half-width, phase end.

  The first step evaluates the starting point, which the phases must beat.
  """
  kind, var, half, last = [_EVAL], [1], [0.0], [False]
  for r in range(rounds):
    for v, on, h, n in ((0, plan.search_alpha, a_half, iters),
                        (1, plan.search_clip, c_half, clip_iters)):
      if not on:
        continue
      steps = [_FIRST, _SECOND] + [_NARROW] * n
      kind += steps
      var += [v] * len(steps)
      half += [h * 0.5 ** r] * len(steps)
      last += [False] * (len(steps) - 1) + [True]
  return (np.array(kind, np.int32), np.array(var, np.int32),
          np.array(half, np.float32), np.array(last, bool))


def alternate(f: Objective, a: jax.Array, c: jax.Array, *, plan: Plan, a_half: float,
              c_half: float, iters: int, clip_iters: int, rounds: int,
              config: SearchConfig) -> tuple[jax.Array, jax.Array]:
  """Alternating golden-section on ``a`` then ``c``, from ``(a, c)``.

  Brackets are the current point +- the half-widths, halved each round. Never
  worse than the start. With ``plan.shared`` the exponent steps compare summed
  errors, so the exponent stays the same for every layer.
  """
  kind, var, half, last = (jnp.asarray(x) for x in _schedule(
      plan, a_half, c_half, iters, clip_iters, rounds))
  if kind.shape[0] == 1:
    return a, c
  bounds = jnp.array([[config.lo, config.hi], [config.clip_lo, 1.0]], jnp.float32)

  def score(err, v):
    return jnp.where(plan.shared & (v == 0), jnp.sum(err), err)

  def step(s, state):
    a, c, e, lo, hi, x1, x2, f1, f2 = state
    k, v, h = kind[s], var[s], half[s]
    cur = jnp.where(v == 0, a, c)
    # A phase opens its bracket around the current point.
    opening = k == _FIRST
    lo = jnp.where(opening, jnp.maximum(cur - h, bounds[v, 0]), lo)
    hi = jnp.where(opening, jnp.minimum(cur + h, bounds[v, 1]), hi)
    left = f1 < f2
    narrow = k == _NARROW
    lo = jnp.where(narrow & ~left, x1, lo)
    hi = jnp.where(narrow & left, x2, hi)
    inner = hi - _INV_PHI * (hi - lo)
    outer = lo + _INV_PHI * (hi - lo)
    p = jnp.where(k == _FIRST, inner, jnp.where(k == _SECOND, outer,
                                                 jnp.where(left, inner, outer)))
    evaluating = k == _EVAL
    err = f(jnp.where((v == 0) & ~evaluating, p, a),
            jnp.where((v == 1) & ~evaluating, p, c))
    e = jnp.where(evaluating, err, e)
    fp = score(err, v)
    # Narrowing left, the new point is the inner one and the old inner one becomes
    # the outer; narrowing right, the other way round.
    to_inner = (k == _FIRST) | (narrow & left)
    to_outer = (k == _SECOND) | (narrow & ~left)
    x1, f1, x2, f2 = (jnp.where(to_inner, p, jnp.where(narrow, x2, x1)),
                      jnp.where(to_inner, fp, jnp.where(narrow, f2, f1)),
                      jnp.where(to_outer, p, jnp.where(narrow, x1, x2)),
                      jnp.where(to_outer, fp, jnp.where(narrow, f1, f2)))
    # At a phase's end, keep its best point where it beats the current one.
    best_x = jnp.where(f1 <= f2, x1, x2)
    best_f = jnp.minimum(f1, f2)
    better = last[s] & (best_f <= score(e, v))
    a = jnp.where(better & (v == 0), best_x, a)
    c = jnp.where(better & (v == 1), best_x, c)
    # Per-layer errors at the kept point; a shared exponent step knows only their
    # sum, so the caller refreshes them.
    e = jnp.where(better & ((v == 1) | (not plan.shared)), best_f, e)
    return a, c, e, lo, hi, x1, x2, f1, f2

  zeros = jnp.zeros_like(a)
  state = (a, c, zeros, zeros, zeros, zeros, zeros, zeros, zeros)
  if plan.shared:
    # Per-layer errors are needed to compare clip steps; exponent phases change
    # every layer's error, so each is followed by a fresh evaluation.
    def run(s, st):
      st = step(s, st)
      a, c, e = st[:3]
      e = jax.lax.cond(last[s] & (var[s] == 0), lambda: f(a, c), lambda: e)
      return (a, c, e) + st[3:]
    state = jax.lax.fori_loop(0, kind.shape[0], run, state)
  else:
    state = jax.lax.fori_loop(0, kind.shape[0], step, state)
  return state[0], state[1]


def minimise(f: Objective, a0: jax.Array, c0: jax.Array, plan: Plan,
             config: SearchConfig, f_grid: Objective | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Minimises ``f(a, c) -> E`` (all ``(L,)``) from a grid over what ``plan`` varies.

  ``f_grid``, a cheaper approximation of ``f`` (default ``f``), scores the grid.
  Each layer is an independent problem (unless ``plan.shared``), so all of them
  are solved with the same number of evaluations of ``f``.
  """
  f_grid = f_grid or f
  n = a0.shape[0]
  a_grid = (jnp.linspace(config.lo, config.hi, config.grid, dtype=jnp.float32)
            if plan.search_alpha else a0[None])
  c_grid = (jnp.linspace(config.clip_lo, 1.0, config.clip_grid, dtype=jnp.float32)
            if plan.search_clip else c0[None])
  ga, gc = a_grid.shape[0], c_grid.shape[0]

  def at(ij):
    a = a_grid[ij[0]] if plan.search_alpha else a0
    c = c_grid[ij[1]] if plan.search_clip else c0
    return f_grid(jnp.broadcast_to(a, (n,)), jnp.broadcast_to(c, (n,)))

  ii, jj = jnp.meshgrid(jnp.arange(ga), jnp.arange(gc), indexing='ij')
  errs = jax.lax.map(at, (ii.reshape(-1), jj.reshape(-1))).reshape(ga, gc, n)
  if plan.shared:
    ia = jnp.argmin(jnp.sum(jnp.min(errs, axis=1), axis=-1))
    jc = jnp.argmin(errs[ia], axis=0)
    ia = jnp.full((n,), ia)
  else:
    best = jnp.argmin(errs.reshape(ga * gc, n), axis=0)
    ia, jc = best // gc, best % gc
  a = a_grid[ia] if plan.search_alpha else a0
  c = c_grid[jc] if plan.search_clip else c0
  a_step = (config.hi - config.lo) / (config.grid - 1)
  c_step = (1.0 - config.clip_lo) / (config.clip_grid - 1)
  return alternate(f, a, c, plan=plan, a_half=a_step, c_half=c_step,
                   iters=config.iters, clip_iters=config.clip_iters,
                   rounds=config.rounds, config=config)


def prepare(w: jax.Array, nk: int, ncol: int) -> tuple[jax.Array, jax.Array]:
  """Block absmax scales and signed normalised weights ``w / m`` of one layer."""
  w3 = power.block_view(w, nk)
  scale = power.block_absmax(w3, ncol)
  return power.divide(w3, scale), scale


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


def _centre(i: jax.Array, bins: int) -> jax.Array:
  """Centre of bin ``i`` (the middle of the bin in ``x ** (1/4)``)."""
  return jnp.square(jnp.square((i.astype(jnp.float32) + 0.5) / bins))


def bin_edges(bins: int = BINS) -> jax.Array:
  return jnp.square(jnp.square(jnp.arange(bins + 1, dtype=jnp.float32) / bins))


def _stats(xs: jax.Array, scale: jax.Array, bins: int) -> jax.Array:
  """``(L, 2, bins, 2)``: per layer, sign (positive, negative) and bin, W0 and W1."""
  x = jnp.abs(xs)
  s = jnp.broadcast_to(jnp.square(scale), x.shape)
  u = jnp.sqrt(jnp.sqrt(x))
  i = jnp.minimum((u * bins).astype(jnp.int32), bins - 1)
  d = x - _centre(i, bins)  # computed, not gathered from the centres
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
_SELECT_LEVELS = 17


def _lookup(table: jax.Array, k: jax.Array) -> jax.Array:
  """``table[l, k[l, i]]`` for a small per-layer table ``(L, m)`` and codes ``(L, B)``."""
  if table.shape[1] > _SELECT_LEVELS:
    return jnp.take_along_axis(table, k, axis=1)
  out = jnp.zeros(k.shape, table.dtype)
  for j in range(table.shape[1]):
    out = jnp.where(k == j, table[:, j:j + 1], out)
  return out


def _side_error(w: jax.Array, a: jax.Array, c: jax.Array, d: int, grid: str
                ) -> jax.Array:
  """Binned error of one sign's bins ``w`` ``(L, bins, 2)`` whose codes span 0..d.

  The ``d`` levels and thresholds of each layer cost a few ``pow``; each bin edge
  then needs only compares and lookups: its code is the number of thresholds at or
  below it. A bin whose edges take different codes straddles a threshold ``t``:
  its mass above ``t`` goes to the upper level. That share is taken from a uniform
  density inside the bin, which leaves an error of second order in the bin width.
  """
  bins = w.shape[1]
  a, c = a[:, None], c[:, None]
  levels = c * power.level_magnitude(jnp.arange(d + 1), a, d)  # (L, d + 1)
  t = c * power.side_thresholds(a, d, grid)  # (L, d)
  edges = bin_edges(bins)
  k = jnp.zeros((t.shape[0], bins + 1), jnp.int32)
  for j in range(d):
    k = k + (edges[None, :] >= t[:, j:j + 1]).astype(jnp.int32)
  k_lo, k_hi = k[:, :-1], k[:, 1:]
  l_lo, l_hi = _lookup(levels, k_lo), _lookup(levels, k_hi)
  lo, hi = edges[:-1], edges[1:]
  w0, w1 = w[..., 0], w[..., 1]
  dist = _centre(jnp.arange(bins), bins) - l_lo
  whole = 2 * dist * w1 + dist * dist * w0
  tt = jnp.clip(_lookup(t, jnp.maximum(k_hi - 1, 0)), lo, hi)
  density = w0 / (hi - lo)
  moved = density * (l_lo - l_hi) * ((hi * hi - tt * tt) - (l_lo + l_hi) * (hi - tt))
  return jnp.sum(whole + jnp.where(k_hi > k_lo, moved, 0.0), axis=-1)


def coarsen(stats: jax.Array, factor: int) -> jax.Array:
  """Stats of bins ``factor`` times wider: W0 summed, W1 moved to the new centres."""
  n, sides, bins, _ = stats.shape
  fine = _centre(jnp.arange(bins), bins).reshape(bins // factor, factor)
  coarse = _centre(jnp.arange(bins // factor), bins // factor)[:, None]
  w = stats.reshape(n, sides, bins // factor, factor, 2)
  w0 = jnp.sum(w[..., 0], axis=-1)
  w1 = jnp.sum(w[..., 1] + (fine - coarse) * w[..., 0], axis=-1)
  return jnp.stack([w0, w1], axis=-1)


def stats_error(stats: jax.Array, alpha: jax.Array, clip: jax.Array, bits: int,
                grid: str) -> jax.Array:
  """Reconstruction error of each layer, less a constant, from binned stats: ``(L,)``."""
  d_neg, d_pos = power.steps(bits, grid)
  return (_side_error(stats[:, 0], alpha, clip, d_pos, grid)
          + _side_error(stats[:, 1], alpha, clip, d_neg, grid))


def _prepare_stack(stack: jax.Array, nk: int, ncol: int
                   ) -> tuple[jax.Array, jax.Array]:
  return jax.vmap(functools.partial(prepare, nk=nk, ncol=ncol))(stack)


def _stack(leaves: Sequence[jax.Array], k: int, n: int) -> jax.Array:
  return jnp.stack([jnp.asarray(w).astype(jnp.float32).reshape(k, n) for w in leaves])


def _exact(xs: jax.Array, bits: int, grid: str
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``|x|``, ``log |x|`` and each weight's code range ``d``, for :func:`block_error`."""
  d_neg, d_pos = power.steps(bits, grid)
  x = jnp.abs(xs)
  d = jnp.where(xs < 0, jnp.float32(d_neg), jnp.float32(d_pos))
  return x, jnp.log(x), d


# The pipeline is split so that only light programs depend on a layer's shape:
# statistics and encoding (one pass over the weights each) are compiled per shape,
# the search itself once for all layers of the tree, on their concatenated stats.


@functools.partial(jax.jit, static_argnames=('k', 'n', 'nk', 'ncol', 'bins'))
def group_stats(leaves: Sequence[jax.Array], *, k: int, n: int, nk: int, ncol: int,
                bins: int = BINS) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Finiteness ``(L,)``, absmax ``(L, nk, 1, ncol)`` and stats ``(L, 2, bins, 2)``."""
  xs, scale = _prepare_stack(_stack(leaves, k, n), nk, ncol)
  # NaN and Inf reach the block absmax, so the scales tell without another pass.
  finite = jnp.all(jnp.isfinite(scale), axis=(1, 2, 3))
  tk, tn = tiles.counts(xs.shape[1] * xs.shape[2], n)
  return finite, scale, tile_stats(xs, scale, tk, tn, bins, fold=True)


def tile_stats(xs: jax.Array, scale: jax.Array, tk: int, tn: int, bins: int,
               fold: bool) -> jax.Array:
  """Stats of each of ``tk x tn`` tiles of ``xs`` ``(L, nk, rows, N)``, row-major.

  ``(L, tk * tn, 2, bins, 2)``, or with ``fold`` their sum in tile order
  ``(L, 2, bins, 2)`` (see :mod:`pqjax.tiles`). One tile at a time keeps the
  scatter's target small.
  """
  n_layers, nk, rows, n = xs.shape
  x = xs.reshape(n_layers, nk * rows, n)
  kt, nt = nk * rows // tk, n // tn
  # Group scales change along K inside a tile: slice them row by row.
  per_row = jnp.broadcast_to(scale, (n_layers, nk, rows, scale.shape[3])).reshape(
      n_layers, nk * rows, scale.shape[3])

  def tile(t: jax.Array) -> jax.Array:
    i, j = t // tn, t % tn
    xt = jax.lax.dynamic_slice(x, (0, i * kt, j * nt), (n_layers, kt, nt))
    if nk == 1:
      st = scale if scale.shape[3] == 1 else jax.lax.dynamic_slice(
          scale, (0, 0, 0, j * nt), (n_layers, 1, 1, nt))
    else:
      cols = (j * nt, nt) if scale.shape[3] > 1 else (0, 1)
      st = jax.lax.dynamic_slice(per_row, (0, i * kt, cols[0]),
                                 (n_layers, kt, cols[1]))[:, None]
    return _stats(xt[:, None], st, bins)

  first = tile(jnp.int32(0))
  if fold:
    return jax.lax.fori_loop(1, tk * tn, lambda t, acc: acc + tile(t), first)
  out = jnp.zeros((tk * tn, *first.shape), first.dtype).at[0].set(first)
  out = jax.lax.fori_loop(1, tk * tn, lambda t, o: o.at[t].set(tile(t)), out)
  return jnp.moveaxis(out, 0, 1)


@functools.partial(jax.jit, static_argnames=('bits', 'grid', 'plan', 'config'))
def search_stats(stats: jax.Array, alpha: jax.Array, clip: jax.Array, *, bits: int,
                 grid: str, plan: Plan, config: SearchConfig
                 ) -> tuple[jax.Array, jax.Array]:
  """Exponent and clip ratio of each layer from binned stats ``(L, 2, bins, 2)``.

  ``alpha`` and ``clip`` ``(L,)`` are kept where ``plan`` does not search them.
  """
  coarse = coarsen(stats, max(1, stats.shape[2] // GRID_BINS))
  return minimise(lambda a, c: stats_error(stats, a, c, bits, grid), alpha, clip, plan,
                  config, lambda a, c: stats_error(coarse, a, c, bits, grid))


def needs_refine(size: int, config: SearchConfig) -> bool:
  """Whether layers of ``size`` weights get the exact refinement."""
  return config.refine_iters > 0 and size < config.refine_below


@functools.partial(jax.jit,
                   static_argnames=('views', 'bits', 'grid', 'plan', 'config'))
def refine_layers(groups: Sequence[Sequence[jax.Array]], alpha: jax.Array,
                  clip: jax.Array, *, views: Sequence[tuple[int, int, int, int]],
                  bits: int, grid: str, plan: Plan, config: SearchConfig
                  ) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of ``(alpha, clip)`` (one each per layer, groups in order).

  ``views[i]`` is ``(K, N, nk, ncol)`` of group ``i``.
  """
  prepared = [_prepare_stack(_stack(g, k, n), nk, ncol)
              for g, (k, n, nk, ncol) in zip(groups, views)]
  err = jax.vmap(functools.partial(power.block_error, grid=grid))
  fs = [(_exact(xs, bits, grid), scale) for xs, scale in prepared]
  sizes = [xs.shape[0] for xs, _ in prepared]
  offsets = np.cumsum([0] + sizes)

  def per_layer(a, c):
    return jnp.concatenate([
        err(x, log_x, d, scale, a[o:o + s], c[o:o + s])
        for ((x, log_x, d), scale), o, s in zip(fs, offsets, sizes)])

  return alternate(per_layer, alpha, clip, plan=plan, a_half=config.refine_width,
                   c_half=config.refine_clip_width, iters=config.refine_iters,
                   clip_iters=config.refine_iters, rounds=1, config=config)


def _block_clip(xs: jax.Array, absmax: jax.Array, alpha: jax.Array, clip: jax.Array,
                bits: int, grid: str, config: SearchConfig) -> jax.Array:
  """Each block's clip ratio: the best of a few candidates around the layer's."""
  cands = jnp.concatenate([clip[None], jnp.linspace(
      jnp.maximum(clip - config.block_clip_width, config.clip_lo),
      jnp.minimum(clip + config.block_clip_width, 1.0), config.block_clips)])
  x, log_x, d = _exact(xs, bits, grid)

  def block_errors(c):
    xhat = power.reconstruct(x, log_x, d, alpha, c, grid)
    e = jnp.sum(jnp.square(x - xhat), axis=1, keepdims=True)
    return e if absmax.shape[2] > 1 else jnp.sum(e, axis=2, keepdims=True)

  errs = jax.lax.map(block_errors, cands)
  return cands[jnp.argmin(errs, axis=0)]


def _encode(w: jax.Array, alpha: jax.Array, clip: jax.Array, absmax: jax.Array,
            fp16: jax.Array, *, nk: int, bits: int, grid: str, block_clip: bool,
            config: SearchConfig) -> tuple[jax.Array, jax.Array]:
  w3 = power.block_view(w, nk)
  if block_clip:
    xs = power.divide(w3, absmax)
    clip = _block_clip(xs, absmax, alpha, clip, bits, grid, config)
  scale = absmax * clip
  # Encode against the scale as stored, so the codes fit the rounded scale.
  scale = jnp.where(fp16, scale.astype(jnp.float16).astype(jnp.float32), scale)
  q = power.encode(w3, scale, alpha, bits, grid).reshape(-1, w.shape[1])[:w.shape[0]]
  return power.pack(q, bits, power.steps(bits, grid)[0]), scale[:, 0, :]


@functools.partial(jax.jit, static_argnames=('k', 'n', 'nk', 'bits', 'grid',
                                             'block_clip', 'config'))
def encode_layers(leaves: Sequence[jax.Array], alpha: jax.Array, clip: jax.Array,
                  absmax: jax.Array, fp16: jax.Array, *, k: int, n: int, nk: int,
                  bits: int, grid: str, block_clip: bool, config: SearchConfig
                  ) -> tuple[list[jax.Array], list[jax.Array]]:
  """Each layer's packed codes and ``(nk, ncol)`` float32 scales, as separate buffers.

  ``absmax`` is :func:`group_stats`' ``(L, nk, 1, ncol)``, so that pass is not
  repeated; ``fp16`` ``(L,)`` marks the layers whose scales are rounded to float16.
  """
  fn = functools.partial(_encode, nk=nk, bits=bits, grid=grid, block_clip=block_clip,
                         config=config)
  codes, scales = jax.vmap(fn)(_stack(leaves, k, n), alpha, clip, absmax, fp16)
  return list(codes), list(scales)
