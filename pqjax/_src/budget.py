"""Bit budgets: the width of every leaf, chosen to fit a budget of stored bits.

``quantize(params, bits_per_weight=3.5)`` gives each selected leaf its own code width
in a range (2 to 8 by default) so that the stored bits per weight, counted as
``pqjax.summary`` counts them (codes, scales, exponents and tables over the
quantized leaves), stay within the budget, and a data-free estimate of the damage
to the model is least:

- a leaf's damage at a width is ``importance(path, leaf)`` times the sum of its
  layers' relative errors ``||W - W_hat||^2 / ||W||^2`` there, each error estimated
  from the statistics pass (one for all widths) by a short search at that width;
- the default importance is the fifth root of the layer's size: chosen on MiniLM
  from relative error alone (each leaf counts once), absolute error, error per
  weight (size-weighted) and square-root weighting (``benchmarks/budget.py``);
- the choice is a multiple-choice knapsack, solved exactly by dynamic programming
  over the Pareto frontier of (stored bytes, damage) of the leaves taken so far.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np

# Past this many points on the frontier (trees of many hundreds of leaves), the
# frontier keeps the least damage in each of this many equal spans of stored bytes:
# an approximation, at least as good as the exact optimum of a budget smaller by one
# span for each leaf taken after the first thinning.
MAX_FRONTIER = 1 << 16
# The default importance is the layer's size to this power (see the module doc).
SIZE_POWER = 0.2


def default_importance(path: str, leaf: Any, layers: int = 1) -> float:
  """How much a leaf's relative error counts by default: ``layer size ** 0.2``."""
  del path
  return float(max(math.prod(leaf.shape) // max(layers, 1), 1)) ** SIZE_POWER


def budget_bytes(bits_per_weight: float, weights: int) -> int:
  """The most bytes ``weights`` quantized weights may store at ``bits_per_weight``.

  Exact: ``8 * bytes / weights <= bits_per_weight`` for the float as given.
  """
  return math.floor(Fraction(bits_per_weight) * weights / 8)


def reachable(costs: Sequence[np.ndarray]) -> tuple[int, int]:
  """The fewest and most bytes an assignment of widths can store."""
  lo = sum(int(np.min(c[np.isfinite(c)])) for c in costs)
  hi = sum(int(np.max(c[np.isfinite(c)])) for c in costs)
  return lo, hi


def allocate(
  costs: Sequence[np.ndarray],
  damages: Sequence[np.ndarray],
  budget: int,
  max_frontier: int = MAX_FRONTIER,
) -> np.ndarray:
  """The choice of each item that minimises the summed damage within ``budget``.

  Args:
    costs: per item, the bytes of each choice (``inf``: not allowed).
    damages: per item, the damage of each choice.
    budget: the most bytes all items may take together.
    max_frontier: frontier size past which costs are bucketed (an approximation).

  Returns:
    The index of the chosen option of each item (int64). Ties go to the cheaper
    assignment, then to earlier options: the result is deterministic.

  Raises:
    ValueError: no assignment fits the budget.
  """
  n = len(costs)
  cheapest = [float(np.min(c)) for c in costs]
  rest = np.concatenate([np.cumsum(cheapest[::-1])[::-1], [0.0]])
  if rest[0] > budget:
    raise ValueError(f'no choice fits {budget} bytes: the least is {int(rest[0])}')
  # The frontier: costs ascending, damages strictly descending. Each step records,
  # for every point, the point it extends and the option taken.
  f_cost = np.zeros(1, np.int64)
  f_damage = np.zeros(1, np.float64)
  trail: list[tuple[np.ndarray, np.ndarray]] = []
  for i in range(n):
    c = np.asarray(costs[i], np.float64)
    d = np.asarray(damages[i], np.float64)
    ok = np.flatnonzero(np.isfinite(c))
    cost = (f_cost[:, None] + c[ok].astype(np.int64)[None, :]).reshape(-1)
    damage = (f_damage[:, None] + d[ok][None, :]).reshape(-1)
    parent = np.repeat(np.arange(f_cost.size), ok.size)
    option = np.tile(ok, f_cost.size)
    fits = np.flatnonzero(cost + rest[i + 1] <= budget)
    # By cost, then damage; equal pairs keep their order (parent, then option).
    fits = fits[np.argsort(damage[fits], kind='stable')]
    fits = fits[np.argsort(cost[fits], kind='stable')]
    cost, damage, parent, option = cost[fits], damage[fits], parent[fits], option[fits]
    keep = np.ones(cost.size, bool)
    keep[1:] = damage[1:] < np.minimum.accumulate(damage)[:-1]
    keep = np.flatnonzero(keep)
    if keep.size > max_frontier:
      keep = keep[_thin(cost[keep], budget, max_frontier)]
    f_cost, f_damage = cost[keep], damage[keep]
    trail.append((parent[keep], option[keep]))
  j = int(np.argmin(f_damage))
  choice = np.zeros(n, np.int64)
  for i in range(n - 1, -1, -1):
    parent, option = trail[i]
    choice[i] = option[j]
    j = int(parent[j])
  return choice


def _thin(cost: np.ndarray, budget: int, size: int) -> np.ndarray:
  """Of a frontier, the point of least damage in each of ``size`` spans of cost.

  Costs ascend and damages descend along a frontier: that point is the span's last.
  """
  span = np.floor_divide(cost * size, max(budget, 1))
  return np.flatnonzero(np.diff(span, append=span[-1] + 1))
