"""Quantization reports: a folder with a Markdown summary and PNG plots, and a table.

A report shows what quantization did to a model: the reconstruction error of a few
real layers against the exponent (the paper's convexity figure, with the chosen
minimum), their weights against the quantization levels, the exponent of every layer,
and fidelity against bits for uniform quantization, the paper's settings and
pqjax's defaults. It needs the ``report`` extra (matplotlib, rich).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

import pqjax
from pqjax import QArray, path_str, quantize
from pqjax.tools.measures import Curve, Fidelity, Histogram, Layer, Report
from pqjax.tools.minilm import cosines


def _supported(**kwargs: Any) -> dict[str, Any]:
  """The options ``quantize`` knows, so the settings stay valid as it gains some."""
  known = {f.name for f in dataclasses.fields(pqjax.QuantizeOptions)}
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
      raise ImportError(
        f'reports need matplotlib and rich ({module} is missing);'
        ' install them with `pip install "pqjax[report]"`'
      ) from None


# --- measurements ------------------------------------------------------------------


def float_leaves(
  params: Any, paths: Sequence[str], shapes: Sequence[tuple[int, ...]]
) -> dict[str, Any]:
  """The leaves of ``params`` at ``paths``; ValueError if one is missing or reshaped."""
  flat = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  out = {}
  for path, shape in zip(paths, shapes):
    if path not in flat:
      raise ValueError(f'{path}: the float weights have no such leaf')
    if tuple(flat[path].shape) != tuple(shape):
      raise ValueError(
        f'{path}: the float leaf has shape {tuple(flat[path].shape)},'
        f' the quantized one {tuple(shape)}'
      )
    out[path] = flat[path]
  return out


def layers(params_q: Any, weights: dict[str, Any] | None) -> tuple[Layer, ...]:
  """Per-leaf rows: ``pqjax.summary`` plus each leaf's relative error."""
  q = pqjax.quantized_leaves(params_q)
  return tuple(
    Layer(
      leaf=s,
      error=None if weights is None else pqjax.relative_error(weights[s.path], q[s.path]),
    )
    for s in pqjax.summary(params_q).leaves
  )


# --- single layers: a leaf, or one layer of a stacked leaf ----------------------------


def layer_name(path: str, index: tuple[int, ...]) -> str:
  """A single layer's name: the leaf's path, and ``[i]`` for a layer of a stack."""
  return f'{path}[{",".join(map(str, index))}]' if index else path


