"""The options of ``quantize``: one frozen dataclass, validated in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import numpy as np

from pqjax._src.core.blocks import Granularity, check_granularity
from pqjax._src.core.grid import MAX_BITS, MIN_BITS, Grid, check_bits, check_grid
from pqjax._src.core.leaves import Filter
from pqjax._src.search.config import SearchConfig

T = TypeVar('T')

# "layer": searched per leaf; "global": one for the whole tree.
ExponentMode = Literal['layer', 'global']
ClipMode = Literal['layer', 'block', 'fixed']
# The clip option: True or "layer", "block", False, or a fixed ratio in (0, 1].
Clip = bool | Literal['layer', 'block'] | float
ScaleDtype = Literal['auto'] | type[np.floating] | np.dtype | str
# The leading axes of a leaf that index stacked layers: one count for every leaf, or
# ``layer_axes(path, leaf) -> int``.
LayerAxes = int | Callable[[str, Any], int]
# Which axis of a leaf holds its output features: -1 (Flax's ``(in, out)``
# kernels), -2 (PyTorch's ``(out, in)`` weights), or ``output_axis(path, leaf)``.
OutputAxis = Literal[-1, -2] | Callable[[str, Any], int]
# How much a leaf's error matters under a bit budget: ``importance(path, leaf)``.
Importance = Callable[[str, Any], float]


def _as_float(x: object) -> float | None:
  """``x`` as a float if it is a real number (not a bool), else None."""
  if isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
    return float(x)
  return None


def check_exponent(exponent: object) -> ExponentMode | float:
  if exponent == 'layer' or exponent == 'global':
    return 'layer' if exponent == 'layer' else 'global'
  value = _as_float(exponent)
  if value is not None and math.isfinite(value) and value > 0:
    return value
  raise ValueError(
    f'exponent must be "layer", "global" or a positive float, got {exponent!r}'
  )


def check_clip(clip: object) -> tuple[ClipMode, float]:
  """``(mode, ratio)``: mode ``"layer"``, ``"block"`` or ``"fixed"``."""
  if clip is True or clip == 'layer':
    return 'layer', 1.0
  if clip == 'block':
    return 'block', 1.0
  if clip is False or clip is None:
    return 'fixed', 1.0
  value = _as_float(clip)
  if value is not None and math.isfinite(value) and 0 < value <= 1:
    return 'fixed', value
  raise ValueError(
    f'clip must be True, False, "layer", "block" or a ratio in (0, 1], got {clip!r}'
  )


def check_scale_dtype(scale_dtype: object) -> np.dtype | None:
  """``None`` (automatic), float32, float16 or uint8."""
  if scale_dtype is None or (isinstance(scale_dtype, str) and scale_dtype == 'auto'):
    return None
  try:
    dt = np.dtype(scale_dtype)  # type: ignore[call-overload]
  except TypeError:
    dt = None
  if dt not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8)):
    raise ValueError(
      f'scale_dtype must be "auto", float32, float16 or uint8, got {scale_dtype!r}'
    )
  return dt


def check_widths(
  bits: object, bits_per_weight: object
) -> tuple[int | tuple[int, int], float | None]:
  """``(bits, bits_per_weight)`` checked: an int width, or a range under a budget.

  Without a budget ``bits`` is one width (default 4). With one, ``bits`` is the
  range ``(lo, hi)`` the widths are chosen from (default ``(2, 8)``); a single int
  then conflicts with the budget.
  """
  if isinstance(bits, list):
    bits = tuple(bits)
  if bits_per_weight is None:
    if isinstance(bits, tuple):
      raise ValueError(
        f'a range of widths bits={bits!r} needs a budget: pass bits_per_weight'
      )
    return check_bits(4 if bits is None else bits), None
  budget = _as_float(bits_per_weight)
  if budget is None or not math.isfinite(budget) or budget <= 0:
    raise ValueError(
      f'bits_per_weight must be a positive number of bits, got {bits_per_weight!r}'
    )
  if bits is None:
    return (MIN_BITS, MAX_BITS), budget
  if not isinstance(bits, tuple):
    raise ValueError(
      f'bits={bits!r} and bits_per_weight={bits_per_weight!r} conflict: one width'
      ' for every leaf, or a budget the widths are chosen for; give bits=(lo, hi)'
      ' to narrow the widths of a budget'
    )
  if len(bits) != 2:
    raise ValueError(f'bits must be (lo, hi) with a budget, got {bits!r}')
  lo, hi = check_bits(bits[0], 'bits[0]'), check_bits(bits[1], 'bits[1]')
  if lo > hi:
    raise ValueError(f'bits=(lo, hi) needs lo <= hi, got {bits!r}')
  return (lo, hi), budget


def check_importance(importance: object) -> Importance | None:
  if importance is not None and not callable(importance):
    raise TypeError(
      f'importance must be a function (path, leaf) -> float, got {importance!r}'
    )
  return importance


def _as_count(x: object) -> int | None:
  """``x`` as an int if it is a non-negative integer (not a bool), else None."""
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0:
    return int(x)
  return None


def check_layer_axes(layer_axes: object) -> LayerAxes:
  """A non-negative int, or a function ``(path, leaf) -> int`` checked per leaf."""
  if callable(layer_axes):
    return layer_axes
  count = _as_count(layer_axes)
  if count is None:
    raise ValueError(
      'layer_axes must be a non-negative int or a function (path, leaf) -> int,'
      f' got {layer_axes!r}'
    )
  return count


def ask(what: str, fn: Callable[[str, Any], T], path: str, leaf: Any) -> T:
  """``fn(path, leaf)`` for a per-leaf option (``what``: "the filter"...); what it
  raises, as a ValueError naming the leaf."""
  try:
    return fn(path, leaf)
  except Exception as e:
    raise ValueError(f'{path}: {what} raised {type(e).__name__}: {e}') from e


def leaf_layer_axes(layer_axes: LayerAxes, path: str, leaf: Any) -> int:
  """How many leading axes of the selected ``leaf`` index layers; ValueError if bad.

  Each layer must keep at least two axes (its ``(K, N)`` view), so a positive
  count is at most ``leaf.ndim - 2``; 0 (a single matrix) fits every leaf.
  """
  if callable(layer_axes):
    got = ask('the layer_axes function', layer_axes, path, leaf)
    count = _as_count(got)
    if count is None:
      raise ValueError(
        f'{path}: the layer_axes function must return a non-negative int, got {got!r}'
      )
  else:
    count = layer_axes
  ndim = len(leaf.shape)
  if count and count > ndim - 2:
    raise ValueError(
      f'{path}: layer_axes {count} leaves fewer than 2 axes per layer in a leaf of'
      f' shape {tuple(leaf.shape)}; use at most {max(ndim - 2, 0)} for it'
    )
  return count


def check_output_axis(output_axis: object) -> OutputAxis:
  """-1, -2, or a function ``(path, leaf) -> -1 or -2`` checked per leaf."""
  if callable(output_axis):
    return output_axis
  if output_axis in (-1, -2) and not isinstance(output_axis, bool):
    return -1 if output_axis == -1 else -2
  raise ValueError(
    "output_axis must be -1 (the last axis), -2 (PyTorch's (out, in)) or a function"
    f' (path, leaf) -> -1 or -2, got {output_axis!r}'
  )


def leaf_output_axis(
  output_axis: OutputAxis, path: str, leaf: Any, layer_axes: int
) -> Literal[-1, -2]:
  """The output axis of the selected ``leaf``; ValueError if it cannot be one.

  -2 needs exactly two axes per layer: the scales then run along the leaf's
  second-to-last axis, and products contracting its last one read the codes.
  """
  if callable(output_axis):
    got = ask('the output_axis function', output_axis, path, leaf)
    if isinstance(got, bool) or got not in (-1, -2):
      raise ValueError(
        f'{path}: the output_axis function must return -1 or -2, got {got!r}'
      )
  else:
    got = output_axis
  if got == -2 and len(leaf.shape) - layer_axes != 2:
    raise ValueError(
      f'{path}: output_axis -2 needs two axes per layer (out, in), got shape'
      f' {tuple(leaf.shape)} with layer_axes {layer_axes}'
    )
  return -1 if got == -1 else -2


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
  """How :func:`pqjax.quantize` quantizes a tree; every field is checked on creation.

  ``quantize(params, bits, **options)`` builds one of these from its keyword
  arguments, so a bad option raises before any work is done. These attributes are
  where the options are documented.

  Attributes:
    bits: code width, 2 to 8 (default 4); with ``bits_per_weight``, the range
      ``(lo, hi)`` the widths are chosen from (default ``(2, 8)``).
    bits_per_weight: a budget of stored bits per weight (codes, scales, exponents,
      tables, averaged over the quantized leaves): each leaf's width is chosen to
      meet it with the least estimated damage. None: every leaf at ``bits``.
    importance: under a budget, how much each leaf's relative error counts,
      ``importance(path, leaf) -> float``; None: the layer's size to the power
      0.2. Without a budget it would weigh nothing: a ValueError.
    granularity: ``"channel"`` (one scale per output feature), ``"tensor"`` (one
      per leaf) or an int ``G`` (one per ``G`` consecutive rows of one column; when
      ``G`` does not divide K the last block of each column is shorter).
    exponent: ``"layer"`` (searched per leaf), ``"global"`` (one exponent for the
      whole tree, minimising the summed error) or a fixed float (``1.0`` with
      ``grid="symmetric"`` and ``clip=False`` is uniform round-to-nearest).
    grid: ``"full"`` (all ``2 ** bits`` codes: levels ``(k / d) ** (1 / a)`` on
      each side, one more on the negative side, each weight taking its nearest
      level) or ``"symmetric"`` (the paper's ``2 ** bits - 1`` levels, rounding in
      the power domain).
    clip: the block scale is ``c`` times the block's absmax. ``True`` (or
      ``"layer"``): one ratio per leaf, searched jointly with the exponent;
      ``"block"``: then each block picks the best of a few ratios around it;
      ``False``: ``c = 1``, the paper's absmax scale; a float in (0, 1]: that ratio.
    scale_dtype: storage of the block scales: ``"auto"``, ``float32``, ``float16``
      or ``uint8`` (each block's scale in 255ths, rounded up, of its column's
      largest, stored as float32, as llama.cpp's k-quants store theirs:
      ``8 / G + 32 / K`` bits a weight). ``"auto"``: uint8 for groups of 5 or more
      blocks a column; float16 for other groups where every scale is a normal
      float16; float32 otherwise.
    filter: ``filter(path, leaf) -> bool`` picks the leaves to quantize; ``path``
      is the ``/``-joined key path. Default: floating leaves with ndim >= 2. An
      answer other than a bool is a TypeError naming the leaf.
    search_config: a :class:`SearchConfig` (exponents in [0.05, 2.0], clip ratios
      in [0.3, 1] by default); None: the default one.
    progress: a tqdm progress bar on stderr. None: for trees of 50M weights or
      more, when stderr is a terminal.
    layer_axes: how many leading axes of a leaf index stacked layers
      (``nn.scan``, ``nnx.scan``, vmapped layers): an int for every selected leaf,
      or a function ``(path, leaf) -> int``. Each layer gets its own exponent, clip
      ratio and scales, exactly as if the layers were separate leaves; the leaf
      stays one :class:`QArray`. Default 0: a leaf is one layer.
    output_axis: the axis holding a leaf's output features, which get one scale
      each: -1 (default; Flax kernels ``(in, out)``), -2 (PyTorch's ``(out, in)``
      Linear and Embedding weights; needs two axes per layer), or a function
      ``(path, leaf) -> -1 or -2``. A -2 leaf is quantized as its transpose and
      stored as a ``transposed`` :class:`QArray` of its own shape, whose products
      over its last axis (``x @ W.T``) read the codes as a Flax kernel's do.
  """

  bits: int | tuple[int, int] | None = None
  bits_per_weight: float | None = None
  importance: Importance | None = None
  granularity: Granularity = 'channel'
  exponent: ExponentMode | float = 'layer'
  grid: Grid = 'full'
  clip: Clip = True
  scale_dtype: ScaleDtype = 'auto'
  filter: Filter | None = None
  search_config: SearchConfig = dataclasses.field(default_factory=SearchConfig)
  progress: bool | None = None
  layer_axes: LayerAxes = 0
  output_axis: OutputAxis = -1

  def __post_init__(self) -> None:
    set_ = lambda name, value: object.__setattr__(self, name, value)
    bits, budget = check_widths(self.bits, self.bits_per_weight)
    set_('bits', bits)
    set_('bits_per_weight', budget)
    check_importance(self.importance)
    if self.importance is not None and budget is None:
      raise ValueError(
        'importance weighs leaves when a bit budget (bits_per_weight) chooses their'
        ' widths; without one every leaf gets `bits`: pass bits_per_weight, or no'
        ' importance'
      )
    set_('granularity', check_granularity(self.granularity))
    set_('exponent', check_exponent(self.exponent))
    set_('grid', check_grid(self.grid))
    check_clip(self.clip)
    check_scale_dtype(self.scale_dtype)
    set_('layer_axes', check_layer_axes(self.layer_axes))
    set_('output_axis', check_output_axis(self.output_axis))
    if self.filter is not None and not callable(self.filter):
      raise TypeError(
        f'filter must be a function (path, leaf) -> bool, got {self.filter!r}'
      )
    if self.search_config is None:
      set_('search_config', SearchConfig())
    elif not isinstance(self.search_config, SearchConfig):
      raise TypeError(
        f'search_config must be a pqjax.SearchConfig, got {self.search_config!r}'
      )

  @property
  def width(self) -> int:
    """The one code width, without a budget."""
    if not isinstance(self.bits, int):
      raise ValueError('a budget has no single width')
    return self.bits

  @property
  def widths(self) -> tuple[int, ...]:
    """Candidate widths: the one width, or every width of the budget's range."""
    if isinstance(self.bits, int):
      return (self.bits,)
    lo, hi = self.bits  # type: ignore[misc]
    return tuple(range(lo, hi + 1))

  @property
  def clip_mode(self) -> ClipMode:
    return check_clip(self.clip)[0]

  @property
  def clip_ratio(self) -> float:
    """The fixed ratio, or the starting one of a search."""
    return check_clip(self.clip)[1]

  @property
  def stored_scale_dtype(self) -> np.dtype | None:
    """float32, float16 or uint8 as asked; None: chosen per leaf."""
    return check_scale_dtype(self.scale_dtype)
