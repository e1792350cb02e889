"""Fitting each layer's exponent and clip ratio: on binned statistics, then exactly.

The search itself is one jitted program for the whole tree, on the concatenated
statistics of every layer; only the statistics and encoding passes depend on a
layer's shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core import operator
from pqjax._src.search.config import Plan, SearchConfig
from pqjax._src.search.objective import exact_inputs, stats_error
from pqjax._src.search.optimiser import alternate, minimise
from pqjax._src.search.stats import (
  coarsen,
  grid_bins,
  layer_binary_exponent,
  normalise,
  prepare_stack,
  stack,
  sum_weights,
)


@functools.partial(jax.jit, static_argnames=('bits', 'grid', 'plan', 'config'))
def search_stats(
  stats: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  bits: int,
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  """Exponent and clip ratio of each layer from binned stats ``(L, 2, bins, 2)``.

  ``alpha`` and ``clip`` ``(L,)`` are kept where ``plan`` does not search them.
  ``exponents`` ``(L,)``: each layer's stats are normalised by ``2 ** (2 e)``
  (:func:`stats.normalise`), which a shared exponent's summed error undoes.
  """
  coarse = coarsen(stats, max(1, stats.shape[2] // grid_bins(bits)))
  return minimise(
    lambda a, c: stats_error(stats, a, c, bits, grid),
    alpha,
    clip,
    plan,
    config,
    lambda a, c: stats_error(coarse, a, c, bits, grid),
    weights=sum_weights(exponents),
  )


# Under a bit budget every layer's error is estimated at every candidate width: a
# shorter search (a grid of 8 exponents by 4 clip ratios, one round of a few
# golden-section steps) on bins only as fine as the width's levels need, then the
# error at its result on the full bins. On MiniLM these errors are within 2% of the
# full search's on average, at each width from 2 to 8 bits, for half its time.


def estimate_config(config: SearchConfig) -> SearchConfig:
  """The shorter schedule of :func:`width_errors`, in ``config``'s ranges."""
  return dataclasses.replace(
    config,
    exponent_points=min(config.exponent_points, 8),
    clip_points=min(config.clip_points, 4),
    iters=min(config.iters, 6),
    clip_iters=min(config.clip_iters, 5),
    rounds=1,
  )