def layer_index(params_q: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
  """Every single ``(K, N)`` layer by name: its leaf's path and its index there."""
  return {
    layer_name(p, index): (p, index)
    for p, x in pqjax.quantized_leaves(params_q).items()
    for index in (tuple(int(i) for i in j) for j in np.ndindex(*x.layers))
  }


def one_layer(q: QArray, index: tuple[int, ...]) -> QArray:
  """Layer ``index`` of a stacked QArray as a QArray of its own (``()``: ``q``)."""
  if not index:
    return q
  return QArray(
    codes=q.codes[index],
    scale=q.scale[index],
    column_scale=None if q.column_scale is None else q.column_scale[index],
    alpha=q.alpha[index],
    table=q.table[index],
    bits=q.bits,
    shape=tuple(q.shape[q.layer_axes :]),
    dtype=q.dtype,
  )


def single_layers(
  params_q: Any, names: Sequence[str], weights: dict[str, Any] | None = None
) -> dict[str, tuple[QArray, Any]]:
  """Each named layer's QArray and float weights (None without ``weights``)."""
  q = pqjax.quantized_leaves(params_q)
  where = layer_index(params_q)
  out = {}
  for name in names:
    path, index = where[name]
    w = None if weights is None else np.asarray(weights[path])[index]
    out[name] = (one_layer(q[path], index), w)
  return out


def sample(params_q: Any, n: int = 4) -> list[str]:
  """Up to ``n`` layers spanning the exponents found, from lowest to highest.

  Each layer of a stacked leaf is a candidate of its own, named ``path[i]``.
  """
  small = []
  for p, x in pqjax.quantized_leaves(params_q).items():
    count = int(np.prod(x.layers))
    if not count or x.size // count > SAMPLE_MAX_WEIGHTS:
      continue
    alphas = np.asarray(x.alpha, np.float32)
    small += [
      (float(alphas[index]), layer_name(p, tuple(int(i) for i in index)))
      for index in np.ndindex(*x.layers)
    ]
  if not small:
    return []
  small.sort()
  index = np.round(np.linspace(0, len(small) - 1, min(n, len(small)))).astype(int)
  return [small[i][1] for i in dict.fromkeys(index.tolist())]


def granularity_of(q: QArray) -> str | int:
  """The ``granularity`` option that gives ``q``'s scale blocks."""
  nk, ncol = q.scale.shape[-2:]
  if nk > 1:
    return q.block_rows
  # With one column, per-tensor and per-channel scales are the same blocks.
  return 'tensor' if ncol == 1 else 'channel'


def options_of(q: QArray) -> dict[str, Any]:
  """The quantize options read back from a QArray: its blocks and its grid."""
  grid = getattr(q, 'grid', None)
  return {
    'granularity': granularity_of(q),
    **(_supported(grid=grid) if grid is not None else {}),
  }


def error_curves(
  weights: dict[str, Any],
  params_q: Any,
  paths: Sequence[str],
  options: dict[str, Any],
  points: int = GRID_POINTS,
) -> tuple[Curve, ...]:
  """Exact relative error of each layer in ``paths`` on a grid of fixed exponents.

  Each grid point quantizes the sampled layers with ``quantize(..., exponent=a)``
  and the other ``options`` of the report's quantization, so the curve is the
  library's own operator, not a model of it. ``paths`` name single layers (see
  :func:`sample`): a layer of a stacked leaf is quantized alone.
  """
  if not paths:
    return ()
  layers = single_layers(params_q, paths, weights)
  q = {p: x for p, (x, _) in layers.items()}
  chosen = {p: float(q[p].alpha) for p in paths}
  hi = max(1.5, 1.25 * max(chosen.values()))
  grid = np.linspace(0.1, hi, points)
  dropped = ('exponent', 'layer_axes', 'bits', 'bits_per_weight', 'importance')
  options = {k: v for k, v in options.items() if k not in dropped}
  sub = {p: w for p, (_, w) in layers.items()}
  errors: dict[str, list[float]] = {p: [] for p in paths}
  # Each layer at its own width (a bit budget gives them several).
  widths = sorted({q[p].bits for p in paths})
  for a in grid:
    for bits in widths:
      mine = {p: w for p, w in sub.items() if q[p].bits == bits}
      sub_q, _ = quantize(mine, bits, exponent=float(a), **options)
      for p in mine:
        errors[p].append(pqjax.relative_error(sub[p], sub_q[p]))
  return tuple(
    Curve(
      path=p,
      exponents=grid,
      errors=np.array(errors[p]),
      chosen=chosen[p],
      chosen_error=pqjax.relative_error(sub[p], q[p]),
    )
    for p in paths
  )


def row_scales(q: QArray) -> np.ndarray:
  """The float32 scale of every row of one layer's (K, N) view: ``(K, ncol)``."""
  k, _ = q.matrix_shape
  return np.repeat(np.asarray(q.block_scale()), q.block_rows, axis=0)[:k]


def normalised(w: Any, q: QArray) -> np.ndarray:
  """``w`` over its block scale, as a (K, N) float32 array (zero scales give zeros)."""
  scale = row_scales(q)
  w2 = np.asarray(w, np.float32).reshape(q.matrix_shape)
  return w2 / np.where(scale > 0, scale, 1)


def histograms(
  weights: dict[str, Any] | None, params_q: Any, paths: Sequence[str]
) -> tuple[Histogram, ...]:
  """Normalised weights (decoded ones without floats) and the levels of each layer.

  ``paths`` name single layers (see :func:`sample`).
  """
  out = []
  for p, (q, w) in single_layers(params_q, paths, weights).items():
    w = q.dequantize() if w is None else w
    out.append(
      Histogram(
        path=p,
        values=normalised(w, q).ravel(),
        levels=np.asarray(q.table),
        exponent=float(q.alpha),
        bits=q.bits,
      )
    )
  return tuple(out)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Embedder:
  """Embeddings of real sentences: ``embed(params_q)`` against the float model's."""

  embed: Callable[[Any], np.ndarray]
  reference: np.ndarray
  sentences: int


def fidelity(
  params: Any,
  embedder: Embedder | None = None,
  bits: Sequence[int] = BITS,
  settings: dict[str, dict[str, Any]] | None = None,
  layer_axes: Any = 0,
) -> tuple[Fidelity, ...]:
  """Each setting at each bit width: relative error, bytes, and embedding cosines.

  ``layer_axes`` (``quantize``'s option) applies to every setting.
  """
  settings = SETTINGS if settings is None else settings
  done: dict[tuple[int, str], Fidelity] = {}
  rows = []
  for name, options in settings.items():
    for b in bits:
      # Settings that resolve to the same options (the paper's and the defaults,
      # before the library grew other ones) are measured once.
      key = (b, json.dumps(options, sort_keys=True))
      if key not in done:
        params_q, _ = quantize(params, b, layer_axes=layer_axes, **options)
        cos = (
          None
          if embedder is None
          else cosines(embedder.reference, embedder.embed(params_q))
        )
        done[key] = Fidelity(
          setting=name,
          bits=b,
          relative_error=pqjax.relative_error(params, params_q),
          nbytes=pqjax.nbytes(params_q),
          mean_cosine=None if cos is None else float(cos.mean()),
          min_cosine=None if cos is None else float(cos.min()),
        )
      rows.append(dataclasses.replace(done[key], setting=name))
  return tuple(rows)


def layer_axes_of(params_q: Any) -> Any:
  """``quantize``'s ``layer_axes`` that gave ``params_q``'s stacked leaves (0 if none)."""
  axes = {p: x.layer_axes for p, x in pqjax.quantized_leaves(params_q).items()}
  if not any(axes.values()):
    return 0
  return lambda path, leaf: axes.get(path, 0)


def build(
  params_q: Any,
  params: Any | None = None,
  *,
  title: str,
  options: dict[str, Any] | None = None,
  embedder: Embedder | None = None,
  bits: Sequence[int] = BITS,
  points: int = GRID_POINTS,
) -> Report:
  """A report on ``params_q``; with the float ``params``, errors, curves and fidelity.

  ``options`` are the quantize options that gave ``params_q`` (its exponents are
  searched again at fixed values on the error curves); by default they are read
  from the first sampled leaf (granularity, grid) and the library's defaults.
  """
  q = pqjax.quantized_leaves(params_q)
  if not q:
    raise ValueError(f'{title}: holds no quantized leaves')
  weights = (
    None
    if params is None
    else float_leaves(params, list(q), [x.shape for x in q.values()])
  )
  paths = sample(params_q)
  notes = []
  if weights is None:
    options = {}
    notes.append(
      'No float weights were given: errors, error curves and fidelity'
      ' need them; the histograms show the decoded weights.'
    )
  elif options is None:
    options = options_of(single_layers(params_q, paths[:1])[paths[0]][0]) if paths else {}
  return Report(
    title=title,
    layers=layers(params_q, weights),
    summary=pqjax.summary(params_q),
    curves=()
    if weights is None
    else error_curves(weights, params_q, paths, options, points),
    histograms=histograms(weights, params_q, paths),
    fidelity=()
    if params is None
    else fidelity(params, embedder, bits, layer_axes=layer_axes_of(params_q)),
    float_nbytes=None if params is None else pqjax.nbytes(params),
    sentences=0 if embedder is None else embedder.sentences,
    notes=tuple(notes),
  )


def minilm_report(
  bits: int = 4,
  granularity: Any = None,
  sentences: int = 32,
  model: Any = None,
  fidelity_bits: Sequence[int] = BITS,
  points: int = GRID_POINTS,
  bits_per_weight: float | None = None,
) -> Report:
  """A report on the bundled MiniLM quantized with pqjax's defaults at ``bits``.

  With ``bits_per_weight``, each layer's width is chosen for that budget instead.
  """
  from pqjax.tools import corpus, minilm

  model = model or minilm.load()
  options = {} if granularity is None else {'granularity': granularity}
  name = 'all-MiniLM-L6-v2 (FlaxBertModel)'
  if bits_per_weight is None:
    params_q, _ = quantize(model.params, bits, **options)
    title = f'{name}, {bits} bits'
  else:
    params_q, _ = quantize(model.params, bits_per_weight=bits_per_weight, **options)
    title = f'{name}, {bits_per_weight} bits per weight'
  embedder = None
  if sentences:
    text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(sentences))
    embed = minilm.embed_fn(pqjax.wrap(model.module.apply))
    embedder = Embedder(
      embed=lambda p: minilm.embed_all(embed, p, text),
      sentences=sentences,
      reference=minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text),
    )
  return build(
    params_q,
    model.params,
    title=title,
    options=options,
    embedder=embedder,
    bits=fidelity_bits,
    points=points,
  )


