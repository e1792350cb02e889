"""Settings of the exponent and clip search, and what a search varies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
  """Settings of the exponent and clip search.

  Attributes:
    lo: smallest exponent considered.
    hi: largest exponent considered. ``a = 1`` is uniform quantization; ``a < 1``
      puts more levels near zero, ``a > 1`` near the block maximum.
    exponent_points: points of the coarse exponent grid over ``[lo, hi]`` (the
      grid's resolution; ``grid=`` of :func:`pqjax.quantize` is the grid of levels).
    iters: golden-section steps on the exponent in each round; the bracket shrinks
      by 0.618 each step. These steps cost nothing per weight: they run on binned
      statistics of the layer.
    clip_lo: smallest clip ratio considered (the block scale over its absmax).
    clip_points: points of the coarse clip grid over ``[clip_lo, 1]``.
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
  exponent_points: int = 24
  iters: int = 24
  clip_lo: float = 0.3
  clip_points: int = 8
  clip_iters: int = 16
  rounds: int = 2
  refine_width: float = 0.05
  refine_clip_width: float = 0.03
  refine_iters: int = 14
  refine_below: int = 2**17
  bins: int = 4096
  block_clips: int = 9
  block_clip_width: float = 0.2

  def __post_init__(self) -> None:
    set_ = lambda name, value: object.__setattr__(self, name, value)
    for name in _FLOATS:
      set_(name, _real(name, getattr(self, name)))
    for name, least in _INTS.items():
      set_(name, _count(name, getattr(self, name), least))
    if not 0 < self.lo < self.hi:
      raise ValueError(
        f'SearchConfig: the exponent range must satisfy 0 < lo < hi, got lo={self.lo},'
        f' hi={self.hi}'
      )
    if not 0 < self.clip_lo < 1:
      raise ValueError(f'SearchConfig: clip_lo must be in (0, 1), got {self.clip_lo}')
    for name in ('refine_width', 'refine_clip_width', 'block_clip_width'):
      if getattr(self, name) < 0:
        raise ValueError(f'SearchConfig: {name} must be >= 0, got {getattr(self, name)}')
    # The grid scores bins up to 256 times wider, whole groups of fine bins.
    if self.bins > 256 and self.bins % 256:
      raise ValueError(
        f'SearchConfig: bins must be at most 256 or a multiple of 256, got {self.bins}'
      )


# Fields that are finite real numbers, and integer fields with their least value.
_FLOATS = ('lo', 'hi', 'clip_lo', 'refine_width', 'refine_clip_width', 'block_clip_width')
_INTS = {
  'exponent_points': 3,
  'iters': 1,
  'clip_points': 2,
  'clip_iters': 1,
  'rounds': 1,
  'refine_iters': 0,
  'refine_below': 0,
  'bins': 16,
  'block_clips': 1,
}


def _real(name: str, value: object) -> float:
  """``value`` as a finite float; ValueError naming the field otherwise."""
  if (
    isinstance(value, (int, float, np.integer, np.floating))
    and not isinstance(value, bool)
    and math.isfinite(value)
  ):
    return float(value)
  raise ValueError(f'SearchConfig: {name} must be a finite number, got {value!r}')


def _count(name: str, value: object, least: int) -> int:
  """``value`` as an int ``>= least``; ValueError naming the field otherwise."""
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if value >= least:
      return int(value)
  raise ValueError(f'SearchConfig: {name} must be an integer >= {least}, got {value!r}')


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
