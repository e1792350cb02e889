"""How a product (or row lookup) of a quantized weight is computed inside ``wrap``.

- A matrix product whose weight is used as stored (a ``(K, N)`` view contracted over
  K) with few rows reads the packed codes and decodes them inside the product: on
  CPU in the native kernel (:mod:`.native.product`), else in XLA
  (:mod:`.small_product`), or in :mod:`.pallas_matmul` where a kernel is asked for.
  No ``(K, N)`` float array is written.
- Any other product decodes the weight just before it, tied to its activation so
  XLA cannot decode every weight at the start of the program.
- A row lookup of an embedding table decodes only the rows it gathers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from pqjax._src.core import grid, operator, packing
from pqjax._src.core.qarray import QArray, add_delta
from pqjax._src.runtime import activations, pallas_matmul, small_product
from pqjax._src.runtime.binding import bind
from pqjax._src.runtime.native import library as native_library
from pqjax._src.runtime.native import product as native_product
from pqjax._src.runtime.weights import Adapter, Weight, tied_fields

PRODUCTS = frozenset({'dot_general', 'conv_general_dilated'})

# "auto": codes read inside the product for few rows (in the native kernel on CPU),
# decode then dot otherwise; "fused": codes read inside the product in XLA wherever
# the product allows it; "decode": always decode then multiply; "kernel": the Pallas
# kernel wherever the product allows it (interpreted on CPU: for tests); "native":
# the native CPU kernel wherever the product allows it.
ProductPath = Literal['auto', 'fused', 'decode', 'kernel', 'native']
PATHS: tuple[ProductPath, ...] = ('auto', 'fused', 'decode', 'kernel', 'native')
# Up to this many rows "auto" computes a product in the native kernel rather than
# decoding its weight for XLA's dot (benchmarks/kernels.py), and up to
# NATIVE_MAX_ROWS_8_BITS at 8 bits, whose 256 levels take a gather: 16 rows of MiniLM
# at 8 bits took 2.47x fp32's time natively (benchmarks/results/inference.md).
NATIVE_MAX_ROWS = 16
NATIVE_MAX_ROWS_8_BITS = 4
# Activation dtypes the native kernel takes (converted to float32 rows).
NATIVE_DTYPES = frozenset(np.dtype(t) for t in ('float32', 'bfloat16', 'float16'))
# Backends on which the Pallas kernel has been run and tested; "auto" uses it there.
KERNEL_BACKENDS: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  """How ``wrap`` computes the products of quantized weights.

  Attributes:
    path: which formulation computes a product (see :data:`ProductPath`).
    activations: activation quantization of the products' inputs, or None.
  """

  path: ProductPath = 'auto'
  activations: activations.ActivationConfig | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Product:
  """One product of a quantized weight in a wrapped program.

  Attributes:
    primitive: ``"dot_general"``, ``"conv_general_dilated"`` or ``"gather"``.
    weight: path of the quantized leaf it consumes, ``<argument index>/...`` for
      positional arguments and ``<keyword>/...`` for keyword ones.
    activation_shape: shape of the other operand (the activation, or the indices
      of a lookup).
    weight_shape: shape of the weight operand as the product sees it.
    path: how it is computed: ``"native"`` (codes read inside the product by the
      native CPU kernel), ``"fused"`` (codes read inside the product in XLA),
      ``"kernel"`` (the Pallas kernel), ``"decode"`` (decoded, then the product) or
      ``"rows"`` (a lookup decoding only the rows it gathers).
  """

  primitive: str
  weight: str
  activation_shape: tuple[int, ...]
  weight_shape: tuple[int, ...]
  path: str = 'decode'


def _aval(v: Any) -> Any:
  """The abstract value (shape, dtype) of a jaxpr variable."""
  return v.aval


def check_path(path: object) -> ProductPath:
  for p in PATHS:
    if path == p:
      return p
  raise ValueError(f'products must be one of {PATHS}, got {path!r}')


# --- matrix products ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _View:
  """A dot_general read as ``x2 (M, K) @ W (K, N)`` on the weight's stored view."""

  x_free: tuple[int, ...]  # axes of x kept in the output, in order
  x_contract: tuple[int, ...]  # axes of x contracted with K, in K's order
  weight_first: bool  # the weight is the first operand


