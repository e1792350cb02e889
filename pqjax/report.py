"""Quantization reports: a folder with a Markdown summary and PNG plots, and a table.

A report shows what quantization did to a model: the reconstruction error of a few
real layers against the exponent (the paper's convexity figure, with the chosen
minimum), their weights against the quantization levels, the exponent of every layer,
and fidelity against bits for uniform quantization, the paper's settings and
pqjax's defaults. It needs the ``report`` extra (matplotlib, rich).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pqjax import sizes
from pqjax.minilm import cosines
from pqjax.qarray import QArray, is_qarray, matrix_shape
from pqjax.quantize import quantize
from pqjax.tree import path_str


def _supported(**kwargs: Any) -> dict[str, Any]:
  """The options ``quantize`` knows, so the settings stay valid as it gains some."""
  known = inspect.signature(quantize).parameters
  return {k: v for k, v in kwargs.items() if k in known}


# The paper: symmetric sign-magnitude grid, absmax scales, one scale per channel.
_PAPER = {'granularity': 'channel', **_supported(grid='symmetric', clip=False)}

# The settings compared against bits: name -> quantize options.
SETTINGS: dict[str, dict[str, Any]] = {
    'uniform': {**_PAPER, 'exponent': 1.0},
    'paper': {**_PAPER, 'exponent': 'layer'},
    'pqjax': {},
}
BITS = (2, 3, 4, 8)
# Layers above this size are left out of the per-exponent sweeps, which quantize
# each sampled layer once per grid point.
SAMPLE_MAX_WEIGHTS = 1 << 21
GRID_POINTS = 41


def require_extras() -> None:
  """Raises ImportError, naming the extra to install, if matplotlib or rich is missing."""
  for module in ('matplotlib', 'rich'):
    try:
      __import__(module)
    except ImportError:
      raise ImportError(f'reports need matplotlib and rich ({module} is missing);'
                        ' install them with `pip install "pqjax[report]"`') from None


# --- what a report holds -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer:
  """One quantized leaf's summary and relative error (None without float weights)."""

  leaf: sizes.LeafSummary
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
  summary: sizes.Summary
  curves: tuple[Curve, ...]
  histograms: tuple[Histogram, ...]
  fidelity: tuple[Fidelity, ...]
  float_nbytes: int | None
  sentences: int = 0
  notes: tuple[str, ...] = ()


# --- measurements ------------------------------------------------------------------


def qarrays(params_q: Any) -> dict[str, QArray]:
  """The quantized leaves of a tree by path, in tree order."""
  return {path_str(p): x for p, x in
          jax.tree_util.tree_leaves_with_path(params_q, is_leaf=is_qarray)
          if isinstance(x, QArray)}


def float_leaves(params: Any, paths: Sequence[str], shapes: Sequence[tuple[int, ...]]
                 ) -> dict[str, Any]:
  """The leaves of ``params`` at ``paths``; ValueError if one is missing or reshaped."""
  flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  out = {}
  for path, shape in zip(paths, shapes):
    if path not in flat:
      raise ValueError(f'{path}: the float weights have no such leaf')
    if tuple(flat[path].shape) != tuple(shape):
      raise ValueError(f'{path}: the float leaf has shape {tuple(flat[path].shape)},'
                       f' the quantized one {tuple(shape)}')
    out[path] = flat[path]
  return out


def layers(params_q: Any, weights: dict[str, Any] | None) -> tuple[Layer, ...]:
  """Per-leaf rows: ``sizes.summary`` plus each leaf's relative error."""
  q = qarrays(params_q)
  return tuple(
      Layer(leaf=s, error=None if weights is None
            else sizes.relative_error(weights[s.path], q[s.path]))
      for s in sizes.summary(params_q).leaves)


def sample(params_q: Any, n: int = 4) -> list[str]:
  """Up to ``n`` layers spanning the exponents found, from lowest to highest."""
  q = qarrays(params_q)
  small = sorted((float(x.alpha), p) for p, x in q.items()
                 if x.size <= SAMPLE_MAX_WEIGHTS)
  if not small:
    return []
  index = np.round(np.linspace(0, len(small) - 1, min(n, len(small)))).astype(int)
  return [small[i][1] for i in dict.fromkeys(index.tolist())]


