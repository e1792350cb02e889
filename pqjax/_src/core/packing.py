"""Bit packing of codes, and decoding straight from packed codes.

Codes are packed along the first (K) axis so that the output-feature axis, which
Flax puts last, keeps its layout.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core.blocks import block_view
from pqjax._src.core.grid import qmax, zero_code
from pqjax._src.core.operator import take

# Widths packed as unsigned table indices; 8-bit codes are stored one signed int8 a
# byte. At 3 and 5 to 7 bits a unit is 8 codes in ``bits`` bytes, so a mix of
# widths chosen for a bit budget pays for each width what it stores.
PACKED_BITS = (2, 3, 4, 5, 6, 7)


def codes_per_unit(bits: int) -> tuple[int, int]:
  """``(codes, bytes)`` of one packing unit along K."""
  if bits in (2, 4):
    return 8 // bits, 1
  if bits in PACKED_BITS:
    return 8, bits
  return 1, 1


def unit_index(parts: list[jax.Array], j: int, bits: int) -> jax.Array:
  """Table index (int32) of code ``j`` of packed units, from their bytes ``parts``.

  A unit is a little-endian bit stream: code ``j`` holds bits ``[j * bits, (j + 1) *
  bits)``, which lie in one byte or two consecutive ones.
  """
  lo, shift = divmod(j * bits, 8)
  word = parts[lo].astype(jnp.int32)
  if shift + bits > 8:
    word = word | (parts[lo + 1].astype(jnp.int32) << 8)
  return (word >> shift) & ((1 << bits) - 1)


def packed_rows(k: int, bits: int) -> int:
  """Rows of the packed code array for ``k`` rows of codes."""
  codes, nbytes = codes_per_unit(bits)
  return -(-k // codes) * nbytes


def pack(q: jax.Array, bits: int, zero: int | None = None) -> jax.Array:
  """Packs signed codes ``(K, N)`` into bytes along K.

  2 and 4 bits: 4 and 2 codes a byte. 3 and 5 to 7 bits: 8 codes in ``bits`` bytes,
  a little-endian bit stream (code ``j`` of a unit at bit ``j * bits``). 8 bits: one
  code a byte, stored as int8. Packed codes are the unsigned table index ``q + zero``
  (``zero`` is the table index of level 0, default ``qmax``).
  """
  chex.assert_rank(q, 2)
  if bits not in PACKED_BITS:
    return q.astype(jnp.int8)
  zero = qmax(bits) if zero is None else zero
  k, n = q.shape
  codes, nbytes = codes_per_unit(bits)
  whole = k - k % codes
  if whole and whole < k:
    # Padding all the codes made XLA:CPU write them out first (2x the time of the
    # encoding at 3 bits); only the last, partial unit is padded.
    return jnp.concatenate(
      [pack(q[:whole], bits, zero), pack(q[whole:], bits, zero)], axis=0
    )
  u = (q + zero).astype(jnp.uint32)
  u = jnp.pad(u, ((0, -k % codes), (0, 0)))
  u = u.reshape(-1, codes, n)
  if codes * bits > 32:
    return _pack_stream(u, bits, nbytes)
  shifts = (jnp.arange(codes, dtype=jnp.uint32) * bits)[None, :, None]
  word = jnp.sum(u << shifts, axis=1, dtype=jnp.uint32)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  out = (word[:, None, :] >> byte_shifts) & 0xFF
  return out.reshape(-1, n).astype(jnp.uint8)


def _pack_stream(u: jax.Array, bits: int, nbytes: int) -> jax.Array:
  """Units ``(units, 8, N)`` of table indices as ``nbytes`` bytes each, row-major.

  A unit of 5 to 7 bits is wider than a 32-bit word: its first and last four codes
  are summed into two words, and each byte is cut from one of them or both. (Bytes
  shifted out of the codes one by one made XLA:CPU's encoding 5 times slower.)
  """
  units, codes, n = u.shape
  half = codes // 2
  shifts = (jnp.arange(half, dtype=jnp.uint32) * bits)[None, :, None]
  lo = jnp.sum(u[:, :half] << shifts, axis=1, dtype=jnp.uint32)
  hi = jnp.sum(u[:, half:] << shifts, axis=1, dtype=jnp.uint32)
  split = half * bits  # the stream's bit where ``hi`` starts
  out = []
  for i in range(nbytes):
    start = 8 * i
    byte = lo >> start if start < split else jnp.zeros_like(lo)
    if start + 8 > split:
      byte = byte | (hi << (split - start) if split >= start else hi >> (start - split))
    out.append(byte & 0xFF)
  return jnp.stack(out, axis=1).reshape(-1, n).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, k: int, zero: int | None = None) -> jax.Array:
  """Inverse of :func:`pack`: signed int32 codes of shape ``(k, N)``."""
  if bits not in PACKED_BITS:
    return packed.astype(jnp.int32)
  zero = qmax(bits) if zero is None else zero
  n = packed.shape[-1]
  codes, nbytes = codes_per_unit(bits)
  if codes * bits > 32:
    view = packed.reshape(-1, nbytes, n)
    parts = [view[:, b] for b in range(nbytes)]
    u = jnp.stack([unit_index(parts, j, bits) for j in range(codes)], axis=1)
    return u.reshape(-1, n)[:k] - zero
  b = packed.astype(jnp.uint32).reshape(-1, nbytes, n)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  word = jnp.sum(b << byte_shifts, axis=1, dtype=jnp.uint32)
  shifts = (jnp.arange(codes, dtype=jnp.uint32) * bits)[None, :, None]
  u = (word[:, None, :] >> shifts) & ((1 << bits) - 1)
  u = u.reshape(-1, n)[:k]
  return u.astype(jnp.int32) - zero


def byte_table(table: jax.Array, bits: int) -> jax.Array:
  """Decoded levels of the codes in every byte value, ``(8 // bits, 256)``: 2, 4 bits.

  Row ``j`` holds the level of the ``j``-th code of each byte, so decoding takes one
  lookup a byte instead of a shift, a mask and a lookup for each code.
  """
  # The symmetric grid leaves code 2 ** bits - 1 unused, one past its table; no
  # packed code holds it, so any level does.
  padded = jnp.concatenate([table, table[-1:]])
  byte = jnp.arange(256, dtype=jnp.int32)
  mask = (1 << bits) - 1
  # One 1-D lookup per position, stacked: XLA:CPU fuses this into faster code than a
  # single lookup with a 2-D index (measured: 1.5x on MiniLM's kernels).
  return jnp.stack([padded[(byte >> (j * bits)) & mask] for j in range(8 // bits)])


def decode_packed(
  packed: jax.Array, scale: jax.Array, table: jax.Array, bits: int, k: int
) -> jax.Array:
  """Float32 ``(k, N)`` from packed codes and ``(nk, 1, ncol)`` block scales.

  Blocks are ``ceil(k / nk)`` rows; the last one may be shorter.

  Equal to ``decode(unpack(packed, bits, k))`` bit for bit. At 2 and 4 bits it looks
  up whole bytes in :func:`byte_table`: XLA's CPU code is then close to the cost of
  writing the float32 result, which bounds the decoding speed.
  """
  n = packed.shape[-1]
  if bits in (2, 4):
    levels = take(byte_table(table, bits), packed.astype(jnp.int32), axis=1)
    levels = levels.transpose(1, 0, 2).reshape(-1, n)[:k]
  else:
    zero = zero_code(table.shape[0])
    levels = take(table, unpack(packed, bits, k, zero) + zero)
  nk = scale.shape[0]
  return (block_view(levels, nk) * scale).reshape(-1, n)[:k]


# uint8 block scales count 255ths of their column's scale.
SCALE_STEPS = 255
# Rounding a scale up to whole steps forgives this fraction of a step: float
# rounding of ``scale / column * 255`` is far below it (about 3e-5), and a scale
# already a whole number of steps, as in re-quantized weights, keeps it.
SCALE_SLACK = 2.0**-10


# What each uint8 count stands for: ``u / 255`` rounded once to float32 (255 is
# exactly 1). Looked up, not computed: XLA folds a multiply by a constant into the
# next one, and the column scale's 255th can be a subnormal float32, which XLA
# flushes to zero.
STEP_FRACTIONS = (np.arange(SCALE_STEPS + 1) / SCALE_STEPS).astype(np.float32)


def scale_values(scale: jax.Array, column_scale: jax.Array | None) -> jax.Array:
  """Float32 block scales from their storage: floats, or uint8 255ths of a column's.

  A uint8 count's fraction times its column's scale, one float32 multiply, so the
  encoder, every decoding path and a NumPy reference get the same values, and they
  underflow only where float32 scales would.
  """
  if column_scale is None:
    return scale.astype(jnp.float32)
  fractions = jnp.asarray(STEP_FRACTIONS).at[scale.astype(jnp.int32)]
  return fractions.get(mode='promise_in_bounds') * column_scale


def coded_scales(scale: jax.Array, column: jax.Array) -> jax.Array:
  """uint8 steps of block scales ``(..., nk, ncol)`` under their column's largest.

  ``column`` ``(..., 1, ncol)`` is 255 steps. Steps are rounded up (forgiving
  ``SCALE_SLACK``), so no block is clipped more than its scale asks; an all-zero
  block keeps 0 steps.
  """
  ratio = scale / jnp.where(column > 0, column, 1) * SCALE_STEPS
  u = jnp.clip(jnp.ceil(ratio - SCALE_SLACK), 0, SCALE_STEPS)
  return jnp.where(column > 0, u, 0).astype(jnp.uint8)


def packed_dtype(bits: int) -> np.dtype:
  """Storage dtype of packed codes."""
  return np.dtype(np.uint8) if bits in PACKED_BITS else np.dtype(np.int8)
