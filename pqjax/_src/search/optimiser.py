"""Golden-section minimisation of per-layer objectives over exponent and clip ratio.

Each layer is an independent 2-D problem ``min E(a, c)``; all layers of a tree are
solved at once, in lockstep, by one compiled loop. A coarse grid picks the starting
point (the error is locally convex with a unique minimum in each variable, but
rounding makes it ragged and a bracket far away can hold a shallow local minimum);
golden-section phases then alternate between the exponent and the clip ratio. Every
phase keeps the best point seen, so the result is never worse than the grid's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.search.config import Plan, SearchConfig

_INV_PHI = (5**0.5 - 1) / 2

# ``f(alpha, clip) -> error``, each ``(L,)``: one value per layer.
Objective = Callable[[jax.Array, jax.Array], jax.Array]


def golden(
  f: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, iters: int
) -> tuple[jax.Array, jax.Array]:
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
    c, d, fc, fd = (
      jnp.where(left, p, d),
      jnp.where(left, c, p),
      jnp.where(left, fp, fd),
      jnp.where(left, fc, fp),
    )
    return lo, hi, c, d, fc, fd

  _, _, c, d, fc, fd = jax.lax.fori_loop(0, iters, step, (lo, hi, c, d, f(c), f(d)))
  return jnp.where(fc <= fd, c, d), jnp.minimum(fc, fd)


# Golden-section phases, alternating between the exponent and the clip ratio, run as
# one loop that evaluates the objective once per step: XLA then compiles the
# objective once, not once per phase. Each phase spends two steps on its first two
# points, then narrows the bracket; at its end the better point replaces the current
# one only if it is no worse. Step kinds:
_FIRST, _SECOND, _NARROW, _EVAL = 0, 1, 2, 3


class Schedule(NamedTuple):
  """Per step of the loop: kind, variable (0 exponent, 1 clip), half-width, phase end."""

  kind: np.ndarray
  var: np.ndarray
  half: np.ndarray
  last: np.ndarray


class AlternateState(NamedTuple):
  """The loop's state, each ``(L,)``: the point, its error, and the open bracket.

  ``(x1, f1)`` and ``(x2, f2)`` are the bracket's inner points and their scores.
  """

  alpha: jax.Array
  clip: jax.Array
  error: jax.Array
  lo: jax.Array
  hi: jax.Array
  x1: jax.Array
  x2: jax.Array
  f1: jax.Array
  f2: jax.Array


def _schedule(
  plan: Plan, a_half: float, c_half: float, iters: int, clip_iters: int, rounds: int
) -> Schedule:
  """Per step: kind, variable (0 exponent, 1 clip), bracket half-width, phase end.

  The first step evaluates the starting point, which the phases must beat.
  """
  kind, var, half, last = [_EVAL], [1], [0.0], [False]
  for r in range(rounds):
    for v, on, h, n in (
      (0, plan.search_alpha, a_half, iters),
      (1, plan.search_clip, c_half, clip_iters),
    ):
      if not on:
        continue
      steps = [_FIRST, _SECOND] + [_NARROW] * n
      kind += steps
      var += [v] * len(steps)
      half += [h * 0.5**r] * len(steps)
      last += [False] * (len(steps) - 1) + [True]
  return Schedule(
    np.array(kind, np.int32),
    np.array(var, np.int32),
    np.array(half, np.float32),
    np.array(last, bool),
  )


def alternate(
  f: Objective,
  a: jax.Array,
  c: jax.Array,
  *,
  plan: Plan,
  a_half: float,
  c_half: float,
  iters: int,
  clip_iters: int,
  rounds: int,
  config: SearchConfig,
  weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Alternating golden-section on ``a`` then ``c``, from ``(a, c)``.

  Brackets are the current point +- the half-widths, halved each round. Never
  worse than the start. With ``plan.shared`` the exponent steps compare summed
  errors, each layer's times its ``weights`` entry (default 1), so the exponent
  stays the same for every layer.
  """
  kind, var, half, last = (
    jnp.asarray(x) for x in _schedule(plan, a_half, c_half, iters, clip_iters, rounds)
  )
  if kind.shape[0] == 1:
    return a, c
  bounds = jnp.array([[config.lo, config.hi], [config.clip_lo, 1.0]], jnp.float32)

  w = jnp.ones_like(a) if weights is None else weights

  def score(err, v):
    return jnp.where(plan.shared & (v == 0), jnp.sum(err * w), err)

  def step(s: jax.Array, state: AlternateState) -> AlternateState:
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
    p = jnp.where(
      k == _FIRST, inner, jnp.where(k == _SECOND, outer, jnp.where(left, inner, outer))
    )
    evaluating = k == _EVAL
    err = f(
      jnp.where((v == 0) & ~evaluating, p, a), jnp.where((v == 1) & ~evaluating, p, c)
    )
    e = jnp.where(evaluating, err, e)
    fp = score(err, v)
    # Narrowing left, the new point is the inner one and the old inner one becomes
    # the outer; narrowing right, the other way round.
    to_inner = (k == _FIRST) | (narrow & left)
    to_outer = (k == _SECOND) | (narrow & ~left)
    x1, f1, x2, f2 = (
      jnp.where(to_inner, p, jnp.where(narrow, x2, x1)),
      jnp.where(to_inner, fp, jnp.where(narrow, f2, f1)),
      jnp.where(to_outer, p, jnp.where(narrow, x1, x2)),
      jnp.where(to_outer, fp, jnp.where(narrow, f1, f2)),
    )
    # At a phase's end, keep its best point where it beats the current one.
    best_x = jnp.where(f1 <= f2, x1, x2)
    best_f = jnp.minimum(f1, f2)
    better = last[s] & (best_f <= score(e, v))
    a = jnp.where(better & (v == 0), best_x, a)
    c = jnp.where(better & (v == 1), best_x, c)
    # Per-layer errors at the kept point; a shared exponent step knows only their
    # sum, so the caller refreshes them.
    e = jnp.where(better & ((v == 1) | (not plan.shared)), best_f, e)
    return AlternateState(a, c, e, lo, hi, x1, x2, f1, f2)

  zeros = jnp.zeros_like(a)
  state = AlternateState(a, c, *([zeros] * 7))
  if plan.shared:
    # Per-layer errors are needed to compare clip steps; exponent phases change
    # every layer's error, so each is followed by a fresh evaluation.
    def run(s: jax.Array, st: AlternateState) -> AlternateState:
      st = step(s, st)
      e = jax.lax.cond(
        last[s] & (var[s] == 0), lambda: f(st.alpha, st.clip), lambda: st.error
      )
      return st._replace(error=e)

    state = jax.lax.fori_loop(0, kind.shape[0], run, state)
  else:
    state = jax.lax.fori_loop(0, kind.shape[0], step, state)
  return state.alpha, state.clip


