"""What a report holds: per-layer rows, error curves, histograms and fidelity."""

from __future__ import annotations

import dataclasses

import numpy as np

import pqjax


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer:
  """One quantized leaf's summary and relative error (None without float weights)."""

  leaf: pqjax.LeafSummary
  error: float | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Curve:
  """Exact relative error of one layer at each exponent of a grid."""

  path: str
  exponents: np.ndarray
  errors: np.ndarray
  chosen: float
  chosen_error: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class Histogram:
  """A layer's weights over their block scale, and its normalised levels."""

  path: str
  values: np.ndarray
  levels: np.ndarray
  exponent: float
  bits: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fidelity:
  """One setting at one bit width against the float model."""

  setting: str
  bits: int
  relative_error: float
  nbytes: int
  mean_cosine: float | None = None
  min_cosine: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
  """Everything a report folder shows."""

  title: str
  layers: tuple[Layer, ...]
  summary: pqjax.Summary
  curves: tuple[Curve, ...]
  histograms: tuple[Histogram, ...]
  fidelity: tuple[Fidelity, ...]
  float_nbytes: int | None
  sentences: int = 0
  notes: tuple[str, ...] = ()
