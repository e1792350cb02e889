"""Fitting each layer's exponent and clip ratio: on binned statistics, then exactly.

The search itself is one jitted program for the whole tree, on the concatenated
statistics of every layer; only the statistics and encoding passes depend on a
layer's shape.
"""

from __future__ import annotations

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
  GRID_BINS,
  coarsen,
  layer_exponent,
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
  coarse = coarsen(stats, max(1, stats.shape[2] // GRID_BINS))
  return minimise(
    lambda a, c: stats_error(stats, a, c, bits, grid),
    alpha,
    clip,
    plan,
    config,
    lambda a, c: stats_error(coarse, a, c, bits, grid),
    weights=sum_weights(exponents),
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
  bits: int,
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of ``(alpha, clip)`` (one each per layer, groups in order).

  ``views[i]`` is ``(K, N, nk, ncol)`` of group ``i``.
  """
  prepared = [
    prepare_stack(stack(g, k, n), nk, ncol) for g, (k, n, nk, ncol) in zip(groups, views)
  ]
  exponents = [layer_exponent(scale) for _, scale in prepared]
  err = jax.vmap(functools.partial(operator.block_error, grid=grid))
  fs = [
    (exact_inputs(xs, bits, grid), normalise(scale, e))
    for (xs, scale), e in zip(prepared, exponents)
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