def granularity_of(q: QArray) -> str | int:
  """The ``granularity`` option that gives ``q``'s scale blocks."""
  nk, ncol = q.scale.shape
  if nk > 1:
    return q.block_rows
  # With one column, per-tensor and per-channel scales are the same blocks.
  return 'tensor' if ncol == 1 else 'channel'


def options_of(q: QArray) -> dict[str, Any]:
  """The quantize options read back from a QArray: its blocks and its grid."""
  grid = getattr(q, 'grid', None)
  return {'granularity': granularity_of(q),
          **(_supported(grid=grid) if grid is not None else {})}


def error_curves(weights: dict[str, Any], params_q: Any, paths: Sequence[str],
                 options: dict[str, Any], points: int = GRID_POINTS
                 ) -> tuple[Curve, ...]:
  """Exact relative error of each layer in ``paths`` on a grid of fixed exponents.

  Each grid point quantizes the sampled layers with ``quantize(..., exponent=a)``
  and the other ``options`` of the report's quantization, so the curve is the
  library's own operator, not a model of it.
  """
  if not paths:
    return ()
  q = qarrays(params_q)
  chosen = {p: float(q[p].alpha) for p in paths}
  hi = max(1.5, 1.25 * max(chosen.values()))
  grid = np.linspace(0.1, hi, points)
  options = {k: v for k, v in options.items() if k != 'exponent'}
  bits = q[paths[0]].bits
  sub = {p: weights[p] for p in paths}
  errors = {p: [] for p in paths}
  for a in grid:
    sub_q, _ = quantize(sub, bits, exponent=float(a), **options)
    for p in paths:
      errors[p].append(sizes.relative_error(sub[p], sub_q[p]))
  return tuple(Curve(path=p, exponents=grid, errors=np.array(errors[p]),
                     chosen=chosen[p],
                     chosen_error=sizes.relative_error(weights[p], q[p]))
               for p in paths)


def row_scales(q: QArray) -> np.ndarray:
  """The float32 scale of every row of the (K, N) view: ``(K, ncol)``."""
  k, _ = matrix_shape(q.shape)
  return np.repeat(np.asarray(q.scale, np.float32), q.block_rows, axis=0)[:k]


def normalised(w: Any, q: QArray) -> np.ndarray:
  """``w`` over its block scale, as a (K, N) float32 array (zero scales give zeros)."""
  scale = row_scales(q)
  w2 = np.asarray(w, np.float32).reshape(matrix_shape(q.shape))
  return w2 / np.where(scale > 0, scale, 1)


def histograms(weights: dict[str, Any] | None, params_q: Any, paths: Sequence[str]
               ) -> tuple[Histogram, ...]:
  """Normalised weights (decoded ones without floats) and the levels of each layer."""
  q = qarrays(params_q)
  out = []
  for p in paths:
    w = weights[p] if weights is not None else q[p].dequantize()
    out.append(Histogram(path=p, values=normalised(w, q[p]).ravel(),
                         levels=np.asarray(q[p].table), exponent=float(q[p].alpha),
                         bits=q[p].bits))
  return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Embedder:
  """Embeddings of real sentences: ``embed(params_q)`` against the float model's."""

  embed: Callable[[Any], np.ndarray]
  reference: np.ndarray
  sentences: int


def fidelity(params: Any, embedder: Embedder | None = None, bits: Sequence[int] = BITS,
             settings: dict[str, dict[str, Any]] | None = None) -> tuple[Fidelity, ...]:
  """Each setting at each bit width: relative error, bytes, and embedding cosines."""
  settings = SETTINGS if settings is None else settings
  done: dict[tuple[int, str], Fidelity] = {}
  rows = []
  for name, options in settings.items():
    for b in bits:
      # Settings that resolve to the same options (the paper's and the defaults,
      # before the library grew other ones) are measured once.
      key = (b, json.dumps(options, sort_keys=True))
      if key not in done:
        params_q, _ = quantize(params, b, **options)
        cos = (None if embedder is None
               else cosines(embedder.reference, embedder.embed(params_q)))
        done[key] = Fidelity(setting=name, bits=b,
                             relative_error=sizes.relative_error(params, params_q),
                             nbytes=sizes.nbytes(params_q),
                             mean_cosine=None if cos is None else float(cos.mean()),
                             min_cosine=None if cos is None else float(cos.min()))
      rows.append(dataclasses.replace(done[key], setting=name))
  return tuple(rows)