def _stored_view(
  eqn: core.JaxprEqn, weight: Weight, operand: int, x: Any
) -> _View | None:
  """How the product contracts the weight, if it is ``x @ W`` on W's (K, N) view."""
  if eqn.primitive.name != 'dot_general' or not weight.casts_only or weight.q.layer_axes:
    return None
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  if lb or rb:
    return None
  w_contract, x_contract = (lc, rc) if operand == 0 else (rc, lc)
  ndim = len(weight.q.shape)
  # K is every axis but the last, or the last alone for an (N, K) transposed leaf.
  k_axes = (ndim - 1,) if weight.q.transposed else tuple(range(ndim - 1))
  if ndim < 2 or tuple(w_contract) != k_axes:
    return None
  free = tuple(i for i in range(x.ndim) if i not in x_contract)
  return _View(x_free=free, x_contract=tuple(x_contract), weight_first=operand == 0)


def _fused_product(
  view: _View, x: jax.Array, weight: Weight, out_dtype: Any, kernel: bool
) -> jax.Array:
  q = weight.q
  k, n = q.matrix_shape
  lead = tuple(x.shape[i] for i in view.x_free)
  x2 = jnp.transpose(x, (*view.x_free, *view.x_contract)).reshape(math.prod(lead), k)
  # Tied to the activation, as a decode is: the product cannot start early, nor
  # leave a loop whose step it is.
  q = tied_fields(q, x2)
  if kernel:
    y = pallas_matmul.packed_matmul(
      x2.astype(jnp.float32) if x2.dtype == jnp.float64 else x2,
      q.codes,
      q.scale,
      q.table,
      bits=q.bits,
      k=k,
      interpret=jax.default_backend() == 'cpu',
      out_dtype=jnp.float32,
    )
  else:
    y = small_product.packed_product(
      x2, q.codes, q.scale, q.table, bits=q.bits, k=k, dtype=weight.dtype or q.dtype
    )
  y = y.reshape(*lead, n).astype(out_dtype)
  if view.weight_first:
    y = jnp.moveaxis(y, -1, 0)
  return y


def _rounding(weight: Weight) -> native_product.Rounding | None:
  """The dtype the decoded weight is rounded to on its way to the product, if one.

  None where it passes through both bfloat16 and float16 (the kernel rounds once).
  """
  narrow = {np.dtype(d) for d in (weight.q.dtype, *weight.dtypes)} & {
    np.dtype(jnp.bfloat16),
    np.dtype(jnp.float16),
  }
  if len(narrow) > 1:
    return None
  if not narrow:
    return 'none'
  return 'bfloat16' if narrow == {np.dtype(jnp.bfloat16)} else 'float16'


def _native_fits(x: Any, weight: Weight) -> bool:
  return np.dtype(x.dtype) in NATIVE_DTYPES and _rounding(weight) is not None


