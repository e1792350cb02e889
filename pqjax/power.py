"""The power quantization operator: encode, decode, lookup tables, bit packing.

A weight block with absolute maximum ``m`` is mapped into the power domain with an
exponent ``a > 0``::

    q = sign(w) * round(qmax * (|w| / m) ** a)          qmax = 2 ** (bits - 1) - 1
    w_hat = sign(q) * m * (|q| / qmax) ** (1 / a)

Every function here works on a 3-D block view ``(nk, G, ncol)`` of a 2-D ``(K, N)``
weight: ``nk`` blocks of ``G`` consecutive rows along K, and ``ncol`` columns that are
either 1 (one scale shared by all columns) or N (one scale per column). The block
scales have shape ``(nk, 1, ncol)``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 8
# Codes of 5 bits and more are stored one a byte: the saving of a denser packing is
# small next to the cost of decoding codes that straddle byte boundaries.
PACKED_BITS = (2, 3, 4)


def qmax(bits: int) -> int:
  """Largest code magnitude of the symmetric sign-magnitude grid."""
  return 2 ** (bits - 1) - 1


def block_view(w: jax.Array, nk: int) -> jax.Array:
  """Views a 2-D ``(K, N)`` array as ``(nk, K // nk, N)`` blocks of rows."""
  k, n = w.shape
  return w.reshape(nk, k // nk, n)


def block_absmax(w3: jax.Array, ncol: int) -> jax.Array:
  """Absolute maximum of each block, shape ``(nk, 1, ncol)``, in float32."""
  a = jnp.abs(w3.astype(jnp.float32))
  m = jnp.max(a, axis=1, keepdims=True)
  if ncol == 1:
    m = jnp.max(m, axis=2, keepdims=True)
  return m


def normalise(w3: jax.Array, scale: jax.Array) -> jax.Array:
  """``|w| / m`` in [0, 1]; an all-zero block gives zeros, never NaN."""
  safe = jnp.where(scale > 0, scale, 1.0)
  return jnp.abs(w3.astype(jnp.float32)) / safe


def encode_magnitude(x: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """Code magnitudes ``round(qmax * x ** alpha)`` for normalised ``x`` in [0, 1]."""
  qm = qmax(bits)
  y = qm * jnp.power(x, alpha)
  return jnp.clip(jnp.round(y), 0, qm).astype(jnp.int32)


def decode_magnitude(k: jax.Array, alpha: jax.Array, bits: int, offset: float = 0.0
                     ) -> jax.Array:
  """Normalised magnitudes ``((k + offset) / qmax) ** (1 / alpha)`` of codes ``k``.

  ``offset=-0.5`` gives the rounding threshold below code ``k``.
  """
  qm = qmax(bits)
  return jnp.power((k.astype(jnp.float32) + offset) / qm, 1.0 / alpha)


# Up to this many bits, codes are found by comparing x with the qmax rounding
# thresholds ((k - 1/2) / qmax) ** (1 / alpha): a few compares cost far less than a
# pow per weight. They agree with the formula except within float32 rounding of a
# threshold, where the formula itself is a tie.
THRESHOLD_BITS = 5


def encode_by_thresholds(x: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """Code magnitudes of normalised ``x``: the count of thresholds ``x`` reaches."""
  t = decode_magnitude(jnp.arange(1, qmax(bits) + 1), alpha, bits, offset=-0.5)
  k = jnp.zeros(x.shape, jnp.int32)
  for j in range(qmax(bits)):
    k = k + (x >= t[j]).astype(jnp.int32)
  return k


def encode(w3: jax.Array, scale: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """Signed codes in [-qmax, qmax] (int32) of a block view ``w3``."""
  x = normalise(w3, scale)
  if bits <= THRESHOLD_BITS:
    k = encode_by_thresholds(x, alpha, bits)
  else:
    k = encode_magnitude(x, alpha, bits)
  return jnp.where(w3 < 0, -k, k)


def decode_table(alpha: float, bits: int) -> np.ndarray:
  """Decoded value of each offset code ``u = q + qmax``, u in [0, 2 qmax].

  Computed on the host in float64 and rounded once to float32, so every level is
  the correctly rounded value of the formula, whatever the backend's ``pow``.
  """
  qm = qmax(bits)
  k = np.arange(-qm, qm + 1, dtype=np.float64)
  a = float(np.float32(alpha))
  return (np.sign(k) * (np.abs(k) / qm) ** (1.0 / a)).astype(np.float32)


def decode(q: jax.Array, scale: jax.Array, table: jax.Array, bits: int) -> jax.Array:
  """Float32 block view from signed codes: one table lookup and one multiply."""
  return jnp.take(table, q + qmax(bits), axis=0) * scale


def block_error(x: jax.Array, log_x: jax.Array, scale: jax.Array, alpha: jax.Array,
                bits: int) -> jax.Array:
  """``||w - w_hat||^2`` of one layer from its normalised magnitudes and scales.

  ``log_x`` is ``log(x)``, computed once by the caller: the search evaluates this
  many times, and ``exp(a log x)`` costs half of ``pow(x, a)``.
  """
  qm = qmax(bits)
  k = jnp.clip(jnp.round(qm * jnp.exp(alpha * log_x)), 0, qm)
  xhat = jnp.exp(jnp.log(k / qm) / alpha)
  per_block = jnp.sum(jnp.square(x - xhat), axis=1, keepdims=True)
  return jnp.sum(per_block * jnp.square(scale))


# --- bit packing -------------------------------------------------------------------
# Codes are packed along the first (K) axis so that the output-feature axis, which
# Flax puts last, keeps its layout.


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


def pack(q: jax.Array, bits: int) -> jax.Array:
  """Packs signed codes ``(K, N)`` into bytes along K.

  2 and 4 bits: 4 and 2 codes a byte. 3 bits: 8 codes in 3 bytes (24 bits). 5 to 8
  bits: one code a byte, stored as int8. Packed codes are offset by qmax (unsigned).
  """
  chex.assert_rank(q, 2)
  if bits not in PACKED_BITS:
    return q.astype(jnp.int8)
  k, n = q.shape
  codes, nbytes = codes_per_unit(bits)
  u = (q + qmax(bits)).astype(jnp.uint32)
  pad = -k % codes
  u = jnp.pad(u, ((0, pad), (0, 0)))
  u = u.reshape(-1, codes, n)
  shifts = (jnp.arange(codes, dtype=jnp.uint32) * bits)[None, :, None]
  word = jnp.sum(u << shifts, axis=1, dtype=jnp.uint32)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  out = (word[:, None, :] >> byte_shifts) & 0xFF
  return out.reshape(-1, n).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, k: int) -> jax.Array:
  """Inverse of :func:`pack`: signed int32 codes of shape ``(k, N)``."""
  if bits not in PACKED_BITS:
    return packed.astype(jnp.int32)
  n = packed.shape[-1]
  codes, nbytes = codes_per_unit(bits)
  b = packed.astype(jnp.uint32).reshape(-1, nbytes, n)
  byte_shifts = (jnp.arange(nbytes, dtype=jnp.uint32) * 8)[None, :, None]
  word = jnp.sum(b << byte_shifts, axis=1, dtype=jnp.uint32)
  shifts = (jnp.arange(codes, dtype=jnp.uint32) * bits)[None, :, None]
  u = (word[:, None, :] >> shifts) & ((1 << bits) - 1)
  u = u.reshape(-1, n)[:k]
  return u.astype(jnp.int32) - qmax(bits)


def byte_table(table: jax.Array, bits: int) -> jax.Array:
  """Decoded levels of the codes in every byte value, ``(8 // bits, 256)``: 2, 4 bits.

  Row ``j`` holds the level of the ``j``-th code of each byte, so decoding takes one
  lookup a byte instead of a shift, a mask and a lookup for each code.
  """
  # Codes reach 2 ** bits - 1 = 2 qmax + 1, one past the table; no packed code holds
  # it, so any level does.
  padded = jnp.concatenate([table, table[-1:]])
  byte = jnp.arange(256, dtype=jnp.int32)
  mask = (1 << bits) - 1
  # One 1-D lookup per position, stacked: XLA:CPU fuses this into faster code than a
  # single lookup with a 2-D index (measured: 1.5x on MiniLM's kernels).
  return jnp.stack([padded[(byte >> (j * bits)) & mask] for j in range(8 // bits)])


def decode_packed(packed: jax.Array, scale: jax.Array, table: jax.Array, bits: int,
                  k: int) -> jax.Array:
  """Float32 ``(k, N)`` from packed codes and ``(nk, 1, ncol)`` block scales.

  Equal to ``decode(unpack(packed, bits, k))`` bit for bit. At 2 and 4 bits it looks
  up whole bytes in :func:`byte_table`: XLA's CPU code is then close to the cost of
  writing the float32 result, which bounds the decoding speed.
  """
  n = packed.shape[-1]
  if bits in (2, 4):
    levels = jnp.take(byte_table(table, bits), packed.astype(jnp.int32), axis=1)
    levels = levels.transpose(1, 0, 2).reshape(-1, n)[:k]
  else:
    levels = jnp.take(table, unpack(packed, bits, k) + qmax(bits), axis=0)
  nk = scale.shape[0]
  return (levels.reshape(nk, k // nk, n) * scale).reshape(k, n)


def packed_dtype(bits: int) -> np.dtype:
  """Storage dtype of packed codes."""
  return np.dtype(np.uint8) if bits in PACKED_BITS else np.dtype(np.int8)