def build(params_q: Any, params: Any | None = None, *, title: str,
          options: dict[str, Any] | None = None, embedder: Embedder | None = None,
          bits: Sequence[int] = BITS, points: int = GRID_POINTS) -> Report:
  """A report on ``params_q``; with the float ``params``, errors, curves and fidelity.

  ``options`` are the quantize options that gave ``params_q`` (its exponents are
  searched again at fixed values on the error curves); by default they are read
  from the first sampled leaf (granularity, grid) and the library's defaults.
  """
  q = qarrays(params_q)
  if not q:
    raise ValueError(f'{title}: holds no quantized leaves')
  weights = (None if params is None
             else float_leaves(params, list(q), [x.shape for x in q.values()]))
  paths = sample(params_q)
  notes = []
  if weights is None:
    options = {}
    notes.append('No float weights were given: errors, error curves and fidelity'
                 ' need them; the histograms show the decoded weights.')
  elif options is None:
    options = options_of(q[paths[0]]) if paths else {}
  return Report(
      title=title, layers=layers(params_q, weights), summary=sizes.summary(params_q),
      curves=() if weights is None else error_curves(weights, params_q, paths,
                                                     options, points),
      histograms=histograms(weights, params_q, paths),
      fidelity=() if params is None else fidelity(params, embedder, bits),
      float_nbytes=None if params is None else sizes.nbytes(params),
      sentences=0 if embedder is None else embedder.sentences, notes=tuple(notes))


def minilm_report(bits: int = 4, granularity: Any = None, sentences: int = 32,
                  model: Any = None, fidelity_bits: Sequence[int] = BITS,
                  points: int = GRID_POINTS) -> Report:
  """A report on the bundled MiniLM quantized with pqjax's defaults at ``bits``."""
  from pqjax import minilm
  from pqjax.apply import wrap
  from pqjax.tools import corpus

  model = model or minilm.load()
  options = {} if granularity is None else {'granularity': granularity}
  params_q, _ = quantize(model.params, bits, **options)
  embedder = None
  if sentences:
    text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(sentences))
    embed = minilm.embed_fn(wrap(model.module.apply))
    embedder = Embedder(
        embed=lambda p: minilm.embed_all(embed, p, text), sentences=sentences,
        reference=minilm.embed_all(minilm.embed_fn(model.module.apply), model.params,
                                   text))
  return build(params_q, model.params,
               title=f'all-MiniLM-L6-v2 (FlaxBertModel), {bits} bits', options=options,
               embedder=embedder, bits=fidelity_bits, points=points)


def checkpoint_report(path: str | Path, float_path: str | Path | None = None,
                      fidelity_bits: Sequence[int] = BITS,
                      points: int = GRID_POINTS) -> Report:
  """A report on a pqjax quantized checkpoint, against its float weights if given."""
  from pqjax import checkpoint

  params_q = checkpoint.load(path)
  params = None if float_path is None else checkpoint.load_float(float_path)
  return build(params_q, params, title=str(path), bits=fidelity_bits, points=points)


# --- output ------------------------------------------------------------------------


def _fmt_error(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.4e}'


def _fmt_shape(shape: tuple[int, ...]) -> str:
  return 'x'.join(map(str, shape)) or '()'


LAYER_COLUMNS = ('layer', 'shape', 'bits', 'exponent', 'rel. error', 'bytes before',
                 'bytes after')


def layer_cells(layer: Layer) -> tuple[str, ...]:
  """One row of the per-layer table, as text, in :data:`LAYER_COLUMNS` order."""
  x = layer.leaf
  return (x.path, _fmt_shape(x.shape), str(x.bits), f'{x.exponent:.4f}',
          _fmt_error(layer.error), f'{x.bytes_before:,}', f'{x.bytes_after:,}')