def minimise(
  f: Objective,
  a0: jax.Array,
  c0: jax.Array,
  plan: Plan,
  config: SearchConfig,
  f_grid: Objective | None = None,
  weights: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Minimises ``f(a, c) -> E`` (all ``(L,)``) from a grid over what ``plan`` varies.

  ``f_grid``, a cheaper approximation of ``f`` (default ``f``), scores the grid.
  Each layer is an independent problem (unless ``plan.shared``, whose summed
  error weighs each layer by ``weights``, default 1), so all of them are solved
  with the same number of evaluations of ``f``.
  """
  f_grid = f_grid or f
  n = a0.shape[0]
  a_grid = (
    jnp.linspace(config.lo, config.hi, config.exponent_points, dtype=jnp.float32)
    if plan.search_alpha
    else a0[None]
  )
  c_grid = (
    jnp.linspace(config.clip_lo, 1.0, config.clip_points, dtype=jnp.float32)
    if plan.search_clip
    else c0[None]
  )
  ga, gc = a_grid.shape[0], c_grid.shape[0]

  def at(ij):
    a = a_grid[ij[0]] if plan.search_alpha else a0
    c = c_grid[ij[1]] if plan.search_clip else c0
    return f_grid(jnp.broadcast_to(a, (n,)), jnp.broadcast_to(c, (n,)))

  ii, jj = jnp.meshgrid(jnp.arange(ga), jnp.arange(gc), indexing='ij')
  errs = jax.lax.map(at, (ii.reshape(-1), jj.reshape(-1))).reshape(ga, gc, n)
  if plan.shared:
    w = jnp.ones((n,), errs.dtype) if weights is None else weights
    ia = jnp.argmin(jnp.sum(jnp.min(errs, axis=1) * w, axis=-1))
    jc = jnp.argmin(errs[ia], axis=0)
    ia = jnp.full((n,), ia)
  else:
    best = jnp.argmin(errs.reshape(ga * gc, n), axis=0)
    ia, jc = best // gc, best % gc
  a = a_grid[ia] if plan.search_alpha else a0
  c = c_grid[jc] if plan.search_clip else c0
  a_step = (config.hi - config.lo) / (config.exponent_points - 1)
  c_step = (1.0 - config.clip_lo) / (config.clip_points - 1)
  return alternate(
    f,
    a,
    c,
    plan=plan,
    a_half=a_step,
    c_half=c_step,
    iters=config.iters,
    clip_iters=config.clip_iters,
    rounds=config.rounds,
    config=config,
    weights=weights,
  )
