"""The quantized array: a frozen dataclass pytree that decodes itself."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.typing import DTypeLike

from pqjax._src.core import packing
from pqjax._src.core.blocks import matrix_shape
from pqjax._src.core.grid import GRIDS, num_levels
from pqjax._src.core.leaves import PyTree, is_array, path_str


@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
  """A weight stored as packed power-domain codes.

  The leaf's last axis is N and the axes after its ``layer_axes`` leading ones
  form K: each layer is a ``(K, N)`` matrix with its own scales, exponent and table.
  A ``transposed`` leaf holds its output features on its second-to-last axis, as
  PyTorch stores a Linear weight ``(out, in)``: each layer is ``(N, K)`` and its
  ``(K, N)`` transpose is what the codes and scales lay out, so a product that
  contracts the leaf's last axis (``x @ W.T``) reads the codes as it reads a Flax
  kernel's.

  Attributes:
    codes: packed codes along K: ``(*layers, packed_rows(K, bits), N)``, uint8 for
      2 to 4 bits (table indices), int8 for 5 to 8 bits (signed codes).
    scale: block scales ``(*layers, nk, ncol)``: ``nk`` blocks of ``ceil(K / nk)``
      rows (the last may be shorter), ``ncol`` is 1 (one scale for all columns) or
      N (one per column). float32 or float16 values, or uint8 255ths of
      ``column_scale`` (:meth:`block_scale` gives the values either way).
    alpha: float32 ``(*layers)`` (a scalar without layer axes): the exponent of
      the power map.
    table: float32 ``(*layers, levels)``: the decoded level of each code in order,
      ``2 ** bits - 1`` levels for the paper's symmetric grid, ``2 ** bits`` for
      the full grid. Decoding is a lookup and a multiply by the block scale.
    column_scale: with uint8 scales, float32 ``(*layers, 1, ncol)``: each
      column's largest block scale, a block's being ``scale / 255`` of it (rounded
      up); None with float scales.
    bits: code width, 2 to 8.
    shape: shape of the original leaf, layer axes included.
    dtype: dtype of the original leaf, which decoding gives back.
    layer_axes: how many leading axes of ``shape`` index stacked layers.
    transposed: whether each layer is stored ``(N, K)`` (output axis first): it
      then has exactly two axes.
  """

  codes: jax.Array
  scale: jax.Array
  alpha: jax.Array
  table: jax.Array
  bits: int
  shape: tuple[int, ...]
  dtype: np.dtype
  layer_axes: int = 0
  column_scale: jax.Array | None = None
  transposed: bool = False

  def __post_init__(self) -> None:
    # Pytree utilities rebuild nodes with placeholder leaves; validate arrays only.
    if not (is_array(self.codes) and is_array(self.scale)):
      return
    # Decoding multiplies float levels and casts to ``dtype``: a bool or integer one
    # would silently give no weights back.
    if not jax.dtypes.issubdtype(np.dtype(self.dtype), np.floating):
      raise ValueError(f'dtype {np.dtype(self.dtype).name} is not a floating dtype')
    for name in ('alpha', 'table', 'column_scale'):
      x = getattr(self, name)
      if is_array(x) and np.dtype(x.dtype) != np.float32:
        raise ValueError(f'{name} dtype {np.dtype(x.dtype).name} is not float32')
    layers = self.layers
    if not 0 <= self.layer_axes <= len(self.shape) - 1 and self.shape:
      raise ValueError(
        f'layer_axes {self.layer_axes} leaves no matrix in a leaf of shape {self.shape}'
      )
    if self.transposed and len(self.shape) - self.layer_axes != 2:
      raise ValueError(
        f'a transposed leaf has two axes per layer (out, in), got shape {self.shape}'
        f' with layer_axes {self.layer_axes}'
      )
    k, n = self.matrix_shape
    want = (*layers, packing.packed_rows(k, self.bits), n)
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
    scale = tuple(self.scale.shape)
    if len(scale) != len(layers) + 2 or scale[: len(layers)] != layers:
      raise ValueError(f'scale must be {(*layers, "nk", "ncol")}, got {scale}')
    nk, ncol = scale[-2:]
    if nk < 1 or nk > max(k, 1) or -(-k // -(-k // nk)) != nk or ncol not in (1, n):
      raise ValueError(f'scale shape {scale} does not tile a ({k}, {n}) matrix')
    coded = np.dtype(self.scale.dtype) == np.dtype(np.uint8)
    if np.dtype(self.scale.dtype) not in SCALE_DTYPES:
      raise ValueError(f'scale dtype {self.scale.dtype} is not one of {SCALE_DTYPES}')
    if coded != (self.column_scale is not None):
      raise ValueError('uint8 scales need a column_scale, and only they have one')
    column = (*layers, 1, ncol)
    got = getattr(self.column_scale, 'shape', column)
    if is_array(self.column_scale) and tuple(got) != column:
      raise ValueError(f'column_scale must have shape {column}, got {tuple(got)}')
    if is_array(self.alpha) and tuple(self.alpha.shape) != layers:
      raise ValueError(f'alpha must have shape {layers}, got {tuple(self.alpha.shape)}')
    sizes = [(*layers, num_levels(self.bits, g)) for g in GRIDS]
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
  def layers(self) -> tuple[int, ...]:
    """The stacked-layer axes, ``shape[:layer_axes]``; ``()`` for a single matrix."""
    return tuple(self.shape[: self.layer_axes])

  @property
  def nbytes(self) -> int:
    """Bytes held by the codes, scales, exponent and decoding table."""
    return sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in (self.codes, self.scale, self.alpha, self.table, self.column_scale)
      if x is not None
    )

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """The ``(K, N)`` view of one layer, on which codes and scales are laid out."""
    if self.transposed:
      return self.shape[-1], self.shape[-2]
    return matrix_shape(tuple(self.shape[self.layer_axes :]))

  @property
  def block_rows(self) -> int:
    """Rows of K that share one scale (the last block may have fewer)."""
    return -(-self.matrix_shape[0] // self.scale.shape[-2])

  @property
  def grid(self) -> str:
    """``"symmetric"`` (the paper's ``2 ** bits - 1`` levels) or ``"full"``."""
    return 'full' if self.table.shape[-1] == 2**self.bits else 'symmetric'

  @property
  def bits_per_weight(self) -> float:
    """Stored bits per weight, counting scales, the exponent and the table."""
    return 8 * self.nbytes / max(self.size, 1)

  def block_scale(self) -> jax.Array:
    """The block scales' values, float32 ``(*layers, nk, ncol)``."""
    return packing.scale_values(self.scale, self.column_scale)

  def dequantize(self) -> jax.Array:
    """Decodes to an array of the original shape and dtype."""
    k, n = self.matrix_shape
    count = math.prod(self.layers)

    def one(codes: jax.Array, scale: jax.Array, table: jax.Array) -> jax.Array:
      return packing.decode_packed(codes, scale[:, None, :], table, self.bits, k)

    scale = self.block_scale()
    if not self.layer_axes:
      w = one(self.codes, scale, self.table)
    else:
      flat = lambda x: x.reshape(count, *x.shape[self.layer_axes :])
      w = jax.vmap(one)(flat(self.codes), flat(scale), flat(self.table))
    if self.transposed:
      w = w.swapaxes(-1, -2)
    return w.reshape(self.shape).astype(self.dtype)

  def swapped(self) -> QArray:
    """The same codes read as the leaf's transpose over its last two axes.

    A ``(K, N)`` leaf becomes its ``(N, K)`` transpose and back, with nothing
    copied: ``swapped().dequantize()`` is ``dequantize().swapaxes(-1, -2)``.
    """
    if len(self.shape) - self.layer_axes != 2:
      raise ValueError(f'only a leaf of two axes per layer swaps, got {self.shape}')
    shape = (*self.layers, self.shape[-1], self.shape[-2])
    return dataclasses.replace(self, shape=shape, transposed=not self.transposed)

  def __repr__(self) -> str:
    layers = f', layer_axes={self.layer_axes}' if self.layer_axes else ''
    layers += ', transposed=True' if self.transposed else ''
    return (
      f'QArray(shape={self.shape}, dtype={np.dtype(self.dtype).name},'
      f' bits={self.bits}, blocks={tuple(self.scale.shape)}{layers})'
    )


def stored_nbytes(
  shape: tuple[int, ...],
  layer_axes: int,
  bits: int,
  levels: int,
  nk: int,
  ncol: int,
  scale_dtype: np.dtype,
) -> int:
  """Bytes a :class:`QArray` of these parameters holds (its ``nbytes``), unbuilt.

  ``levels`` is the length of its table and ``nk`` by ``ncol`` its scale blocks per
  layer, stored as ``scale_dtype``.
  """
  layers = math.prod(shape[:layer_axes])
  k, n = matrix_shape(tuple(shape[layer_axes:]))
  codes = packing.packed_rows(k, bits) * n
  scales = nk * ncol * np.dtype(scale_dtype).itemsize
  if np.dtype(scale_dtype) == np.dtype(np.uint8):
    scales += 4 * ncol  # the float32 column scale
  return layers * (codes + scales + 4 + 4 * levels)


# The array fields, in pytree order; checkpoints store one tensor for each that is
# not None.
DATA_FIELDS = ('codes', 'scale', 'alpha', 'table', 'column_scale')

# How block scales may be stored.
SCALE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8))