def _on_a_mesh(weight: Weight) -> bool:
  """Whether the weight may be sharded: inside a mesh, or sharded in its type.

  XLA's partitioner runs the native kernel on whole operands, so it would gather a
  sharded weight's codes; the XLA paths keep them where they are. Shardings that
  only ``jit``'s inputs carry (no mesh in context) are not seen here.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if getattr(mesh, 'size', 1) > 1:
    return True
  spec = getattr(getattr(jax.typeof(weight.q.codes), 'sharding', None), 'spec', ())
  return any(axis is not None for axis in spec)


def _native(view: _View, x: jax.Array, weight: Weight, out_dtype: Any) -> jax.Array:
  q = weight.q
  k, n = q.matrix_shape
  lead = tuple(x.shape[i] for i in view.x_free)
  x2 = jnp.transpose(x, (*view.x_free, *view.x_contract)).reshape(math.prod(lead), k)
  rounding = _rounding(weight)
  assert rounding is not None
  y = native_product.packed_product(
    x2.astype(jnp.float32),
    q.codes,
    q.scale,
    q.column_scale,
    q.table,
    bits=q.bits,
    k=k,
    rounding=rounding,
  )
  y = y.reshape(*lead, n).astype(out_dtype)
  return jnp.moveaxis(y, -1, 0) if view.weight_first else y


# A decoded weight larger than this is decoded and multiplied in column blocks of
# about this size, each tied to the last: XLA:CPU then reuses one block's buffer
# instead of faulting in a large one on every call. The 768 x 50257 head of a
# GPT-2-shaped decoder and 128 rows: 2.40x the fp32 product's time decoded whole,
# 1.36x in blocks of 4096 columns (12 MB).
DECODE_BLOCK_BYTES = 16 << 20


def _blocked_decode(
  eqn: core.JaxprEqn, view: _View, x: jax.Array, weight: Weight
) -> jax.Array:
  """``x @ W`` decoding ``W`` one block of columns at a time."""
  q = weight.q
  k, n = q.matrix_shape
  lead = tuple(x.shape[i] for i in view.x_free)
  x2 = jnp.transpose(x, (*view.x_free, *view.x_contract)).reshape(math.prod(lead), k)
  width = max(128, DECODE_BLOCK_BYTES // (4 * k))
  ncol = q.scale.shape[-1]
  outs: list[jax.Array] = []
  tie = x2
  scales = q.block_scale()
  for start in range(0, n, width):
    stop = min(n, start + width)
    cols = slice(start, stop)
    block = QArray(
      codes=q.codes[:, cols],
      scale=scales[:, cols] if ncol > 1 else scales,
      alpha=q.alpha,
      table=q.table,
      bits=q.bits,
      shape=(k, stop - start),
      dtype=q.dtype,
    )
    w = dataclasses.replace(weight, q=block).decode(tie=tie)
    y = jax.lax.dot_general(
      x2,
      w,
      (((1,), (0,)), ((), ())),
      precision=eqn.params.get('precision'),
      preferred_element_type=eqn.params.get('preferred_element_type'),
    )
    outs.append(y)
    tie = y
  out_dtype = _aval(eqn.outvars[0]).dtype
  y = jnp.concatenate(outs, axis=-1).reshape(*lead, n).astype(out_dtype)
  return jnp.moveaxis(y, -1, 0) if view.weight_first else y


def _choose(
  options: Options, view: _View | None, rows: int, weight: Weight, x: Any
) -> str:
  if options.path == 'native':
    status = native_library.status()
    if not status.loaded:
      raise ValueError(f'products="native" cannot run: {status.reason}')
    if jax.default_backend() != 'cpu':
      raise ValueError(
        f'products="native" runs on CPU only; the default backend is'
        f' {jax.default_backend()!r}'
      )
    return 'native' if view is not None and _native_fits(x, weight) else 'decode'
  if view is None or options.path == 'decode':
    return 'decode'
  if options.path == 'kernel':
    # On CPU the kernel runs interpreted, for tests.
    backend = 'gpu' if jax.default_backend() == 'cpu' else None
    ok = pallas_matmul.supported(
      weight.q.bits, table_size=weight.q.table.shape[-1], backend=backend
    )
    return 'kernel' if ok else 'decode'
  if options.path == 'fused':
    return 'fused'
  if jax.default_backend() in KERNEL_BACKENDS:
    return 'kernel'
  if (
    jax.default_backend() == 'cpu'
    and rows <= (NATIVE_MAX_ROWS_8_BITS if weight.q.bits == 8 else NATIVE_MAX_ROWS)
    and _native_fits(x, weight)
    and not _on_a_mesh(weight)
    and native_library.available()
  ):
    return 'native'
  k, n = weight.q.matrix_shape
  if small_product.prefers_packed_product(rows, bits=weight.q.bits, k=k, n=n):
    return 'fused'
  return 'decode'


def _decoded(values: list[Any]) -> list[Any]:
  return [v.decode() if isinstance(v, Weight) else v for v in values]


def product(
  eqn: core.JaxprEqn, invals: list[Any], options: Options
) -> tuple[list[Any], list[Product]]:
  """A dot_general or convolution with a quantized weight operand: its outputs, and
  how its quantized operand was read (none where both operands are quantized)."""
  weights = [i for i in (0, 1) if isinstance(invals[i], Weight)]
  if len(weights) == 2:  # two weights: decode both, no activation to quantize
    return bind(eqn, _decoded(invals)), []
  w_index = weights[0]
  a_index = 1 - w_index
  weight: Weight = invals[w_index]
  x = activations.quantize_input(
    options.activations, eqn, invals[a_index], a_index, weight.alpha
  )
  view = _stored_view(eqn, weight, w_index, x)
  rows = math.prod(x.shape[i] for i in view.x_free) if view is not None else 0
  how = _choose(options, view, rows, weight, x)
  use = Product(
    primitive=eqn.primitive.name,
    weight=weight.path,
    activation_shape=tuple(x.shape),
    weight_shape=tuple(_aval(eqn.invars[w_index]).shape),
    path=how,
  )
  adapter = weight.adapter if view is not None else None
  if adapter is not None:
    # The base's product as a plain QArray's, the adapter's low-rank product beside
    # it. (Without a stored view the weight is decoded with the adapter added.)
    assert view is not None
    weight = dataclasses.replace(weight, adapter=None)
    k, n = weight.q.matrix_shape
    if how == 'decode' and 4 * k * n <= 2 * DECODE_BLOCK_BYTES:
      y = _redecoded_product(eqn, view, x, weight)
    else:
      y = _base_product(eqn, how, view, x, weight, invals, a_index, w_index)
    return [_add_adapter(eqn, view, x, adapter, y)], [use]
  return [_base_product(eqn, how, view, x, weight, invals, a_index, w_index)], [use]


def _base_product(
  eqn: core.JaxprEqn,
  how: str,
  view: _View | None,
  x: jax.Array,
  weight: Weight,
  invals: list[Any],
  a_index: int,
  w_index: int,
) -> jax.Array:
  """The product's output computed as ``how`` says."""
  if how == 'native':
    assert view is not None
    return _native(view, x, weight, _aval(eqn.outvars[0]).dtype)
  if how in ('fused', 'kernel'):
    assert view is not None
    out_dtype = _aval(eqn.outvars[0]).dtype
    return _fused_product(view, x, weight, out_dtype, kernel=how == 'kernel')
  k, n = weight.q.matrix_shape
  if view is not None and 4 * k * n > 2 * DECODE_BLOCK_BYTES:
    return _blocked_decode(eqn, view, x, weight)
  ops = list(invals)
  ops[a_index] = x
  ops[w_index] = weight.decode(tie=x)
  return bind(eqn, ops)[0]


