"""``x @ W`` from a packed weight in the native CPU kernel, as a JAX primitive.

The primitive takes the weight's stored arrays as they are (codes, scales, column
scales, table) and ``x`` as float32 rows; it lowers to the ``pqjax_matmul`` XLA FFI
handler on CPU, and to the same product written in JAX (decode, then dot) on any
other backend, so an accelerator never sees the CPU kernel.

It is linear in ``x``: its derivative with respect to ``x`` is itself, and its
transpose is ``g @ W.T`` with ``W`` decoded (tied to ``g``, so a loop's backward pass
decodes it where it is used). Derivatives with respect to the scales or the table
follow the decoding formula. Under ``vmap`` a batch of ``x`` alone is folded into the
kernel's rows (the weight is read once); batched weights run one product each.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core
from jax.interpreters import ad, batching, mlir

from pqjax._src.core import packing
from pqjax._src.runtime.native import library
from pqjax._src.runtime.weights import tied

# The dtype decoded weights are rounded to before the product, in the kernel's words.
Rounding = Literal['none', 'bfloat16', 'float16']
ROUNDINGS: tuple[Rounding, ...] = ('none', 'bfloat16', 'float16')

packed_product_p = core.Primitive('pqjax_native_product')

# The operands' ranks without batch axes: x, codes, scale, column, table.
_RANKS = (2, 2, 2, 2, 1)


def packed_product(
  x: jax.Array,
  codes: jax.Array,
  scale: jax.Array,
  column: jax.Array | None,
  table: jax.Array,
  *,
  bits: int,
  k: int,
  rounding: Rounding = 'none',
  level: library.Level | None = None,
  threads: int = 0,
) -> jax.Array:
  """``x @ W`` in float32 for a ``(k, N)`` weight ``W`` stored as packed codes.

  Args:
    x: ``(M, k)`` float32.
    codes: ``(packed_rows(k, bits), N)`` packed codes, as a :class:`QArray` stores
      them.
    scale: ``(nk, ncol)`` block scales: float32, float16, or uint8 steps of
      ``column``.
    column: ``(1, ncol)`` float32 column scales of uint8 scales, else None.
    table: the ``2 ** bits`` or ``2 ** bits - 1`` levels.
    bits: code width, 2 to 8.
    k: rows of the weight.
    rounding: the dtype each decoded weight is rounded to first (the weight's dtype
      where it is narrower than float32), as decode-then-dot does.
    level: instruction set; None takes the library's choice.
    threads: threads at most; 0 lets the kernel choose.

  Returns:
    ``(M, N)`` float32: ``x @ W`` up to the order of float32 summation.
  """
  if column is None:
    column = jnp.zeros((1, 1), jnp.float32)
  level = level or library.status().level or 'portable'
  return packed_product_p.bind(
    x,
    codes,
    scale,
    column,
    table,
    bits=int(bits),
    k=int(k),
    rounding=ROUNDINGS.index(rounding),
    level=library.level_index(level),
    threads=int(threads),
  )


def _batch_shape(operands: Any, ranks: tuple[int, ...]) -> tuple[int, ...]:
  """The broadcast batch axes of operands of these base ranks (each axis B or 1)."""
  shapes = [op.shape[: op.ndim - r] for op, r in zip(operands, ranks)]
  return tuple(max(dims) for dims in zip(*shapes))


def _abstract_eval(x, codes, scale, column, table, **params):
  del params
  batch = _batch_shape((x, codes, scale, column, table), _RANKS)
  return jax.core.ShapedArray((*batch, x.shape[-2], codes.shape[-1]), jnp.float32)


def decoded(
  codes: jax.Array,
  scale: jax.Array,
  column: jax.Array,
  table: jax.Array,
  *,
  bits: int,
  k: int,
  rounding: int,
) -> jax.Array:
  """The float32 ``(*batch, k, N)`` weights the kernel multiplies, written in JAX."""
  if codes.ndim > 2:
    fn = functools.partial(decoded, bits=bits, k=k, rounding=rounding)
    weights = (codes, scale, column, table)
    shape = _batch_shape(weights, _RANKS[1:])
    flat = [
      jnp.broadcast_to(a, (*shape, *a.shape[a.ndim - r :])).reshape(
        -1, *a.shape[a.ndim - r :]
      )
      for a, r in zip(weights, _RANKS[1:])
    ]
    w = jax.vmap(fn)(*flat)
    return w.reshape(*shape, *w.shape[1:])
  values = packing.scale_values(scale, column if scale.dtype == jnp.uint8 else None)
  w = packing.decode_packed(codes, values[:, None, :], table, bits, k)
  if rounding:
    w = w.astype(jnp.bfloat16 if rounding == 1 else jnp.float16).astype(jnp.float32)
  return w


def _reference(x, codes, scale, column, table, *, bits, k, rounding, level, threads):
  """The product in JAX: decode, then a float32 dot (non-CPU backends, derivatives)."""
  del level, threads
  w = decoded(codes, scale, column, table, bits=bits, k=k, rounding=rounding)
  return jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)


@functools.cache
def _compiled(**params: int) -> Any:
  return jax.jit(functools.partial(packed_product_p.bind, **params))


def _impl(*args, **params):
  """Outside ``jit``: the same primitive, compiled alone."""
  return _compiled(**params)(*args)


def _batch(args, dims, **params):
  """Batch axes first, each operand with one (size 1 where it is not batched)."""
  moved = [
    jnp.expand_dims(a, 0) if d is None else jnp.moveaxis(a, d, 0)
    for a, d in zip(args, dims)
  ]
  return packed_product_p.bind(*moved, **params), 0


def _jvp(primals, tangents, **params):
  x, codes, scale, column, table = primals
  out = packed_product_p.bind(*primals, **params)
  t_x = tangents[0]
  t_out = None
  if type(t_x) is not ad.Zero:
    t_out = packed_product_p.bind(t_x, codes, scale, column, table, **params)
  # Scales, column scales and table: through the decoding formula.
  rest = [(i, t) for i, t in enumerate(tangents) if i > 1 and type(t) is not ad.Zero]
  if rest:
    index = [i for i, _ in rest]

    def of_weights(*ws: jax.Array) -> jax.Array:
      ops = list(primals)
      for i, w in zip(index, ws):
        ops[i] = w
      return _reference(*ops, **params)

    _, t_w = jax.jvp(of_weights, [primals[i] for i in index], [t for _, t in rest])
    t_out = t_w if t_out is None else t_out + t_w
  return out, (jnp.zeros_like(out) if t_out is None else t_out)


def _transpose(ct, x, codes, scale, column, table, **params):
  if any(ad.is_undefined_primal(a) for a in (codes, scale, column, table)):
    raise NotImplementedError('the native product is linear in x only')
  if type(ct) is ad.Zero:
    return [None] * 5
  bits, k, rounding = params['bits'], params['k'], params['rounding']
  # Tied to the cotangent: decoded where the backward product runs.
  scale = scale if scale.dtype == jnp.uint8 else tied(scale, ct)
  column = tied(column, ct)
  w = decoded(codes, scale, column, table, bits=bits, k=k, rounding=rounding)
  x_ct = jnp.matmul(ct, jnp.swapaxes(w, -1, -2), precision=jax.lax.Precision.HIGHEST)
  shape = x.aval.shape
  # Sum over batch axes along which x was broadcast.
  lead = x_ct.ndim - len(shape)
  x_ct = x_ct.sum(axis=tuple(range(lead))) if lead else x_ct
  axes = tuple(i for i, (a, b) in enumerate(zip(shape, x_ct.shape)) if a == 1 and b != 1)
  if axes:
    x_ct = x_ct.sum(axis=axes, keepdims=True)
  return [x_ct.astype(x.aval.dtype), None, None, None, None]


def _lowering_cpu(ctx, *args, bits, k, rounding, level, threads):
  return jax.ffi.ffi_lowering(library.TARGET)(
    ctx,
    *args,
    bits=np.int64(bits),
    k=np.int64(k),
    rounding=np.int64(rounding),
    level=np.int64(level),
    threads=np.int64(threads),
  )


packed_product_p.def_abstract_eval(_abstract_eval)
packed_product_p.def_impl(_impl)
batching.primitive_batchers[packed_product_p] = _batch
ad.primitive_jvps[packed_product_p] = _jvp
ad.primitive_transposes[packed_product_p] = _transpose
mlir.register_lowering(
  packed_product_p, mlir.lower_fun(_reference, multiple_results=False)
)
mlir.register_lowering(packed_product_p, _lowering_cpu, platform='cpu')