jax.tree_util.register_dataclass(
  QArray,
  data_fields=list(DATA_FIELDS),
  meta_fields=['bits', 'shape', 'dtype', 'layer_axes', 'transposed'],
)


def is_qarray(x: object) -> bool:
  return isinstance(x, QArray)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraArray:
  """A frozen :class:`QArray` with a trainable low-rank adapter (LoRA).

  The weight it stands for is ``W + a @ b * scale`` on the base's ``(K, N)`` view
  (:attr:`QArray.matrix_shape`), one adapter per layer of a leaf with layer axes;
  for a ``transposed`` base the leaf is that view's transpose. ``pqjax.wrap``
  computes a product with it as ``x @ W + ((x @ a) @ b) * scale``, the base read
  by the same paths as a plain QArray's; :meth:`dequantize` adds the adapter to
  the decoded weight. Built by :func:`pqjax.lora.init`.

  Attributes:
    base: the quantized weight, never updated by training.
    a: ``(*layers, K, rank)`` floating.
    b: ``(*layers, rank, N)`` floating.
    scale: the adapter's multiplier, ``alpha / rank`` (static: a Python float).
  """

  base: QArray
  a: jax.Array
  b: jax.Array
  scale: float

  def __post_init__(self) -> None:
    # Pytree utilities rebuild nodes with placeholder leaves, and split/merge/mask
    # hold halves of a node (None or bools in place of fields): check full ones.
    if not (
      isinstance(self.base, QArray)
      and is_array(self.base.codes)
      and is_array(self.a)
      and is_array(self.b)
    ):
      return
    check_adapter(self.base, self.a, self.b)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.base.shape

  @property
  def dtype(self) -> np.dtype:
    return self.base.dtype

  @property
  def ndim(self) -> int:
    return self.base.ndim

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])

  def delta(self) -> jax.Array:
    """``a @ b * scale`` laid out as the leaf, in the adapters' dtype."""
    return adapter_delta(self.base, self.a, self.b, self.scale)

  def dequantize(self) -> jax.Array:
    """The decoded base plus the adapter, in the base's shape and dtype.

    The frozen half of :func:`pqjax.lora.split` (no ``a`` nor ``b``) decodes as its
    base.
    """
    if self.a is None and self.b is None:
      return self.base.dequantize()
    return add_delta(self.base.dequantize(), self.delta(), self.base.dtype)

  def __repr__(self) -> str:
    # split() and mask() hold halves of a node: a and b may be None or bools.
    rank = self.rank if is_array(self.a) and self.a.ndim else None
    return f'LoraArray(base={self.base!r}, rank={rank}, scale={self.scale})'