def checkpoint_report(
  path: str | Path,
  float_path: str | Path | None = None,
  fidelity_bits: Sequence[int] = BITS,
  points: int = GRID_POINTS,
) -> Report:
  """A report on a pqjax quantized checkpoint, against its float weights if given."""
  params_q = pqjax.load(path)
  params = None if float_path is None else pqjax.load_float(float_path)
  return build(params_q, params, title=str(path), bits=fidelity_bits, points=points)


# --- output ------------------------------------------------------------------------


def _fmt_error(x: float | None) -> str:
  return 'n/a' if x is None else f'{x:.4e}'


def _fmt_shape(shape: tuple[int, ...]) -> str:
  return 'x'.join(map(str, shape)) or '()'


def _fmt_exponent(x: pqjax.LeafSummary) -> str:
  """The exponent; for a leaf with stacked layers, their range ``min..max``."""
  if not x.layers:
    return f'{x.exponent:.4f}'
  lo, hi = x.exponent_range
  return f'{lo:.4f}..{hi:.4f}'


LAYER_COLUMNS = (
  'layer',
  'shape',
  'bits',
  'exponent',
  'rel. error',
  'bytes before',
  'bytes after',
)


def layer_cells(layer: Layer) -> tuple[str, ...]:
  """One row of the per-layer table, as text, in :data:`LAYER_COLUMNS` order."""
  x = layer.leaf
  return (
    x.path,
    _fmt_shape(x.shape),
    str(x.bits),
    _fmt_exponent(x),
    _fmt_error(layer.error),
    f'{x.bytes_before:,}',
    f'{x.bytes_after:,}',
  )


