"""Sizes and errors of quantized trees, and a per-leaf summary table."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from pqjax._src.core.blocks import matrix_shape
from pqjax._src.core.leaves import PyTree, is_array, is_float_array, path_str
from pqjax._src.core.qarray import LoraArray, QArray, is_lora, is_qarray


def leaf_nbytes(x: Any) -> int:
  """Bytes a leaf really occupies (a QArray: its codes, scales and exponent)."""
  if isinstance(x, QArray):
    return x.nbytes
  if is_array(x):
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return 0


def nbytes(tree: PyTree) -> int:
  """Bytes held by the arrays of ``tree``, quantized leaves at their packed size."""
  return sum(leaf_nbytes(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray))


def relative_error(params: PyTree, params_q: PyTree) -> float:
  """``sum ||W - W_hat||^2 / sum ||W||^2`` over the quantized leaves.

  Args:
    params: the float parameters (no :class:`QArray`).
    params_q: the same tree with some leaves quantized, as :func:`pqjax.quantize`
      returns it.

  Raises:
    ValueError: the trees differ in structure, ``params`` holds a QArray (the
      arguments are swapped), or a quantized leaf's float counterpart is not a float
      array of its shape; each names the leaf.
  """
  pairs = [(w, q) for _, w, q in _leaf_pairs(params, params_q) if isinstance(q, QArray)]
  if not pairs:
    return 0.0
  num = den = 0.0
  for w, q in pairs:
    # In float64 on the host: float32 squares overflow for weights beyond about
    # 1e19 and vanish below 1e-19, and the result must not depend on the scale.
    w64 = np.asarray(w, np.float64)
    num += float(np.sum(np.square(w64 - np.asarray(q.dequantize(), np.float64))))
    den += float(np.sum(np.square(w64)))
  return num / den if den else 0.0


def _leaf_pairs(params: PyTree, params_q: PyTree) -> list[tuple[str, Any, Any]]:
  """``(path, w, q)`` for each leaf of the two trees, checked to correspond."""
  flat = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_qarray)
  flat_q = jax.tree_util.tree_leaves_with_path(params_q, is_leaf=is_qarray)
  names = [path_str(p) for p, _ in flat]
  names_q = [path_str(p) for p, _ in flat_q]
  if names != names_q:
    only = sorted(set(names) ^ set(names_q)) or names
    raise ValueError(
      'relative_error: params and params_q have different structures (leaves not in'
      f' both, or in another order: {", ".join(only[:5])})'
    )
  out = []
  for name, (_, w), (_, q) in zip(names, flat, flat_q):
    if isinstance(w, QArray):
      raise ValueError(
        f'relative_error: the first argument must be the float parameters, but {name}'
        ' is a QArray; call relative_error(params, params_q)'
      )
    if isinstance(q, QArray) and not is_float_array(w):
      raise ValueError(f'{name}: {type(w).__name__} is not a float array')
    # Broadcasting would silently compare a slice against the whole leaf.
    if is_array(w) and is_array(q) and tuple(w.shape) != tuple(q.shape):
      raise ValueError(
        f'{name}: shape {tuple(w.shape)} in params, {tuple(q.shape)} in params_q'
      )
    out.append((name, w, q))
  return out


# --- summary table -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafSummary:
  """One quantized leaf: where it is, how it is stored, and what it costs.

  A leaf with stacked layers has ``layers`` (its layer axes) and ``exponents`` (each
  layer's, in order); its ``exponent`` is their mean and ``blocks`` are per layer.
  """

  path: str
  shape: tuple[int, ...]
  dtype: str
  bits: int
  grid: str
  exponent: float
  blocks: tuple[int, int]
  bytes_before: int
  bytes_after: int
  layers: tuple[int, ...] = ()
  exponents: tuple[float, ...] = ()
  # How the block scales are stored: float32, float16 or uint8 (steps of a column
  # scale).
  scale_dtype: str = 'float32'

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def layer_count(self) -> int:
    """How many ``(K, N)`` layers the leaf holds (1 without layer axes)."""
    return int(np.prod(self.layers))

  @property
  def exponent_range(self) -> tuple[float, float]:
    """The smallest and largest exponent of the leaf's layers."""
    if not self.exponents:
      return self.exponent, self.exponent
    return min(self.exponents), max(self.exponents)

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per weight: codes, scales, the exponent and the table."""
    return 8 * self.bytes_after / max(self.size, 1)

  @property
  def granularity(self) -> str:
    """``tensor``, ``channel`` or ``group G``, read back from the scale blocks."""
    nk, ncol = self.blocks
    if nk > 1:
      k = matrix_shape(self.shape[len(self.layers) :])[0]
      return f'group {-(-k // nk)}'
    # With a single column, per-tensor and per-channel scales are the same thing.
    return 'tensor' if ncol == 1 else 'channel'


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
  """Per-leaf sizes of a quantized tree and its totals; ``str()`` gives a table."""

  leaves: tuple[LeafSummary, ...]
  float_leaves: int
  float_bytes: int
  other_leaves: int
  other_bytes: int
  # LoRA adapters (``pqjax.lora``): how many leaves have one, and their a and b bytes.
  adapters: int = 0
  adapter_bytes: int = 0

  @property
  def quantized_before(self) -> int:
    return sum(x.bytes_before for x in self.leaves)

  @property
  def quantized_after(self) -> int:
    return sum(x.bytes_after for x in self.leaves)

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per quantized weight, everything counted."""
    weights = sum(x.size for x in self.leaves)
    return 8 * self.quantized_after / weights if weights else 0.0

  @property
  def widths(self) -> dict[int, int]:
    """How many quantized leaves have each code width, widths ascending."""
    count: dict[int, int] = {}
    for x in sorted(self.leaves, key=lambda x: x.bits):
      count[x.bits] = count.get(x.bits, 0) + 1
    return count

  @property
  def total_before(self) -> int:
    """Bytes of the tree with every quantized leaf back at its original dtype."""
    return (
      self.quantized_before + self.float_bytes + self.other_bytes + self.adapter_bytes
    )

  @property
  def total_after(self) -> int:
    """Bytes of the tree as it is: equal to :func:`nbytes`."""
    return self.quantized_after + self.float_bytes + self.other_bytes + self.adapter_bytes

  @property
  def ratio(self) -> float:
    """How many times smaller the tree is than before quantization."""
    return self.total_before / self.total_after if self.total_after else 1.0

  def format(self) -> str:
    """A text table: one row per quantized leaf, then the totals.

    Where a leaf has stacked layers, a ``layers`` column gives their count and its
    exponent cell their range, ``min..max``.
    """
    stacked = any(x.layers for x in self.leaves)
    header = (
      'path',
      'shape',
      *(('layers',) if stacked else ()),
      'dtype',
      'bits',
      'grid',
      'exponent',
      'scales',
      'bytes before',
      'bytes after',
      'bits/weight',
    )
    rows = [
      (
        x.path,
        'x'.join(map(str, x.shape)) or '()',
        *((f'{x.layer_count}' if x.layers else '-',) if stacked else ()),
        x.dtype,
        str(x.bits),
        x.grid,
        exponent_text(x),
        _blocks_text(x),
        f'{x.bytes_before:,}',
        f'{x.bytes_after:,}',
        f'{x.bits_per_weight:.3f}',
      )
      for x in self.leaves
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    right = {i + stacked for i in (3, 5, 7, 8, 9)} | ({2} if stacked else set())

    def line(cells: tuple[str, ...]) -> str:
      return '  '.join(
        c.rjust(w) if i in right else c.ljust(w)
        for i, (c, w) in enumerate(zip(cells, widths))
      ).rstrip()

    out = [line(header), line(tuple('-' * w for w in widths))]
    out += [line(r) for r in rows]
    if rows:
      out.append('')
    out += [
      f'quantized leaves: {len(self.leaves)}, {self.quantized_before:,} -> '
      f'{self.quantized_after:,} bytes ({self.bits_per_weight:.3f} bits/weight)',
    ]
    if len(self.widths) > 1:
      out.append(f'widths: {self.widths_text()}')
    out += [
      f'float leaves kept: {self.float_leaves}, {self.float_bytes:,} bytes',
      f'other leaves kept: {self.other_leaves}, {self.other_bytes:,} bytes',
    ]
    if self.adapters:
      out.append(
        f'LoRA adapters: {self.adapters}, {self.adapter_bytes:,} bytes'
        f' ({8 * self.adapter_bytes / max(sum(x.size for x in self.leaves), 1):.3f}'
        ' bits per quantized weight more)'
      )
    out += [
      f'total: {self.total_before:,} -> {self.total_after:,} bytes'
      f' ({self.total_before / 1e6:.2f} MB -> {self.total_after / 1e6:.2f} MB,'
      f' {self.ratio:.2f}x smaller)',
    ]
    return '\n'.join(out)

  def widths_text(self) -> str:
    """Leaves and share of the weights at each width: ``2 bits: 1 leaf (52%), ...``."""
    total = sum(x.size for x in self.leaves) or 1
    share = {b: 0 for b in self.widths}
    for x in self.leaves:
      share[x.bits] += x.size
    return ', '.join(
      f'{b} bits: {n} {"leaf" if n == 1 else "leaves"} ({100 * share[b] / total:.0f}%)'
      for b, n in self.widths.items()
    )

  def __str__(self) -> str:
    return self.format()


def exponent_text(x: LeafSummary) -> str:
  """The exponent to 4 decimals; for stacked layers their range, ``min..max``."""
  if not x.layers:
    return f'{x.exponent:.4f}'
  lo, hi = x.exponent_range
  return f'{lo:.4f}..{hi:.4f}'


def _blocks_text(x: LeafSummary) -> str:
  nk, ncol = x.blocks
  return f'{nk * ncol * x.layer_count} ({x.granularity}, {x.scale_dtype})'


def _leaf_summary(path: str, q: QArray) -> LeafSummary:
  itemsize = np.dtype(q.dtype).itemsize
  nk, ncol = q.scale.shape[-2:]
  alphas = np.asarray(q.alpha, np.float32).reshape(-1)
  exponents = tuple(float(a) for a in alphas) if q.layer_axes else ()
  return LeafSummary(
    path=path,
    shape=tuple(q.shape),
    dtype=np.dtype(q.dtype).name,
    bits=q.bits,
    grid=q.grid,
    # A single exponent, or the mean of a stack's (none: NaN).
    exponent=float(alphas.astype(np.float64).mean()) if alphas.size else math.nan,
    blocks=(int(nk), int(ncol)),
    bytes_before=q.size * itemsize,
    bytes_after=q.nbytes,
    layers=q.layers,
    exponents=exponents,
    scale_dtype=np.dtype(q.scale.dtype).name,
  )


def summary(tree: PyTree) -> Summary:
  """Summarises a quantized tree: each QArray's storage, and the kept leaves' bytes."""
  leaves, float_leaves, float_bytes, other_leaves, other_bytes = [], 0, 0, 0, 0
  adapters = adapter_bytes = 0
  is_node = lambda x: is_qarray(x) or is_lora(x)
  for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_node):
    if isinstance(x, LoraArray):
      leaves.append(_leaf_summary(path_str(path), x.base))
      adapters += 1
      adapter_bytes += leaf_nbytes(x.a) + leaf_nbytes(x.b)
    elif isinstance(x, QArray):
      leaves.append(_leaf_summary(path_str(path), x))
    elif is_float_array(x):
      float_leaves += 1
      float_bytes += leaf_nbytes(x)
    elif is_array(x):
      other_leaves += 1
      other_bytes += leaf_nbytes(x)
  return Summary(
    leaves=tuple(leaves),
    float_leaves=float_leaves,
    float_bytes=float_bytes,
    other_leaves=other_leaves,
    other_bytes=other_bytes,
    adapters=adapters,
    adapter_bytes=adapter_bytes,
  )
