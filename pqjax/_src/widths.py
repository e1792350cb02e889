"""The width of every leaf under a bit budget: each leaf's stored bytes and estimated
damage at each candidate width, the choice (:mod:`pqjax._src.budget`), and the groups
cut by the widths chosen.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src import budget, sharding
from pqjax._src.core import grid, qarray
from pqjax._src.options import QuantizeOptions, ask
from pqjax._src.scale_storage import scale_storage
from pqjax._src.search import fit, stats
from pqjax._src.stages import (
  Group,
  GroupStats,
  Leaf,
  binary_exponents,
  plan_of,
  starting_point,
)


class Widths(NamedTuple):
  """A bit budget's choice: the groups split by width, their stats and scale dtypes,
  and where the estimate found each layer's least error at its width ``(L,)``."""

  groups: list[Group]
  stats: list[GroupStats]
  storage: list[np.ndarray]
  alphas: jax.Array
  clips: jax.Array


def _budget_storage(g: Group, s: GroupStats, options: QuantizeOptions) -> np.ndarray:
  """How ``g`` stores its scales whatever clip ratio the search finds (costs need it)."""
  if options.clip_mode == 'fixed':
    ratio = np.full((g.layer_count,), options.clip_ratio)
    return scale_storage(g, s, ratio, ratio, options)
  low = np.full((g.layer_count,), options.search_config.clip_lo)
  return scale_storage(g, s, low, np.ones((g.layer_count,)), options)


def _importance(leaf: Leaf, options: QuantizeOptions) -> float:
  """The leaf's importance: the option's, checked, or the default."""
  if options.importance is None:
    return budget.default_importance(leaf.path, leaf.value, leaf.layer_count)
  # The leaf as the tree holds it, as the other per-leaf functions see it.
  value = leaf.value.swapaxes(-1, -2) if leaf.transposed else leaf.value
  got = ask('the importance function', options.importance, leaf.path, value)
  try:
    value = float(got)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f'{leaf.path}: importance must be a finite number >= 0, got {got!r}')
  return value


def _feasible(g: Group, leaf: Leaf, widths: Sequence[int], block: bool) -> list[bool]:
  """Which widths a sharded leaf's layout can hold; ValueError if none."""
  if g.layout is None:
    return [True] * len(widths)
  ok, errors = [], []
  for b in widths:
    try:
      sharding.check(leaf.path, g.layout, g.blocks, b, block)
      ok.append(True)
    except ValueError as e:
      ok.append(False)
      errors.append(e)
  if not any(ok):
    raise errors[0]
  return ok


class WidthTable(NamedTuple):
  """What a bit budget chooses from: per selected leaf (in group order), the bytes
  and the estimated damage at each candidate width, and the byte budget."""

  leaves: list[Leaf]
  costs: list[np.ndarray]
  damages: list[np.ndarray]
  limit: int
  storage: list[np.ndarray]
  # The estimate's exponents and clip ratios at each width, ``(widths, L)``.
  points: tuple[np.ndarray, np.ndarray]