def table(report: Report) -> Any:
  """The per-layer table as a ``rich.table.Table``."""
  from rich import box
  from rich.table import Table

  rows = [layer_cells(x) for x in report.layers]
  t = Table(title=report.title, box=box.SIMPLE_HEAD)
  for i, name in enumerate(LAYER_COLUMNS):
    # Numbers keep their full width; a narrow terminal folds the layer path.
    width = max(len(r[i]) for r in [LAYER_COLUMNS, *rows])
    t.add_column(
      name,
      justify='left' if i < 2 else 'right',
      overflow='fold',
      no_wrap=i > 0,
      min_width=width if i > 0 else None,
    )
  for row in rows:
    t.add_row(*row)
  s = report.summary
  t.caption = (
    f'{len(s.leaves)} quantized leaves; total {s.total_before:,} ->'
    f' {s.total_after:,} bytes ({s.ratio:.2f}x smaller)'
  )
  return t


def print_table(report: Report, console: Any = None) -> None:
  """Prints the per-layer table to the terminal (or ``console``)."""
  from rich.console import Console

  (console or Console()).print(table(report))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  return [
    '| ' + ' | '.join(header) + ' |',
    '|' + '---|' * len(header),
    *('| ' + ' | '.join(r) + ' |' for r in rows),
  ]