def _redecoded_product(
  eqn: core.JaxprEqn, view: _View, x: jax.Array, weight: Weight
) -> jax.Array:
  """``x @ W`` on W's ``(K, N)`` view, W decoded; its backward product decodes W
  again, tied to the cotangent, so a training step holds one decoded weight at a
  time rather than all of them from the forward pass to the backward one.

  JAX keeps the decoded weight as the product's residual; ``jax.checkpoint`` did
  not help on XLA:CPU, which ran every recomputed decode (they depend only on the
  weights) at the start of the backward pass: six 1024 x 1024 layers at 2 x 64
  rows held 23.5 MB of temporaries either way.
  """
  lead = tuple(x.shape[i] for i in view.x_free)
  k, n = weight.q.matrix_shape
  x2 = jnp.transpose(x, (*view.x_free, *view.x_contract)).reshape(math.prod(lead), k)
  out_dtype = _aval(eqn.outvars[0]).dtype
  precision = eqn.params.get('precision')

  def matrix(q: QArray, tie: jax.Array) -> jax.Array:
    w = dataclasses.replace(weight, q=q).decode(tie=tie)
    return (jnp.swapaxes(w, -1, -2) if q.transposed else w).reshape(k, n)

  def forward(x2: jax.Array, q: QArray) -> jax.Array:
    w = matrix(q, x2)
    return jnp.matmul(x2, w, precision=precision, preferred_element_type=out_dtype)

  def backward(q: QArray, g: jax.Array) -> tuple[jax.Array, None]:
    w = matrix(q, g)
    dx = jnp.matmul(g, w.T, precision=precision, preferred_element_type=x2.dtype)
    return dx.astype(x2.dtype), None

  product = jax.custom_vjp(forward)
  product.defvjp(lambda x2, q: (forward(x2, q), q), backward)
  y = product(x2, weight.q).reshape(*lead, n)
  return jnp.moveaxis(y, -1, 0) if view.weight_first else y


def _add_adapter(
  eqn: core.JaxprEqn, view: _View, x: jax.Array, adapter: Adapter, y: jax.Array
) -> jax.Array:
  """``y + ((x @ a) @ b) * scale``: the adapter's term of ``x @ (W + a @ b * scale)``.

  Two thin products (``rank`` wide): no ``(K, N)`` array is written, and the
  gradients of ``a`` and ``b`` are thin too.
  """
  k, n = adapter.a.shape[-2], adapter.b.shape[-1]
  lead = tuple(x.shape[i] for i in view.x_free)
  x2 = jnp.transpose(x, (*view.x_free, *view.x_contract)).reshape(math.prod(lead), k)
  precision = eqn.params.get('precision')
  t = jnp.matmul(
    jnp.matmul(x2, adapter.a, precision=precision), adapter.b, precision=precision
  )
  t = (t * adapter.scale).reshape(*lead, n)
  if view.weight_first:
    t = jnp.moveaxis(t, -1, 0)
  return add_delta(y, t, y.dtype)


# --- row lookups --------------------------------------------------------------------


def _row_lookup(eqn: core.JaxprEqn, weight: Weight, indices: Any) -> bool:
  """Whether a gather takes whole rows of a 2-D weight: ``table[ids]``.

  A transposed weight's rows are columns of its codes: those are decoded alone too.
  """
  q = weight.q
  if not weight.casts_only or q.layer_axes or len(q.shape) != 2:
    return False
  dn = eqn.params['dimension_numbers']
  return (
    tuple(dn.collapsed_slice_dims) == (0,)
    and tuple(dn.start_index_map) == (0,)
    and not tuple(getattr(dn, 'operand_batching_dims', ()))
    and tuple(dn.offset_dims) == (indices.ndim - 1,)
    and tuple(eqn.params['slice_sizes']) == (1, q.shape[1])
    and indices.shape[-1] == 1
  )