def table(report: Report) -> Any:
  """The per-layer table as a ``rich.table.Table``."""
  from rich import box
  from rich.table import Table

  rows = [layer_cells(x) for x in report.layers]
  t = Table(title=report.title, box=box.SIMPLE_HEAD)
  for i, name in enumerate(LAYER_COLUMNS):
    # Numbers keep their full width; a narrow terminal folds the layer path.
    width = max(len(r[i]) for r in [LAYER_COLUMNS, *rows])
    t.add_column(name, justify='left' if i < 2 else 'right', overflow='fold',
                 no_wrap=i > 0, min_width=width if i > 0 else None)
  for row in rows:
    t.add_row(*row)
  s = report.summary
  t.caption = (f'{len(s.leaves)} quantized leaves; total {s.total_before:,} ->'
               f' {s.total_after:,} bytes ({s.ratio:.2f}x smaller)')
  return t


def print_table(report: Report, console: Any = None) -> None:
  """Prints the per-layer table to the terminal (or ``console``)."""
  from rich.console import Console

  (console or Console()).print(table(report))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header),
          *('| ' + ' | '.join(r) + ' |' for r in rows)]


PLOTS = {'curves': 'error_vs_exponent.png', 'histograms': 'histograms.png',
         'exponents': 'exponents.png', 'fidelity': 'fidelity_vs_bits.png'}


def markdown(report: Report, images: dict[str, str]) -> str:
  """The summary page; ``images`` maps a plot's key in :data:`PLOTS` to its file."""
  s = report.summary
  out = [f'# pqjax report: {report.title}', '',
         f'{len(s.leaves)} quantized leaves, {s.total_before:,} -> {s.total_after:,}'
         f' bytes ({s.ratio:.2f}x smaller).', '']
  out += [f'> {n}' for n in report.notes] + ([''] if report.notes else [])
  captions = {
      'curves': 'Reconstruction error against the exponent for a sample of layers'
                ' (exact error at each grid point); the dot is the exponent chosen.',
      'histograms': 'Weights over their block scale, with the quantization levels.',
      'exponents': 'Exponent of every quantized layer.',
      'fidelity': 'Fidelity against bits for each setting.',
  }
  for key, file in images.items():
    out += [f'## {captions[key]}', '', f'![{key}]({file})', '']
  if report.fidelity:
    out += ['## Fidelity against bits', '',
            'Settings (quantize options): '
            + '; '.join(f'`{k}` = `{v or "defaults"}`' for k, v in SETTINGS.items()),
            '']
    cos = report.sentences > 0
    header = ['setting', 'bits', 'rel. error', 'bytes']
    header += ['mean cosine', 'min cosine'] if cos else []
    rows = [[f.setting, str(f.bits), _fmt_error(f.relative_error), f'{f.nbytes:,}']
            + ([f'{f.mean_cosine:.4f}', f'{f.min_cosine:.4f}'] if cos else [])
            for f in report.fidelity]
    out += _md_table(header, rows) + ['']
    if cos:
      out += [f'Cosine of mean-pooled sentence embeddings against the float model on'
              f' {report.sentences} standard-library docstring paragraphs.', '']
  out += ['## Layers', '']
  out += _md_table(LAYER_COLUMNS, [layer_cells(x) for x in report.layers])
  return '\n'.join(out) + '\n'


def write(report: Report, out: str | Path) -> Path:
  """Writes ``report.md`` and the PNG plots into the folder ``out``; returns the page."""
  from pqjax import plots

  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  makers = {'curves': (report.curves, plots.error_curves),
            'histograms': (report.histograms, plots.histograms),
            'exponents': (report.layers, plots.exponents),
            'fidelity': (report.fidelity, plots.fidelity)}
  images = {}
  for key, (data, make) in makers.items():
    if data:
      make(data, out / PLOTS[key])
      images[key] = PLOTS[key]
  page = out / 'report.md'
  page.write_text(markdown(report, images))
  return page
