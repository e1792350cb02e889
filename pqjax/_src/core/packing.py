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

# Codes of 5 bits and more are stored one a byte: the saving of a denser packing is
# small next to the cost of decoding codes that straddle byte boundaries.
PACKED_BITS = (2, 3, 4)


def codes_per_unit(bits: int) -> tuple[int, int]:
  """``(codes, bytes)`` of one packing unit along K."""
  if bits == 3:
    return 8, 3
  if bits in (2, 4):
    return 8 // bits, 1
  return 1, 1


def packed_rows(k: int, bits: int) -> int:
  """Rows of the packed code array for ``k`` rows of codes."""
  codes, nbytes = codes_per_unit(bits)
  return -(-k // codes) * nbytes


def pack(q: jax.Array, bits: int, zero: int | None = None) -> jax.Array:
  """Packs signed codes ``(K, N)`` into bytes along K.

  2 and 4 bits: 4 and 2 codes a byte. 3 bits: 8 codes in 3 bytes (24 bits). 5 to 8
  bits: one code a byte, stored as int8. Packed codes are the unsigned table index
  ``q + zero`` (``zero`` is the table index of level 0, default ``qmax``).
  """
  chex.assert_rank(q, 2)
  if bits not in PACKED_BITS:
    return q.astype(jnp.int8)
  zero = qmax(bits) if zero is None else zero
  k, n = q.shape
  codes, nbytes = codes_per_unit(bits)
  u = (q + zero).astype(jnp.uint32)
  pad = -k % codes
  u = jnp.pad(u, ((0, pad), (0, 0)))
  u = u.reshape(-1, codes, n)
  shifts = (jnp.arange(codes, dtype=jnp.uint32) * bits)[None, :, None]
  word = jnp.sum(u << shifts, axis=1, dtype=jnp.uint32)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  out = (word[:, None, :] >> byte_shifts) & 0xFF
  return out.reshape(-1, n).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, k: int, zero: int | None = None) -> jax.Array:
  """Inverse of :func:`pack`: signed int32 codes of shape ``(k, N)``."""
  if bits not in PACKED_BITS:
    return packed.astype(jnp.int32)
  zero = qmax(bits) if zero is None else zero
  n = packed.shape[-1]
  codes, nbytes = codes_per_unit(bits)
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
    levels = jnp.take(byte_table(table, bits), packed.astype(jnp.int32), axis=1)
    levels = levels.transpose(1, 0, 2).reshape(-1, n)[:k]
  else:
    zero = zero_code(table.shape[0])
    levels = jnp.take(table, unpack(packed, bits, k, zero) + zero, axis=0)
  nk = scale.shape[0]
  return (block_view(levels, nk) * scale).reshape(-1, n)[:k]


def packed_dtype(bits: int) -> np.dtype:
  """Storage dtype of packed codes."""
  return np.dtype(np.uint8) if bits in PACKED_BITS else np.dtype(np.int8)
