"""``x @ W`` for a few rows of ``x`` and a packed weight, decoding inside the product.

The generation step of a served model multiplies one row (or a handful) with every
weight. Decoding a whole ``(K, N)`` weight first writes ``K * N * 4`` bytes, reads them
back, and on XLA:CPU pays for fresh pages on each call (a 4096 x 4096 weight: 67 MB of
temp, about 20 ms, against 2-4 ms for the float32 product). Here the packed codes are
read and decoded where they are multiplied, and only small buffers are written.

Storage (the ``QArray`` format). The weight is viewed as ``(K, N)``; ``codes`` holds
``packed_rows(K, bits)`` rows packed along K: at 2 and 4 bits 4 and 2 codes a byte
(code ``j`` of a byte at bit ``j * bits``), at 3 and 5 to 7 bits 8 codes in ``bits``
bytes (a little-endian bit stream, code ``j`` at bit ``j * bits``), at 8 bits one
signed int8 code ``q`` a byte. Packed codes at 2 to 7 bits are table indices; an int8
code ``q`` is index ``q + len(table) // 2``.
``scale`` is ``(nk, ncol)``: ``nk`` blocks of ``ceil(K / nk)`` rows (the last may be
shorter) and one scale for all columns (``ncol = 1``) or one per column.

Two forms, both reading the codes once:

- One row: at 2 to 4 bits each level is picked from the table by a tree of selects on
  the bits of its code (``2 ** bits - 1`` selects), at 5 to 8 bits gathered from it;
  it is multiplied by its block scale and by ``x``, and the products of 32 or more
  consecutive rows of K are summed in the same XLA loop. The partial sums (about
  1 MB) are then reduced.
- Several rows: a loop over blocks of K decodes one block at a time into buffers of a
  few MB and multiplies them with XLA's dot, so each weight is decoded once for all
  rows.

The decoded weights are those of decode-then-dot bit for bit (the table level times the
block scale in float32, rounded to the weight's dtype), so the result is
``x @ W.astype(dtype)`` up to the order of the float32 summation. The closed form
``sign(q) * (|q| / d) ** (1 / alpha)`` would need no table, but in float32 it is off
the table's correctly rounded levels by up to 6 ulps at 4 bits and 35 at 8 bits.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pqjax._src.core import packing
from pqjax._src.core.grid import MAX_BITS, MIN_BITS
from pqjax._src.core.operator import take
from pqjax._src.core.packing import codes_per_unit, packed_rows

# Up to this width a level may be chosen by selects on the code's bits instead of a
# table gather. On one product alone, 2 ** bits - 1 vector selects a code beat the
# gather, which XLA:CPU emits as scalar loads (4096 x 4096, 4 bits, one row: 4.2
# against 6.4 ms); in a whole model they do not: a GPT-2-small-shaped decoder step
# (benchmarks/gpt2.py, 4 bits, one row) took 1.96x the fp32 step with selects and
# 1.18x with gathers, side by side, and compiled in 65 s and 960 MB against 4.5 s
# and 140 MB. So levels are gathered at every width.
SELECT_BITS = 0

# Up to this many rows `packed_product` is preferred to decode-then-dot, and up to
# LARGE_MAX_ROWS for weights of LARGE_WEIGHT_BYTES or more as float32
# (benchmarks/small_product.py; see `prefers_packed_product`).
MAX_ROWS = 16
LARGE_MAX_ROWS = 64
LARGE_WEIGHT_BYTES = 32 << 20
# Below this many bytes as float32, a weight met by 2 rows or more is decoded, then
# multiplied (see `prefers_packed_product`).
SMALL_WEIGHT_BYTES = 4 << 20
# Bytes of the partial sums of the one-row form and of the decoded block of the
# several-row form: small enough to stay in cache, large enough that the loop's
# per-step cost stays negligible.
PARTIAL_BYTES = 1 << 20
BLOCK_BYTES = 2 << 20
# Rows of K decoded in one step of the several-row form, at least.
MIN_BLOCK_ROWS = 32
# Packing units summed in one step of the one-row form, at most: more units make the
# partial sums smaller but the compiled loop longer (the GPT-2 step above: 16 units
# 1.18x fp32, 32 units 1.32x, 8 units 1.42x).
MAX_UNROLL = 16
# Rows of K summed in one step of the one-row form, at least.
MIN_STEP_ROWS = 16


def prefers_packed_product(rows: int, *, bits: int, k: int, n: int) -> bool:
  """Whether :func:`packed_product` should replace decode-then-dot for this product.

  Measured on XLA:CPU (``benchmarks/small_product.py``, 2 to 8 bits): up to 16 rows
  the packed product is faster than decode-then-dot, or within the noise of it, for
  every weight shape measured (768 x 3072 to 768 x 50257). Past 16 rows
  decode-then-dot wins on small weights (768 x 3072 at 32 rows: 0.8x the packed
  product's time) but not on weights whose float32 copy takes 32 MB or more: glibc
  hands such buffers back to the system, so decode-then-dot faults its temp in again
  on every call (4096 x 4096 at 64 rows: 2.4x the packed product's time). Weights
  under SMALL_WEIGHT_BYTES are decoded from 2 rows on: their decode is cheap next to
  the packed product's per-row work (MiniLM, 384 x 384 and 384 x 1536 weights, whole
  model at 2, 4, 8 and 16 tokens: the packed products took 1.24-1.31x the time of
  decode-then-dot; at one token 0.27x). The packed product never writes the float
  weight.

  Args:
    rows: rows of ``x`` (the product of its leading dimensions).
    bits: code width, 2 to 8; the crossover measured does not depend on it.
    k: contracted size (rows of the weight).
    n: output features (columns of the weight).

  Returns:
    ``True`` where the packed product is preferred.
  """
  del bits
  size = k * n * 4
  if rows == 1:
    return True
  if size < SMALL_WEIGHT_BYTES:
    return False
  limit = LARGE_MAX_ROWS if size >= LARGE_WEIGHT_BYTES else MAX_ROWS
  return 2 <= rows <= limit


def packed_product(
  x: jax.Array,
  codes: jax.Array,
  scale: jax.Array,
  table: jax.Array,
  *,
  bits: int,
  k: int,
  dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """``x @ W`` where ``W`` is the ``(k, N)`` weight stored as packed codes.

  Args:
    x: ``(..., k)`` floating activations, a few rows (see
      :func:`prefers_packed_product`).
    codes: ``(packed_rows(k, bits), N)`` packed codes, uint8 at 2 to 7 bits, int8 at 8.
    scale: ``(nk, ncol)`` block scales, ``ncol`` 1 or N.
    table: the level of each table index, ``2 ** bits`` (full grid) or
      ``2 ** bits - 1`` (symmetric grid) entries.
    bits: code width, 2 to 8.
    k: rows of the weight.
    dtype: the weight's dtype: decoded weights are rounded to it, as
      ``W.astype(dtype)`` would.

  Returns:
    ``(..., N)`` in the dtype of ``x @ W.astype(dtype)``, accumulated in float32.
  """
  n = _check(x, codes, scale, table, bits, k)
  out_dtype = jnp.result_type(x.dtype, dtype)
  lead = x.shape[:-1]
  rows = math.prod(lead)
  if rows == 0 or k == 0:
    return jnp.zeros((*lead, n), out_dtype)
  c, nbytes = codes_per_unit(bits)
  units = codes.shape[0] // nbytes
  # Codes past row k (packing pads the last unit) meet zeros of x.
  xs = x.reshape(rows, k).astype(jnp.float32)
  xs = jnp.pad(xs, ((0, 0), (0, units * c - k))).reshape(rows, units, c)
  weight = _CodesOperand(
    jnp.asarray(codes),
    jnp.asarray(scale, jnp.float32),
    jnp.asarray(table, jnp.float32),
    bits,
    k,
    np.dtype(dtype),
  )
  if rows == 1:
    y = _one_row(xs[0], weight)[None]
  else:
    y = _blocked(xs, weight)
  return y.reshape(*lead, n).astype(out_dtype)


class _CodesOperand:
  """The packed weight's arrays and static facts, passed to the two forms."""

  def __init__(
    self,
    codes: jax.Array,
    scale: jax.Array,
    table: jax.Array,
    bits: int,
    k: int,
    dtype: np.dtype,
  ):
    self.codes, self.scale, self.table = codes, scale, table
    self.bits, self.k, self.dtype = bits, k, dtype
    self.c, self.nbytes = codes_per_unit(bits)
    self.units = codes.shape[0] // self.nbytes
    self.n = codes.shape[1]
    self.block_rows = -(-k // scale.shape[0])

  def unit_bytes(self, start: int, stop: int, step: int) -> list[jax.Array]:
    """Byte ``i`` of units ``start:stop:step``, for each ``i``: ``(units, N)`` each."""
    view = self.codes.reshape(self.units, self.nbytes, self.n)
    return [view[start:stop:step, i] for i in range(self.nbytes)]

  def decoded(self, levels: jax.Array, row: jax.Array) -> jax.Array:
    """Weights from levels and their row indices in K (broadcast against levels)."""
    nk = self.scale.shape[0]
    if nk == 1:
      s = self.scale[0]
    else:
      block = jnp.minimum(row // self.block_rows, nk - 1)
      s = take(self.scale, block[..., 0], mode='promise_in_bounds')
    w = levels * s
    if self.dtype != np.float32:
      w = w.astype(self.dtype).astype(jnp.float32)
    return w


def _check(
  x: jax.Array, codes: jax.Array, scale: jax.Array, table: jax.Array, bits: int, k: int
) -> int:
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f'bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}')
  if codes.ndim != 2 or codes.shape[0] != packed_rows(k, bits):
    raise ValueError(f'codes of shape {codes.shape} do not hold {k} rows at {bits} bits')
  n = codes.shape[1]
  if x.shape[-1:] != (k,):
    raise ValueError(f'x of shape {x.shape} does not end in k={k}')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'x must be floating, got {x.dtype}')
  if (
    scale.ndim != 2
    or scale.shape[1] not in (1, n)
    or not 1 <= scale.shape[0] <= max(k, 1)
  ):
    raise ValueError(f'scale of shape {scale.shape} does not tile a ({k}, {n}) weight')
  if table.shape not in ((2**bits,), (2**bits - 1,)):
    raise ValueError(f'table of shape {table.shape} is not a {bits}-bit table')
  return n


def _levels(parts: list[jax.Array], j: int, table: jax.Array, bits: int) -> jax.Array:
  """Table level of code ``j`` of each unit.

  ``parts``: the unit's bytes (one int8 code at 8 bits).
  """
  if bits > SELECT_BITS:
    if bits in packing.PACKED_BITS:
      index = packing.unit_index(parts, j, bits)
    else:
      index = parts[0].astype(jnp.int32) + table.shape[0] // 2
    return take(table, index, mode='promise_in_bounds')
  # The symmetric grid's table is one short: its last index is never stored.
  levels = [table[min(i, table.shape[0] - 1)] for i in range(2**bits)]
  for b in range(bits):
    p = j * bits + b
    bit = (parts[p // 8] & np.uint8(1 << (p % 8))) != 0
    levels = [
      jnp.where(bit, levels[2 * i + 1], levels[2 * i]) for i in range(len(levels) // 2)
    ]
  return levels[0]


def _one_row(xs: jax.Array, w: _CodesOperand) -> jax.Array:
  """``(N,)`` product of one row, ``xs`` ``(units, c)`` in float32."""
  # Enough units a step that the partial sums stay near PARTIAL_BYTES.
  unroll = max(-(-MIN_STEP_ROWS // w.c), -(-w.units * w.n * 4 // PARTIAL_BYTES))
  unroll = min(unroll, MAX_UNROLL, w.units)
  steps = w.units // unroll
  y = _partial_sums(xs, w, 0, steps, unroll).sum(axis=0)
  tail = w.units - steps * unroll
  if tail:
    y = y + _partial_sums(xs, w, steps * unroll, 1, tail)[0]
  return y


def _partial_sums(
  xs: jax.Array, w: _CodesOperand, start: int, steps: int, unroll: int
) -> jax.Array:
  """``(steps, N)``: row ``i`` sums units ``start + i * unroll`` to ``+ unroll``."""
  stop = start + steps * unroll
  step = lax.broadcasted_iota(jnp.int32, (steps, 1), 0)
  first_row = (start + step * unroll) * w.c
  acc: Any = None
  for r in range(unroll):
    parts = w.unit_bytes(start + r, stop, unroll)
    for j in range(w.c):
      weights = w.decoded(_levels(parts, j, w.table, w.bits), first_row + (r * w.c + j))
      term = xs[start + r : stop : unroll, j][:, None] * weights
      acc = term if acc is None else acc + term
  # XLA:CPU hands multiplies, adds and reductions to YNNPACK but not selects: a sum
  # ending in a multiply-add is taken there and the selected levels are written to
  # memory first. A select at the root keeps decoding and summing in one XLA loop. It
  # changes nothing: a NaN in x makes the sum NaN anyway.
  first_x = xs[start:stop:unroll, :1]
  return jnp.where(jnp.isnan(first_x), jnp.nan, acc)


def _blocked(xs: jax.Array, w: _CodesOperand) -> jax.Array:
  """``(rows, N)`` product, ``xs`` ``(rows, units, c)`` in float32."""
  rows = xs.shape[0]
  xt = xs.transpose(2, 0, 1)  # (c, rows, units): a block's x is one slice per code.
  # XLA decodes the c positions of a block before their products: c blocks alive.
  # Wide weights get more bytes: products over a few rows of K are slow.
  block = max(BLOCK_BYTES // (w.c * w.n * 4), -(-MIN_BLOCK_ROWS // w.c))
  block = min(block, w.units)
  steps = w.units // block
  # Byte i of every unit, (units, N) each. Slicing a block of such strided rows inside
  # the loop made XLA's decoding loop 2.5x slower (3 bits) than slicing planes copied
  # out once, which cost the size of the codes.
  planes = w.unit_bytes(0, w.units, 1)

  def product(acc: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
    parts = [lax.dynamic_slice_in_dim(p, start, size, axis=0) for p in planes]
    xb = lax.dynamic_slice_in_dim(xt, start, size, axis=2)
    row = (start + lax.broadcasted_iota(jnp.int32, (size, 1), 0)) * w.c
    # One product per code position: decoding the c positions into one array would
    # interleave them, and XLA branches on every element of such a concatenation.
    for j in range(w.c):
      weights = w.decoded(_levels(parts, j, w.table, w.bits), row + j)
      acc = acc + jnp.dot(xb[j], weights, preferred_element_type=jnp.float32)
    return acc

  acc = jnp.zeros((rows, w.n), jnp.float32)
  if steps:
    # The first block outside the loop: the carry then has the products' sharding
    # (on an Explicit mesh a loop's carry may not change it).
    acc = product(acc, 0, block)
    acc = lax.fori_loop(1, steps, lambda i, a: product(a, i * block, block), acc)
  if w.units % block:
    acc = product(acc, steps * block, w.units % block)
  return acc
