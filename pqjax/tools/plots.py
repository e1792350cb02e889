"""The PNG plots of a report, drawn with matplotlib's Agg backend (no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pqjax.tools.measures import Curve, Fidelity, Histogram, Layer

DPI = 100


def _pyplot() -> Any:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  return plt


def _grid(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any, list[Any]]:
  plt = _pyplot()
  cols = min(n, 2)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(width * cols, height * rows), squeeze=False
  )
  flat = list(axes.ravel())
  for ax in flat[n:]:
    ax.set_visible(False)
  return plt, fig, flat[:n]


def _short(path: str, keep: int = 4) -> str:
  parts = path.split('/')
  return '/'.join(parts[-keep:]) if len(parts) > keep else path


def _save(plt: Any, fig: Any, path: Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def error_curves(curves: Sequence[Curve], path: Path) -> None:
  """Relative error against the exponent, one panel per layer, minimum marked."""
  plt, fig, axes = _grid(len(curves))
  for ax, c in zip(axes, curves):
    ax.plot(c.exponents, c.errors, '-', color='tab:blue', lw=1.5, label='exact error')
    ax.plot(
      [c.chosen],
      [c.chosen_error],
      'o',
      color='tab:red',
      ms=7,
      label=f'chosen a = {c.chosen:.3f}',
    )
    ax.axvline(c.chosen, color='tab:red', lw=0.8, ls=':')
    ax.axvline(1.0, color='grey', lw=0.8, ls='--', label='a = 1 (uniform)')
    ax.set_yscale('log')
    ax.set_xlabel('exponent a')
    ax.set_ylabel('||W - W_hat||² / ||W||²')
    ax.set_title(_short(c.path), fontsize=9)
    ax.legend(fontsize=8)
  _save(plt, fig, path)


def histograms(hists: Sequence[Histogram], path: Path) -> None:
  """Histogram of each layer's normalised weights with its quantization levels."""
  plt, fig, axes = _grid(len(hists))
  for ax, h in zip(axes, hists):
    # Clipped scales put weights beyond +-1, where the extreme levels catch them.
    lo, hi = min(-1.0, float(h.values.min())), max(1.0, float(h.values.max()))
    ax.hist(h.values, bins=201, range=(lo, hi), color='tab:blue', alpha=0.8)
    ax.set_yscale('log')
    for level in h.levels:
      ax.axvline(float(level), color='tab:red', lw=0.6, alpha=0.7)
    ax.set_xlabel('weight / block scale (red: levels)')
    ax.set_ylabel('count')
    ax.set_title(f'{_short(h.path)}: {h.bits} bits, a = {h.exponent:.3f}', fontsize=9)
  _save(plt, fig, path)


def exponents(layers: Sequence[Layer], path: Path) -> None:
  """Horizontal bars: the exponent of every quantized leaf, in tree order.

  A leaf with stacked layers gets one bar at their mean exponent, with a line
  from the smallest to the largest.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(layers)))
  y = np.arange(len(layers))
  mean = np.array([x.leaf.exponent for x in layers])
  lo, hi = np.array([x.leaf.exponent_range for x in layers]).reshape(-1, 2).T
  ax.barh(y, mean, color='tab:blue')
  stacked = np.array([bool(x.leaf.layers) for x in layers], bool)
  if stacked.any():
    ax.errorbar(
      mean[stacked],
      y[stacked],
      xerr=[mean[stacked] - lo[stacked], hi[stacked] - mean[stacked]],
      fmt='none',
      ecolor='black',
      capsize=3,
      lw=1,
    )
  ax.axvline(1.0, color='grey', lw=0.8, ls='--')
  names = [
    _short(x.leaf.path) + (f' ({x.leaf.layer_count} layers)' if x.leaf.layers else '')
    for x in layers
  ]
  ax.set_yticks(y, names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlabel('exponent a (1 = uniform)')
  ax.set_title('Exponent per layer')
  _save(plt, fig, path)


def fidelity(rows: Sequence[Fidelity], path: Path) -> None:
  """Relative error (and embedding cosine, if measured) against bits, per setting."""
  cos = all(r.mean_cosine is not None for r in rows)
  plt, fig, axes = _grid(2 if cos else 1)
  settings = list(dict.fromkeys(r.setting for r in rows))
  markers = 'os^vD'
  for i, name in enumerate(settings):
    mine = sorted((r for r in rows if r.setting == name), key=lambda r: r.bits)
    bits = [r.bits for r in mine]
    style = dict(marker=markers[i % len(markers)], label=name, alpha=0.85)
    axes[0].plot(bits, [r.relative_error for r in mine], **style)
    if cos:
      axes[1].plot(bits, [r.mean_cosine for r in mine], **style)
  axes[0].set_yscale('log')
  axes[0].set_ylabel('relative reconstruction error')
  if cos:
    axes[1].set_ylabel('mean embedding cosine vs float')
  for ax in axes:
    ax.set_xlabel('bits')
    ax.set_xticks(sorted({r.bits for r in rows}))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  _save(plt, fig, path)


def widths(layers: Sequence[Layer], path: Path) -> None:
  """Horizontal bars: the code width of every quantized leaf, in tree order.

  A dot marks the leaf's stored bits per weight (scales, exponent and table
  included), and a dashed line the tree's average: what a bit budget counts.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 1.5 + 0.22 * len(layers)))
  y = np.arange(len(layers))
  bits = np.array([x.leaf.bits for x in layers])
  stored = np.array([x.leaf.bits_per_weight for x in layers])
  colours = plt.get_cmap('viridis')((bits - 2) / 6)
  ax.barh(y, bits, color=colours, label='code width')
  ax.plot(
    np.minimum(stored, 9.5), y, 'o', color='tab:red', ms=4, label='stored bits/weight'
  )
  size = np.array([x.leaf.size for x in layers], np.float64)
  average = float(np.sum(stored * size) / max(np.sum(size), 1))
  ax.axvline(average, color='grey', lw=0.8, ls='--', label=f'average {average:.3f}')
  names = [
    _short(x.leaf.path) + (f' ({x.leaf.layer_count} layers)' if x.leaf.layers else '')
    for x in layers
  ]
  ax.set_yticks(y, names, fontsize=7)
  ax.invert_yaxis()
  ax.set_xlim(0, 10)
  ax.set_xticks(range(0, 11))
  ax.set_xlabel('bits (dots past 9.5 are drawn at 9.5)')
  ax.set_title('Width per layer')
  ax.legend(fontsize=8, loc='lower right')
  _save(plt, fig, path)