def decode_rows(weight: Weight, rows: jax.Array) -> jax.Array:
  """Rows ``rows`` (int, in range) of the decoded weight: ``(*rows.shape, N)``.

  The same values as ``weight.decode()[rows]`` bit for bit: each code is found in
  its packed byte, looked up in the table and multiplied by its block scale.
  """
  q = weight.q
  k, n = q.matrix_shape
  if q.transposed:
    return _decode_columns(weight, rows)
  per_unit, unit_bytes = packing.codes_per_unit(q.bits)
  if q.bits in packing.PACKED_BITS:
    # Code j of a unit lies in its byte (j * bits) // 8, and the next one if it
    # crosses into it: two lookups, then a shift and a mask.
    unit, j = rows // per_unit, rows % per_unit
    lo, shift = (j * q.bits) // 8, (j * q.bits) % 8
    byte = lambda r: jnp.take(q.codes, unit * unit_bytes + r, axis=0).astype(jnp.int32)
    word = byte(lo)
    if unit_bytes > 1:
      word = word | (byte(jnp.minimum(lo + 1, unit_bytes - 1)) << 8)
    index = (word >> shift[..., None]) & ((1 << q.bits) - 1)
  else:
    signed = jnp.take(q.codes, rows, axis=0).astype(jnp.int32)
    index = signed + grid.zero_code(q.table.shape[-1])
  levels = operator.take(q.table, index)
  nk, ncol = q.scale.shape
  block = jnp.take(q.scale, jnp.minimum(rows // q.block_rows, nk - 1), axis=0)
  # The rows' scales alone: uint8 steps are turned into values after the lookup.
  column = None if q.column_scale is None else q.column_scale[0]
  block = packing.scale_values(block, column)
  w = (levels * (block if ncol > 1 else block[..., :1])).astype(q.dtype)
  if weight.adapter is not None:
    ad = weight.adapter
    w = add_delta(w, jnp.take(ad.a, rows, axis=0) @ ad.b * ad.scale, q.dtype)
  for op in weight.ops:  # dtype conversions only
    w = op(w)
  return w


def _decode_columns(weight: Weight, rows: jax.Array) -> jax.Array:
  """Rows of a transposed weight (columns of its codes), as ``decode_rows``."""
  q = weight.q
  k, n = q.matrix_shape
  cols = rows.reshape(-1)
  scale = q.block_scale()
  if scale.shape[-1] > 1:
    scale = jnp.take(scale, cols, axis=1)
  codes = jnp.take(q.codes, cols, axis=1)
  w = packing.decode_packed(codes, scale[:, None, :], q.table, q.bits, k)
  w = w.T.reshape(*rows.shape, k).astype(q.dtype)
  if weight.adapter is not None:
    # The leaf's rows are columns of the (K, N) view: rows of ``(a @ b).T``.
    ad = weight.adapter
    w = add_delta(w, jnp.take(ad.b.T, rows, axis=0) @ ad.a.T * ad.scale, q.dtype)
  for op in weight.ops:  # dtype conversions only
    w = op(w)
  return w


def gather(
  eqn: core.JaxprEqn, invals: list[Any], options: Options
) -> tuple[list[Any], list[Product]]:
  """A gather from a quantized weight: rows decoded alone where it takes whole rows.
  Its outputs, and how the weight was read (none for a weight used as indices)."""
  weight, indices = invals[0], invals[1]
  if not isinstance(weight, Weight) or isinstance(indices, Weight):
    return bind(eqn, _decoded(invals)), []
  rows = _row_lookup(eqn, weight, indices) and options.path != 'decode'
  use = Product(
    primitive='gather',
    weight=weight.path,
    activation_shape=tuple(indices.shape),
    weight_shape=tuple(weight.q.shape),
    path='rows' if rows else 'decode',
  )
  if not rows:
    return bind(eqn, [weight.decode(tie=indices), indices]), [use]
  ids = indices[..., 0].astype(jnp.int32)
  size = weight.q.shape[0]
  valid = (ids >= 0) & (ids < size)
  out = decode_rows(weight, jnp.clip(ids, 0, size - 1))
  mode = eqn.params.get('mode')
  if 'FILL' in str(mode):
    fill = eqn.params.get('fill_value')
    fill = jnp.nan if fill is None else fill
    out = jnp.where(valid[..., None], out, jnp.asarray(fill, out.dtype))
  return [out], [use]