def estimate_bins(bits: int) -> tuple[int, int]:
  """Bins of the estimate's golden-section steps and of its grid, at ``bits``.

  Finer with more levels: 256 up to 4 bits, 512 at 5 and 6, 1024 at 7 and 8; the
  grid's as :func:`grid_bins`, 128 below 5 bits.
  """
  return 256 << max(0, (bits - 3) // 2), 128 if bits < 5 else grid_bins(bits)


@functools.partial(jax.jit, static_argnames=('widths', 'grid', 'plan', 'config'))
def width_errors(
  stats: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  widths: tuple[int, ...],
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Estimated error of each layer at each width, and where it was found.

  From binned stats ``(L, 2, bins, 2)``: ``(errors, alphas, clips)``, each
  ``(len(widths), L)``. Like :func:`stats_error`, each error is the layer's less a
  constant of that layer, the same at every width. ``exponents`` as in
  :func:`search_stats`.
  """
  bins = stats.shape[2]
  weights = sum_weights(exponents)
  short = estimate_config(config)

  def at(bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    fine_bins, grid_bins = estimate_bins(bits)
    fine = coarsen(stats, max(1, bins // fine_bins))
    coarse = coarsen(stats, max(1, bins // grid_bins))
    a, c = minimise(
      lambda a, c: stats_error(fine, a, c, bits, grid),
      alpha,
      clip,
      plan,
      short,
      lambda a, c: stats_error(coarse, a, c, bits, grid),
      weights=weights,
    )
    return stats_error(stats, a, c, bits, grid), a, c

  errors, alphas, clips = zip(*[at(b) for b in widths])
  return jnp.stack(errors), jnp.stack(alphas), jnp.stack(clips)


@functools.partial(jax.jit, static_argnames=('widths', 'grid', 'plan', 'config', 'warm'))
def search_widths(
  stats: Sequence[jax.Array],
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  widths: tuple[int, ...],
  grid: str,
  plan: Plan,
  config: SearchConfig,
  warm: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The search of layers at several widths, in one program.

  ``stats[i]`` holds the layers at ``widths[i]``; ``alpha`` and ``clip`` are all
  layers', in that order. Without ``warm`` each layer is searched as
  :func:`search_stats` searches it at its width, and with ``plan.shared`` one
  exponent minimises the summed error of all. With ``warm`` the search starts from
  ``(alpha, clip)`` (a point of :func:`width_errors`), whose short search stands for
  the grid and the first round: one round of golden-section steps on the full
  bins, brackets one grid step either side. On MiniLM that ends within 0.3% of the
  full search's error at 5 bits and below it at 6 to 8, in half its time.
  """
  weights = sum_weights(exponents)
  sizes = [s.shape[0] for s in stats]
  offsets = np.cumsum([0] + sizes)
  cuts = list(zip(offsets[:-1], offsets[1:]))
  bins = stats[0].shape[2]
  coarse = [coarsen(s, max(1, bins // grid_bins(b))) for s, b in zip(stats, widths)]

  def objective(every: Sequence[jax.Array]):
    return lambda a, c: jnp.concatenate(
      [
        stats_error(s, a[lo:hi], c[lo:hi], b, grid)
        for s, b, (lo, hi) in zip(every, widths, cuts)
      ]
    )

  if warm:
    return alternate(
      objective(stats),
      alpha,
      clip,
      plan=plan,
      a_half=(config.hi - config.lo) / (config.exponent_points - 1),
      c_half=(1.0 - config.clip_lo) / (config.clip_points - 1),
      iters=config.iters,
      clip_iters=config.clip_iters,
      rounds=1,
      config=config,
      weights=weights,
    )
  return minimise(
    objective(stats), alpha, clip, plan, config, objective(coarse), weights=weights
  )


def needs_refine(size: int, config: SearchConfig) -> bool:
  """Whether layers of ``size`` weights get the exact refinement."""
  return config.refine_iters > 0 and size < config.refine_below


@functools.partial(jax.jit, static_argnames=('views', 'bits', 'grid', 'plan', 'config'))
def refine_layers(
  groups: Sequence[Sequence[jax.Array]],
  alpha: jax.Array,
  clip: jax.Array,
  *,
  views: Sequence[tuple[int, int, int, int]],
  bits: int | tuple[int, ...],
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of ``(alpha, clip)`` (one each per layer, groups in order).

  ``views[i]`` is ``(K, N, nk, ncol)`` of group ``i``; ``bits`` is every group's
  width, or each one's.
  """
  prepared = [
    prepare_stack(stack(g, k, n), nk, ncol) for g, (k, n, nk, ncol) in zip(groups, views)
  ]
  exponents = [layer_binary_exponent(scale) for _, scale in prepared]
  err = jax.vmap(functools.partial(operator.block_error, grid=grid))
  widths = bits if isinstance(bits, tuple) else (bits,) * len(prepared)
  fs = [
    (exact_inputs(xs, b, grid), normalise(scale, e))
    for (xs, scale), e, b in zip(prepared, exponents, widths)
  ]
  sizes = [xs.shape[0] for xs, _ in prepared]
  offsets = np.cumsum([0] + sizes)

  def per_layer(a, c):
    return jnp.concatenate(
      [
        err(x, log_x, d, scale, a[o : o + s], c[o : o + s])
        for ((x, log_x, d), scale), o, s in zip(fs, offsets, sizes)
      ]
    )

  return alternate(
    per_layer,
    alpha,
    clip,
    plan=plan,
    a_half=config.refine_width,
    c_half=config.refine_clip_width,
    iters=config.refine_iters,
    clip_iters=config.refine_iters,
    rounds=1,
    config=config,
    weights=sum_weights(jnp.concatenate(exponents)),
  )
