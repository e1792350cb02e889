"""The power quantization operator: encode, decode, lookup tables, bit packing.

A weight block with scale ``s`` (its absolute maximum ``m``, or ``c * m`` when
clipping) is mapped into the power domain with an exponent ``a > 0``. The paper's
symmetric grid::

    q = sign(w) * round(qmax * (|w| / s) ** a)          qmax = 2 ** (bits - 1) - 1
    w_hat = sign(q) * s * (|q| / qmax) ** (1 / a)

The full grid uses all ``2 ** bits`` codes (see :func:`steps`) and gives each
weight its nearest level.

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


GRIDS = ('symmetric', 'full')


def check_grid(grid: object) -> str:
  if grid not in GRIDS:
    raise ValueError(f'grid must be "symmetric" or "full", got {grid!r}')
  return str(grid)


def qmax(bits: int) -> int:
  """Largest code magnitude of the symmetric sign-magnitude grid."""
  return 2 ** (bits - 1) - 1


def steps(bits: int, grid: str) -> tuple[int, int]:
  """``(d_neg, d_pos)``: each side's levels are ``(k / d) ** (1 / a)``, k = 0..d.

  The symmetric grid is the paper's: ``2 qmax + 1`` levels, one code unused. The
  full grid uses all ``2 ** bits`` codes: the negative side gets the extra level,
  so signed codes span the two's-complement range ``[-2 ** (bits - 1), qmax]``.
  """
  qm = qmax(bits)
  return (qm + 1, qm) if grid == 'full' else (qm, qm)


def num_levels(bits: int, grid: str) -> int:
  return sum(steps(bits, grid)) + 1


def zero_code(table_size: int) -> int:
  """Table index of the level 0, which signed code 0 decodes to."""
  return table_size // 2


def block_view(w: jax.Array, nk: int) -> jax.Array:
  """Views a 2-D ``(K, N)`` array as ``(nk, ceil(K / nk), N)`` blocks of rows.

  When ``nk`` does not divide K, the last block is padded with zeros, which every
  grid decodes exactly and which therefore add no error.
  """
  k, n = w.shape
  rows = -(-k // nk)
  if rows * nk != k:
    w = jnp.pad(w, ((0, rows * nk - k), (0, 0)))
  return w.reshape(nk, rows, n)


def block_absmax(w3: jax.Array, ncol: int) -> jax.Array:
  """Absolute maximum of each block, shape ``(nk, 1, ncol)``, in float32."""
  a = jnp.abs(w3.astype(jnp.float32))
  m = jnp.max(a, axis=1, keepdims=True)
  if ncol == 1:
    m = jnp.max(m, axis=2, keepdims=True)
  return m


# XLA:CPU divides by multiplying with the reciprocal, and flushes a subnormal
# reciprocal to zero: scales above 2 ** 126 would zero their block. Both sides are
# scaled down by a power of two first, which is exact.
_BIG = 2.0 ** 64


def divide(w: jax.Array, scale: jax.Array) -> jax.Array:
  """``w / scale`` in float32; a zero scale gives zeros, never NaN."""
  w = w.astype(jnp.float32)
  big = scale > _BIG
  w = jnp.where(big, w * (1 / _BIG), w)
  scale = jnp.where(big, scale * (1 / _BIG), jnp.where(scale > 0, scale, 1.0))
  return w / scale


def level_magnitude(k: jax.Array, alpha: jax.Array, d: jax.Array | int) -> jax.Array:
  """Normalised level ``(k / d) ** (1 / alpha)`` of code magnitude ``k``."""
  return jnp.power(k.astype(jnp.float32) / d, 1.0 / alpha)


def magnitude_code(x: jax.Array, alpha: jax.Array, d: jax.Array | int, grid: str
                   ) -> jax.Array:
  """Code magnitude in [0, d] of normalised magnitudes ``x`` (int32).

  The symmetric grid rounds in the power domain, ``round(d x ** a)``, as the paper
  does. The full grid takes the nearest level in the weight domain, which is what
  the reconstruction error measures.
  """
  y = d * jnp.power(x, alpha)
  if grid != 'full':
    return jnp.clip(jnp.round(y), 0, d).astype(jnp.int32)
  k = jnp.clip(jnp.floor(y), 0, d - 1).astype(jnp.int32)
  lo = level_magnitude(k, alpha, d)
  hi = level_magnitude(k + 1, alpha, d)
  return k + (x + x >= lo + hi).astype(jnp.int32)


def encode_magnitude(x: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
  """Code magnitudes ``round(qmax * x ** alpha)`` for normalised ``x`` in [0, 1]."""
  return magnitude_code(x, alpha, qmax(bits), 'symmetric')


def decode_magnitude(k: jax.Array, alpha: jax.Array, bits: int, offset: float = 0.0
                     ) -> jax.Array:
  """Normalised magnitudes ``((k + offset) / qmax) ** (1 / alpha)`` of codes ``k``.

  ``offset=-0.5`` gives the rounding threshold below code ``k``.
  """
  qm = qmax(bits)
  return jnp.power((k.astype(jnp.float32) + offset) / qm, 1.0 / alpha)


def side_thresholds(alpha: jax.Array, d: int, grid: str) -> jax.Array:
  """Magnitudes from which codes ``1..d`` of one side are chosen, ascending."""
  k = jnp.arange(1, d + 1)
  if grid == 'full':
    return (level_magnitude(k - 1, alpha, d) + level_magnitude(k, alpha, d)) / 2
  return jnp.power((k - 0.5) / d, 1.0 / alpha)


def thresholds(alpha: jax.Array, bits: int, grid: str) -> jax.Array:
  """Signed thresholds between consecutive levels, ascending: ``num_levels - 1``."""
  d_neg, d_pos = steps(bits, grid)
  return jnp.concatenate([-side_thresholds(alpha, d_neg, grid)[::-1],
                          side_thresholds(alpha, d_pos, grid)])


# Up to this many bits, codes are found by comparing x with the thresholds between
# levels: a few compares cost far less than a pow per weight. They agree with the
# formula except within float32 rounding of a threshold, where the formula itself is
# a tie.
THRESHOLD_BITS = 5


def encode(w3: jax.Array, scale: jax.Array, alpha: jax.Array, bits: int,
           grid: str = 'symmetric') -> jax.Array:
  """Signed codes (int32) of a block view ``w3``: ``[-d_neg, d_pos]``.

  ``scale`` is the block scale the levels are multiplied by: the block's absmax, or
  less when clipping, in which case magnitudes beyond it take the largest level.
  """
  x = divide(w3, scale)
  if bits <= THRESHOLD_BITS:
    t = thresholds(alpha, bits, grid)
    u = jnp.zeros(x.shape, jnp.int32)
    for j in range(t.shape[0]):
      u = u + (x >= t[j]).astype(jnp.int32)
    return u - steps(bits, grid)[0]
  d_neg, d_pos = steps(bits, grid)
  neg = x < 0
  d = jnp.where(neg, d_neg, d_pos) if d_neg != d_pos else d_pos
  k = magnitude_code(jnp.minimum(jnp.abs(x), 1.0), alpha, d, grid)
  return jnp.where(neg, -k, k)


def decode_table(alpha: float, bits: int, grid: str = 'symmetric') -> np.ndarray:
  """Decoded level of each code, in code order: ``table[q + zero_code]``.

  Computed on the host in float64 and rounded once to float32, so every level is
  the correctly rounded value of the formula, whatever the backend's ``pow``.
  """
  d_neg, d_pos = steps(bits, grid)
  k = np.arange(-d_neg, d_pos + 1, dtype=np.float64)
  d = np.where(k < 0, d_neg, d_pos)
  a = float(np.float32(alpha))
  return (np.sign(k) * (np.abs(k) / d) ** (1.0 / a)).astype(np.float32)


def decode(q: jax.Array, scale: jax.Array, table: jax.Array) -> jax.Array:
  """Float32 block view from signed codes: one table lookup and one multiply."""
  return jnp.take(table, q + zero_code(table.shape[0]), axis=0) * scale


def reconstruct(x: jax.Array, log_x: jax.Array, d: jax.Array, alpha: jax.Array,
                clip: jax.Array, grid: str) -> jax.Array:
  """Decoded normalised magnitudes of ``x = |w| / absmax`` (search form).

  ``log_x`` is ``log(x)``, computed once by the caller (the search evaluates this
  many times, and ``exp(a log x)`` costs half of ``pow(x, a)``); ``d`` is the code
  range of each weight's side of the grid. The levels are ``clip`` times the
  grid's: magnitudes above ``clip`` take the largest.
  """
  y = d * jnp.exp(alpha * (log_x - jnp.log(clip)))
  level = lambda k: clip * jnp.exp(jnp.log(k / d) / alpha)
  if grid == 'full':
    k = jnp.clip(jnp.floor(y), 0, d - 1)
    lo, hi = level(k), level(k + 1)
    return jnp.where(x + x >= lo + hi, hi, lo)
  return level(jnp.clip(jnp.round(y), 0, d))


def block_error(x: jax.Array, log_x: jax.Array, d: jax.Array, scale: jax.Array,
                alpha: jax.Array, clip: jax.Array, grid: str) -> jax.Array:
  """``||w - w_hat||^2`` of one layer from :func:`reconstruct`'s inputs and absmax."""
  xhat = reconstruct(x, log_x, d, alpha, clip, grid)
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


def unpack(packed: jax.Array, bits: int, k: int, zero: int | None = None
           ) -> jax.Array:
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


def decode_packed(packed: jax.Array, scale: jax.Array, table: jax.Array, bits: int,
                  k: int) -> jax.Array:
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