PLOTS = {
  'curves': 'error_vs_exponent.png',
  'histograms': 'histograms.png',
  'exponents': 'exponents.png',
  'widths': 'widths.png',
  'fidelity': 'fidelity_vs_bits.png',
}


def markdown(report: Report, images: dict[str, str]) -> str:
  """The summary page; ``images`` maps a plot's key in :data:`PLOTS` to its file."""
  s = report.summary
  out = [
    f'# pqjax report: {report.title}',
    '',
    f'{len(s.leaves)} quantized leaves, {s.total_before:,} -> {s.total_after:,}'
    f' bytes ({s.ratio:.2f}x smaller), {s.bits_per_weight:.3f} bits per weight.',
    '',
  ]
  if len(s.widths) > 1:
    out += [f'Widths: {s.widths_text()}.', '']
  out += [f'> {n}' for n in report.notes] + ([''] if report.notes else [])
  captions = {
    'curves': 'Reconstruction error against the exponent for a sample of layers'
    ' (exact error at each grid point); the dot is the exponent chosen.',
    'histograms': 'Weights over their block scale, with the quantization levels.',
    'exponents': 'Exponent of every quantized layer.',
    'widths': 'Code width and stored bits per weight of every quantized layer.',
    'fidelity': 'Fidelity against bits for each setting.',
  }
  for key, file in images.items():
    out += [f'## {captions[key]}', '', f'![{key}]({file})', '']
  if report.fidelity:
    out += [
      '## Fidelity against bits',
      '',
      'Settings (quantize options): '
      + '; '.join(f'`{k}` = `{v or "defaults"}`' for k, v in SETTINGS.items()),
      '',
    ]
    cos = report.sentences > 0
    header = ['setting', 'bits', 'rel. error', 'bytes']
    header += ['mean cosine', 'min cosine'] if cos else []
    rows = [
      [f.setting, str(f.bits), _fmt_error(f.relative_error), f'{f.nbytes:,}']
      + ([f'{f.mean_cosine:.4f}', f'{f.min_cosine:.4f}'] if cos else [])
      for f in report.fidelity
    ]
    out += _md_table(header, rows) + ['']
    if cos:
      out += [
        f'Cosine of mean-pooled sentence embeddings against the float model on'
        f' {report.sentences} standard-library docstring paragraphs.',
        '',
      ]
  out += ['## Layers', '']
  out += _md_table(LAYER_COLUMNS, [layer_cells(x) for x in report.layers])
  return '\n'.join(out) + '\n'


def write(report: Report, out: str | Path) -> Path:
  """Writes ``report.md`` and the PNG plots into the folder ``out``; returns the page."""
  from pqjax.tools import plots

  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  makers: dict[str, tuple[Sequence[Any], Callable[[Any, Path], None]]] = {
    'curves': (report.curves, plots.error_curves),
    'histograms': (report.histograms, plots.histograms),
    'exponents': (report.layers, plots.exponents),
    # Drawn where the widths differ (a bit budget chose them).
    'widths': (report.layers if len(report.summary.widths) > 1 else (), plots.widths),
    'fidelity': (report.fidelity, plots.fidelity),
  }
  images = {}
  for key, (data, make) in makers.items():
    if data:
      make(data, out / PLOTS[key])
      images[key] = PLOTS[key]
  page = out / 'report.md'
  page.write_text(markdown(report, images))
  return page