jax.tree_util.register_dataclass(
  LoraArray, data_fields=['base', 'a', 'b'], meta_fields=['scale']
)


def check_adapter(base: QArray, a: jax.Array, b: jax.Array) -> None:
  """Raises ValueError unless ``a`` and ``b`` are an adapter of ``base``'s shape."""
  k, n = base.matrix_shape
  layers = base.layers
  rank = a.shape[-1] if a.ndim else 0
  want_a, want_b = (*layers, k, rank), (*layers, rank, n)
  if rank < 1 or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
    stack = f'layers {layers} of ' if layers else ''
    raise ValueError(
      f'adapter shapes a {tuple(a.shape)}, b {tuple(b.shape)} do not fit a weight of'
      f' {stack}(K, N) = ({k}, {n}): want a {(*layers, k, "rank")} and b'
      f' {(*layers, "rank", n)} with rank >= 1'
    )
  for name, x in (('a', a), ('b', b)):
    if not jax.dtypes.issubdtype(np.dtype(x.dtype), np.floating):
      raise ValueError(f'adapter {name} dtype {np.dtype(x.dtype).name} is not floating')


def adapter_delta(base: QArray, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``a @ b * scale`` on ``base``'s ``(K, N)`` view, laid out as the leaf."""
  d = jax.numpy.matmul(a, b) * scale
  if base.transposed:
    return d.swapaxes(-1, -2)
  return d.reshape(base.shape)


def add_delta(w: jax.Array, delta: jax.Array, dtype: DTypeLike) -> jax.Array:
  """``w + delta`` summed in the wider of their dtypes, then cast to ``dtype``."""
  wide = jax.numpy.promote_types(w.dtype, delta.dtype)
  return (w.astype(wide) + delta.astype(wide)).astype(dtype)


def is_lora(x: object) -> bool:
  return isinstance(x, LoraArray)


def is_stored(x: object) -> bool:
  """A quantized leaf as ``wrap`` takes it: a :class:`QArray` or :class:`LoraArray`."""
  return isinstance(x, QArray | LoraArray)


def dequantize(tree: PyTree) -> PyTree:
  """Replaces every :class:`QArray` in ``tree`` by its decoded array.

  Args:
    tree: any pytree, e.g. ``params_q`` from :func:`pqjax.quantize`, or a tree with
      LoRA adapters from :func:`pqjax.lora.init`.

  Returns:
    ``tree`` with each QArray decoded to its original shape and dtype, each
    :class:`LoraArray` to its decoded base plus ``a @ b * scale`` (in the base's
    dtype); other leaves as they are.
  """
  return jax.tree_util.tree_map(
    lambda x: x.dequantize() if is_stored(x) else x, tree, is_leaf=is_stored
  )


def contains_qarray(tree: PyTree) -> bool:
  return any(
    isinstance(x, QArray) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray)
  )


def quantized_leaves(tree: PyTree) -> dict[str, QArray]:
  """The :class:`QArray` leaves of ``tree`` by path (``a/b/kernel``), in tree order."""
  return {
    path_str(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
    if isinstance(x, QArray)
  }
