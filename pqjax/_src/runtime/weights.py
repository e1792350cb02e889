"""A quantized weight inside a program, not yet decoded: where it is used decides how.

While ``wrap`` re-evaluates a model's program, every quantized leaf is a
:class:`Weight`: its :class:`QArray`, its path, and the layout operations applied to
it so far (reshape, transpose, dtype conversion...), which are replayed on the
decoded array when it is needed. Keeping the weight encoded until its use lets a
product read the codes directly, and lets each decode be tied to the activation it
meets, so that XLA cannot schedule every decode at the start of the program.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core import operator, packing
from pqjax._src.core.operator import explicit_mesh
from pqjax._src.core.qarray import DATA_FIELDS, QArray, adapter_delta, add_delta

# A layout operation recorded on a weight: a function of the decoded array.
Op = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Adapter:
  """A LoRA adapter on a weight's ``(K, N)`` view: ``a @ b * scale`` is added to it.

  Attributes:
    a: ``(*layers, K, rank)``.
    b: ``(*layers, rank, N)``.
    scale: the adapter's multiplier.
  """

  a: jax.Array
  b: jax.Array
  scale: float


@dataclasses.dataclass(frozen=True)
class Weight:
  """A quantized weight flowing through a program.

  Attributes:
    q: the stored weight.
    path: the leaf's path, for messages and for the list of products.
    ops: layout operations applied since the leaf, in order.
    casts_only: whether every op only converts the dtype (the weight's values and
      layout are the QArray's), which the fused products need.
    dtype: the dtype after the ops.
    dtypes: the dtype after each op, in order.
    adapter: a LoRA adapter added to the stored weight (before the ops), or None.
      Its arrays are laid out on the ``(K, N)`` view, which reading the codes
      transposed (:meth:`QArray.swapped`) does not change.
  """

  q: QArray
  path: str
  ops: tuple[Op, ...] = ()
  casts_only: bool = True
  dtype: Any = None
  dtypes: tuple[Any, ...] = ()
  adapter: Adapter | None = None

  @property
  def alpha(self) -> jax.Array:
    return self.q.alpha

  def then(self, op: Op, *, cast: bool, dtype: Any) -> Weight:
    """This weight with one more layout operation."""
    return dataclasses.replace(
      self,
      ops=(*self.ops, op),
      casts_only=self.casts_only and cast,
      dtype=dtype,
      dtypes=(*self.dtypes, dtype),
    )

  def decode(self, tie: jax.Array | None = None) -> jax.Array:
    """The decoded array, after the recorded ops.

    ``tie`` (an activation) makes the decode depend on that value, numerically a
    no-op, so the decode cannot run before the activation exists: XLA then keeps
    only the weights in use alive, instead of decoding all of them up front.
    """
    q = self.q if tie is None else tied_fields(self.q, tie)
    w = q.dequantize()
    if self.adapter is not None:
      ad = self.adapter
      w = add_delta(w, adapter_delta(self.q, ad.a, ad.b, ad.scale), self.q.dtype)
    for op in self.ops:
      w = op(w)
    return w


def tied_fields(q: QArray, tie: jax.Array) -> QArray:
  """``q`` with its codes and scales depending on ``tie`` (see :func:`tied`).

  The scales are tied as their float32 values, which a decode then reads; the
  codes too: a decode whose lookup of codes depended on nothing that changes would
  be hoisted out of a loop (a generation loop's while), every weight's levels then
  held decoded for the whole loop.
  """
  return dataclasses.replace(
    q, codes=tied(q.codes, tie), scale=tied(q.block_scale(), tie), column_scale=None
  )


def tied(value: jax.Array, tie: jax.Array) -> jax.Array:
  """``value``, plus a zero computed from ``tie``: the same numbers, a new dependency.

  ``value`` may be floating or integer (codes): the zero is converted to its dtype.

  The zero is ``t * 0`` for a finite element ``t`` of ``tie`` and ``0`` otherwise, so
  an Inf or NaN activation does not reach the weight. XLA does not fold ``t * 0``
  (it is NaN for infinite ``t``), so the dependency survives optimisation.
  """
  if not math.prod(tie.shape):
    return value
  t = _one_element(jax.lax.stop_gradient(tie))
  if not jnp.issubdtype(t.dtype, jnp.inexact):
    # XLA folds an integer's ``t * 0`` to 0 (the dependency would be lost, and a
    # lookup's decode hoisted out of a loop); a float's it keeps.
    t = t.astype(jnp.float32)
  zero = jnp.where(jnp.isfinite(t), t * 0, jnp.zeros_like(t))
  return value + zero.astype(value.dtype)


def _one_element(x: jax.Array) -> jax.Array:
  """An element of ``x`` as a scalar; on an Explicit mesh, the largest of a corner
  of one element a shard (JAX cannot slice a sharded axis to one element)."""
  mesh = explicit_mesh(x)
  if mesh is None:
    return x.reshape(-1)[0]
  spec = operator.spec(x)
  corner = [math.prod(mesh.shape[a] for a in operator.axis_names(e)) for e in spec]
  return jnp.max(jax.lax.slice(x, (0,) * x.ndim, tuple(corner)))


# --- passing weights across program boundaries (scan, while, cond, remat) ------------


@dataclasses.dataclass(frozen=True)
class Packed:
  """How to rebuild a :class:`Weight` from its array fields on the other side."""

  weight: Weight
  # Fields are sliced along a leading layer axis (scan ``xs``): one layer a step.
  sliced: bool = False


def _present(q: QArray) -> list[str]:
  return [f for f in DATA_FIELDS if getattr(q, f) is not None]


def fields(w: Weight) -> list[jax.Array]:
  """The weight's arrays: the QArray's fields, then its adapter's ``a`` and ``b``."""
  adapter = [] if w.adapter is None else [w.adapter.a, w.adapter.b]
  return [getattr(w.q, f) for f in _present(w.q)] + adapter


def rebuild(packed: Packed, arrays: list[jax.Array]) -> Weight:
  """The weight of ``packed`` with its fields replaced by ``arrays``."""
  q = packed.weight.q
  sliced = packed.sliced
  present = _present(q)
  adapter = packed.weight.adapter
  if adapter is not None:
    a, b = arrays[len(present) :]
    adapter = dataclasses.replace(adapter, a=a, b=b)
  q = QArray(
    **dict(zip(present, arrays)),
    bits=q.bits,
    shape=tuple(q.shape[1:]) if sliced else q.shape,
    dtype=q.dtype,
    layer_axes=q.layer_axes - 1 if sliced else q.layer_axes,
    transposed=q.transposed,
  )
  return dataclasses.replace(packed.weight, q=q, adapter=adapter)


def as_layers(q: QArray, length: int) -> QArray | None:
  """``q`` as ``length`` stacked layers along its first axis, where its storage allows.

  A leaf quantized whole (``layer_axes=0``) can still be sliced one layer at a time
  when each layer's rows are whole packing units and whole scale blocks; its
  exponent and table are then repeated for each layer. None where they are not.
  """
  if q.layer_axes:
    return q if q.shape[0] == length else None
  if len(q.shape) < 3 or q.shape[0] != length or q.transposed:
    return None
  k, n = q.matrix_shape
  rows = k // length
  codes_per_unit, unit_bytes = packing.codes_per_unit(q.bits)
  nk, ncol = q.scale.shape
  if rows % codes_per_unit or (nk > 1 and (nk % length or q.block_rows * nk != k)):
    return None
  packed_rows = rows // codes_per_unit * unit_bytes
  codes = q.codes.reshape(length, packed_rows, n)
  if nk == 1:
    scale = jnp.broadcast_to(q.scale, (length, 1, ncol))
  else:
    scale = q.scale.reshape(length, nk // length, ncol)
  column = q.column_scale
  return QArray(
    codes=codes,
    scale=scale,
    column_scale=None if column is None else jnp.broadcast_to(column, (length, 1, ncol)),
    alpha=jnp.broadcast_to(q.alpha, (length,)),
    table=jnp.broadcast_to(q.table, (length, q.table.shape[-1])),
    bits=q.bits,
    shape=tuple(q.shape),
    dtype=np.dtype(q.dtype),
    layer_axes=1,
  )
