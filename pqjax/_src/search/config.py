"""Settings of the exponent and clip search, and what a search varies."""

from __future__ import annotations

import dataclasses


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
  refine_below: int = 2**17
  bins: int = 4096
  block_clips: int = 9
  block_clip_width: float = 0.2

  def __post_init__(self):
    if not 0 < self.lo < self.hi:
      raise ValueError(
        f'search range must satisfy 0 < lo < hi, got ({self.lo}, {self.hi})'
      )
    if not 0 < self.clip_lo < 1:
      raise ValueError(f'clip_lo must be in (0, 1), got {self.clip_lo}')
    if (
      self.grid < 3
      or self.clip_grid < 2
      or self.iters < 1
      or self.clip_iters < 1
      or self.rounds < 1
      or self.refine_iters < 0
      or self.bins < 16
      or self.block_clips < 1
    ):
      raise ValueError(
        f'grid must be >= 3, clip_grid >= 2, iters, clip_iters, rounds and'
        f' block_clips >= 1, refine_iters >= 0 and bins >= 16; got {self}'
      )


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