def width_table(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> WidthTable:
  """Each leaf's cost and damage at each width; ValueError for a budget out of reach.

  Costs are the bytes :class:`QArray` stores (``inf`` where a sharded leaf's layout
  cannot hold the width); a leaf's damage is its importance times the sum of its
  layers' estimated relative errors.
  """
  widths = options.widths
  storage = [_budget_storage(g, s, options) for g, s in zip(groups, group_stats)]
  block = options.clip_mode == 'block'
  leaves, costs = [], []
  for g, kinds in zip(groups, storage):
    starts = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
    for leaf, first in zip(g.leaves, starts):
      scale_dtype = qarray.SCALE_DTYPES[kinds[first] if leaf.layer_count else 0]
      cost = [
        qarray.stored_nbytes(
          tuple(leaf.value.shape),
          leaf.layer_axes,
          b,
          grid.num_levels(b, options.grid),
          g.blocks.nk,
          g.blocks.ncol,
          scale_dtype,
        )
        if fits
        else math.inf
        for b, fits in zip(widths, _feasible(g, leaf, widths, block))
      ]
      leaves.append(leaf)
      costs.append(np.array(cost, np.float64))
  limit = _limit(costs, leaves, options)
  binned = np.concatenate(
    [np.asarray(sharding.to_host(s.stats), np.float32) for s in group_stats]
  )
  errors, alphas, clips = _estimates(binned, group_stats, options)
  norms = stats.layer_norms(binned)
  errors = np.asarray(errors, np.float64)
  relative = np.where(norms > 0, errors / np.where(norms > 0, norms, 1.0), 0.0)
  ends = np.cumsum([leaf.layer_count for leaf in leaves])
  damages = [
    _importance(leaf, options) * relative[:, end - leaf.layer_count : end].sum(axis=1)
    for leaf, end in zip(leaves, ends)
  ]
  return WidthTable(leaves, costs, damages, limit, storage, (alphas, clips))


def _estimates(
  binned: np.ndarray, group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """:func:`fit.width_errors` of every layer at every width of the range.

  Without a shared exponent, by programs of one width each that any tree reuses
  (:func:`fit.estimate_each_width`), compiled side by side the first time.
  """
  plan, config = plan_of(options), options.search_config
  alpha, clip = starting_point(binned.shape[0], options)
  if plan.shared:
    errors, alphas, clips = fit.width_errors(
      binned,
      alpha,
      clip,
      binary_exponents(group_stats),
      widths=options.widths,
      grid=options.grid,
      plan=plan,
      config=config,
    )
    return np.asarray(errors), np.asarray(alphas), np.asarray(clips)
  fit.compile_all(
    fit.estimate_compilations(
      options.widths, binned.shape[2], grid=options.grid, plan=plan, config=config
    )
  )
  return fit.estimate_each_width(
    binned,
    np.asarray(alpha),
    np.asarray(clip),
    widths=options.widths,
    grid=options.grid,
    plan=plan,
    config=config,
  )


def choose_widths(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> Widths:
  """Each leaf's width under the budget, and the groups split by width.

  ValueError where the budget is outside what the range of widths can store.
  """
  if not groups:
    none = jnp.zeros((0,), jnp.float32)
    return Widths([], [], [], none, none)
  table = width_table(groups, group_stats, options)
  chosen = budget.allocate(table.costs, table.damages, table.limit)
  bits_of = {id(leaf): options.widths[c] for leaf, c in zip(table.leaves, chosen)}
  # Each layer's estimate at its leaf's width, in the layers' order.
  per_layer = np.repeat(chosen, [leaf.layer_count for leaf in table.leaves])
  return _split(groups, group_stats, table.storage, bits_of, table.points, per_layer)


def _limit(costs: list[np.ndarray], leaves: list[Leaf], options: QuantizeOptions) -> int:
  """The budget in bytes; ValueError if the widths cannot store it."""
  weights = sum(math.prod(leaf.value.shape) for leaf in leaves)
  bpw = options.bits_per_weight
  assert bpw is not None
  if not costs:
    return 0
  lo, hi = budget.reachable(costs)
  if not weights:
    return hi
  limit = budget.budget_bytes(bpw, weights)
  if limit < lo or Fraction(bpw) * weights > 8 * hi:
    low, high = options.widths[0], options.widths[-1]
    raise ValueError(
      f'bits_per_weight={bpw} is out of reach: widths {low}..{high} store'
      f' {math.ceil(8e4 * lo / weights) / 1e4:.4f} to'
      f' {math.floor(8e4 * hi / weights) / 1e4:.4f} bits per weight for these'
      f' {weights:,} weights (codes, scales, exponents and tables)'
    )
  return limit


def _split(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  storage: Sequence[np.ndarray],
  bits_of: dict[int, int],
  points: tuple[np.ndarray, np.ndarray],
  chosen: np.ndarray,
) -> Widths:
  """Each group cut into one group per width, widths ascending, with its layers.

  ``points`` are the estimate's exponents and clip ratios ``(widths, L)``, and
  ``chosen`` each layer's width index.
  """
  cut: list[Group] = []
  cut_stats: list[GroupStats] = []
  cut_storage: list[np.ndarray] = []
  order = []
  first = 0
  for g, s, kinds in zip(groups, group_stats, storage):
    # The small arrays are cut on the host: a gather on the device for each piece
    # costs more to dispatch than these copies, which stand in for device arrays.
    host: list[Any] = [np.asarray(sharding.to_host(x)) for x in s]
    starts = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
    for b in sorted({bits_of[id(leaf)] for leaf in g.leaves}):
      mine = [i for i, leaf in enumerate(g.leaves) if bits_of[id(leaf)] == b]
      index = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i in mine] + [np.zeros(0, int)]
      ).astype(np.int32)
      cut.append(dataclasses.replace(g, leaves=tuple(g.leaves[i] for i in mine), bits=b))
      whole = index.size == g.layer_count
      cut_stats.append(s if whole else GroupStats(*(x[index] for x in host)))
      cut_storage.append(kinds[index])
      order.append(first + index)
    first += g.layer_count
  layers = np.concatenate(order + [np.zeros(0, np.int32)])
  alphas, clips = (np.asarray(x)[chosen[layers], layers] for x in points)
  return Widths(cut, cut_stats, cut_storage, jnp.asarray(alphas), jnp.asarray(clips))
