"""The quantized array: a frozen dataclass pytree that decodes itself."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from pqjax._src.core import packing
from pqjax._src.core.blocks import matrix_shape
from pqjax._src.core.grid import GRIDS, num_levels
from pqjax._src.core.leaves import is_array, path_str


@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
  """A weight stored as packed power-domain codes.

  Attributes:
    codes: packed codes along K: ``(packed_rows(K, bits), N)``, uint8 for 2 to 4
      bits (table indices), int8 for 5 to 8 bits (signed codes).
    scale: block scales ``(nk, ncol)`` (float32, or float16 for small groups):
      ``nk`` blocks of ``ceil(K / nk)`` rows (the last may be shorter), ``ncol`` is
      1 (one scale for all columns) or N (one per column).
    alpha: float32 scalar, the exponent of the power map.
    table: float32, the decoded level of each code in order: ``2 ** bits - 1``
      entries for the paper's symmetric grid, ``2 ** bits`` for the full grid.
      Decoding is a lookup and a multiply by the block scale, with no ``pow``.
    bits: code width, 2 to 8.
    shape: shape of the original leaf.
    dtype: dtype of the original leaf, which decoding gives back.
  """

  codes: jax.Array
  scale: jax.Array
  alpha: jax.Array
  table: jax.Array
  bits: int
  shape: tuple[int, ...]
  dtype: np.dtype

  def __post_init__(self):
    # Pytree utilities rebuild nodes with placeholder leaves; validate arrays only.
    if not (is_array(self.codes) and is_array(self.scale)):
      return
    k, n = matrix_shape(self.shape)
    want = (packing.packed_rows(k, self.bits), n)
    if tuple(self.codes.shape) != want:
      raise ValueError(
        f'codes shape {tuple(self.codes.shape)} does not match {want} for a leaf of'
        f' shape {self.shape} at {self.bits} bits'
      )
    if np.dtype(self.codes.dtype) != packing.packed_dtype(self.bits):
      raise ValueError(
        f'codes dtype {self.codes.dtype} is not {packing.packed_dtype(self.bits)} at'
        f' {self.bits} bits'
      )
    if len(self.scale.shape) != 2:
      raise ValueError(f'scale must be 2-D (nk, ncol), got {tuple(self.scale.shape)}')
    nk, ncol = self.scale.shape
    if nk < 1 or nk > max(k, 1) or -(-k // -(-k // nk)) != nk or ncol not in (1, n):
      raise ValueError(
        f'scale shape {tuple(self.scale.shape)} does not tile a ({k}, {n}) matrix'
      )
    if is_array(self.alpha) and tuple(self.alpha.shape) != ():
      raise ValueError(f'alpha must be a scalar, got shape {tuple(self.alpha.shape)}')
    sizes = [(num_levels(self.bits, g),) for g in GRIDS]
    if is_array(self.table) and tuple(self.table.shape) not in sizes:
      raise ValueError(
        f'table shape {tuple(self.table.shape)} is not one of {sizes} at {self.bits} bits'
      )

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes held by the codes, scales, exponent and decoding table."""
    return sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in (self.codes, self.scale, self.alpha, self.table)
    )

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """The ``(K, N)`` view the codes and scales are laid out on."""
    return matrix_shape(self.shape)

  @property
  def block_rows(self) -> int:
    """Rows of K that share one scale (the last block may have fewer)."""
    k = matrix_shape(self.shape)[0]
    return -(-k // self.scale.shape[0])

  @property
  def grid(self) -> str:
    """``"symmetric"`` (the paper's ``2 ** bits - 1`` levels) or ``"full"``."""
    return 'full' if self.table.shape[0] == 2**self.bits else 'symmetric'

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per weight, counting scales, the exponent and the table."""
    return 8 * self.nbytes / max(self.size, 1)

  def dequantize(self) -> jax.Array:
    """Decodes to an array of the original shape and dtype."""
    k, _ = matrix_shape(self.shape)
    w = packing.decode_packed(
      self.codes, self.scale[:, None, :], self.table, self.bits, k
    )
    return w.reshape(self.shape).astype(self.dtype)

  def __repr__(self) -> str:
    return (
      f'QArray(shape={self.shape}, dtype={np.dtype(self.dtype).name},'
      f' bits={self.bits}, blocks={tuple(self.scale.shape)})'
    )


# The array fields, in pytree order; checkpoints store one tensor for each.
DATA_FIELDS = ('codes', 'scale', 'alpha', 'table')

jax.tree_util.register_dataclass(
  QArray, data_fields=list(DATA_FIELDS), meta_fields=['bits', 'shape', 'dtype']
)


def is_qarray(x: object) -> bool:
  return isinstance(x, QArray)


def dequantize(tree: Any) -> Any:
  """Replaces every :class:`QArray` in ``tree`` by its decoded array.

  Args:
    tree: any pytree, e.g. ``params_q`` from :func:`pqjax.quantize`.

  Returns:
    ``tree`` with each QArray decoded to its original shape and dtype; other leaves
    as they are.
  """
  return jax.tree_util.tree_map(
    lambda x: x.dequantize() if isinstance(x, QArray) else x, tree, is_leaf=is_qarray
  )


def contains_qarray(tree: Any) -> bool:
  return any(
    isinstance(x, QArray) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray)
  )


def quantized_leaves(tree: Any) -> dict[str, QArray]:
  """The :class:`QArray` leaves of ``tree`` by path (``a/b/kernel``), in tree order."""
  return {
    path_str(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
    if isinstance(x, QArray)
  }
