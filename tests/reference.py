"""Independent NumPy implementations of the power quantizer, for the tests."""

from __future__ import annotations

import numpy as np


def qmax(bits: int) -> int:
  return 2 ** (bits - 1) - 1


def fake_quantize(
  x: np.ndarray, alpha: float, bits: int, axes: int | tuple[int, ...] | None = None
) -> np.ndarray:
  """The paper's activation quantizer in float64: absmax scales over ``axes`` (all
  of ``x`` when None), power codes, then decoded."""
  x = np.asarray(x, np.float64)
  qm = qmax(bits)
  m = np.max(np.abs(x), axis=axes, keepdims=True)
  safe = np.where(m > 0, m, 1.0)
  k = np.round(qm * (np.abs(x) / safe) ** alpha)
  return np.sign(x) * m * (k / qm) ** (1.0 / alpha)


def blocks(w: np.ndarray, nk: int, ncol: int) -> tuple[np.ndarray, np.ndarray]:
  """Block view (nk, K // nk, N) of a 2-D float32 array and its absmax scales."""
  k, n = w.shape
  w3 = w.astype(np.float32).reshape(nk, k // nk, n)
  m = np.abs(w3).max(axis=1, keepdims=True)
  if ncol == 1:
    m = m.max(axis=2, keepdims=True)
  return w3, m


def power_codes(
  w: np.ndarray, a: float, bits: int, nk: int = 1, ncol: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(signed codes, pre-rounding values, scales) of q = sign(w) round(qmax (|w|/m)^a)."""
  ncol = w.shape[1] if ncol is None else ncol
  w3, m = blocks(w, nk, ncol)
  x = np.abs(w3) / np.where(m > 0, m, np.float32(1))
  y = np.float32(qmax(bits)) * np.power(x, np.float32(a))
  q = np.sign(w3) * np.round(y)
  return q.astype(np.int32).reshape(w.shape), y.reshape(w.shape), m


def power_decode(q: np.ndarray, m: np.ndarray, a: float, bits: int) -> np.ndarray:
  """w_hat = sign(q) m (|q| / qmax)^(1/a), from codes of shape (K, N)."""
  nk = m.shape[0]
  k, n = q.shape
  q3 = q.reshape(nk, k // nk, n)
  # Each level is the float64 value of the formula rounded once to float32.
  mag = np.power(np.abs(q3) / qmax(bits), 1.0 / float(np.float32(a))).astype(np.float32)
  return (np.sign(q3).astype(np.float32) * mag * m).reshape(k, n)


def power_error(
  w: np.ndarray, a: float, bits: int, nk: int = 1, ncol: int | None = None
) -> float:
  """||w - w_hat||^2 in float64 for the power quantizer with exponent a."""
  q, _, m = power_codes(w, a, bits, nk, ncol)
  w_hat = power_decode(q, m, a, bits)
  return float(np.sum((w.astype(np.float64) - w_hat.astype(np.float64)) ** 2))


def uniform_rtn(w: np.ndarray, bits: int) -> np.ndarray:
  """Plain symmetric round-to-nearest with one absmax scale per column."""
  m = np.abs(w).max(axis=0, keepdims=True).astype(np.float32)
  qm = np.float32(qmax(bits))
  q = np.round(w / np.where(m > 0, m, 1) * qm)
  return (q / qm * m).astype(np.float32)


def grid_levels(a: float, bits: int, grid: str) -> np.ndarray:
  """Sorted levels in [-1, 1], float64: the paper's symmetric grid or the full grid."""
  a = float(np.float32(a))
  if grid == 'symmetric':
    k = np.arange(-qmax(bits), qmax(bits) + 1)
    return np.sign(k) * (np.abs(k) / qmax(bits)) ** (1.0 / a)
  half = 2 ** (bits - 1)
  neg = -((np.arange(half, 0, -1) / half) ** (1.0 / a))
  pos = (np.arange(0, half) / (half - 1)) ** (1.0 / a)
  return np.concatenate([neg, pos])


def row_blocks(k: int, group: int | None) -> list[slice]:
  """Row ranges sharing a scale: ceil(K / G) blocks of ceil(K / nk) rows."""
  if group is None:
    return [slice(0, k)]
  nk = -(-k // group)
  rows = -(-k // nk)
  return [slice(i * rows, min((i + 1) * rows, k)) for i in range(nk)]


def quantize_ref(
  w: np.ndarray,
  a: float,
  bits: int,
  grid: str = 'full',
  clip: float = 1.0,
  group: int | None = None,
  per_column: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """(w_hat float32, distance of each weight to its nearest decision point).

  Full grid: each weight takes the nearest level of ``clip * absmax * levels``
  (a dense argmin). Symmetric grid: ``round(qmax (|x| / s) ** a)`` as in the paper.
  """
  w = w.astype(np.float32)
  levels = grid_levels(a, bits, grid).astype(np.float32)
  out = np.zeros_like(w)
  margin = np.full(w.shape, np.inf)
  for rows in row_blocks(w.shape[0], group):
    b = w[rows]
    m = (
      np.abs(b).max(axis=0, keepdims=True) if per_column else np.abs(b).max(keepdims=True)
    )
    s = np.float32(clip) * m
    x = b / np.where(s > 0, s, np.float32(1))
    if grid == 'full':
      dist = np.abs(x[..., None].astype(np.float64) - levels)
      k = np.argmin(dist, axis=-1)
      mids = (levels[1:].astype(np.float64) + levels[:-1]) / 2
      margin[rows] = np.min(np.abs(x[..., None] - mids), axis=-1)
    else:
      y = qmax(bits) * np.power(np.minimum(np.abs(x), 1), np.float32(a))
      k = (np.sign(x) * np.round(y)).astype(np.int64) + qmax(bits)
      margin[rows] = np.abs(y - np.floor(y) - 0.5)
    out[rows] = levels[k] * s
  return out, margin


def quantize_error(
  w: np.ndarray,
  a: float,
  bits: int,
  grid: str = 'full',
  clip: float = 1.0,
  group: int | None = None,
  per_column: bool = True,
) -> float:
  """||w - w_hat||^2 in float64."""
  w_hat, _ = quantize_ref(w, a, bits, grid, clip, group, per_column)
  return float(np.sum((w.astype(np.float64) - w_hat) ** 2))


# --- the stored code layout, written out from its description ------------------------


def code_unit(bits: int) -> tuple[int, int]:
  """``(codes, bytes)`` of a packing unit along K: 4 codes a byte at 2 bits, 2 at 4,
  8 codes in ``bits`` bytes at 3, 5, 6 and 7, one int8 code a byte at 8."""
  return {2: (4, 1), 4: (2, 1), 8: (1, 1)}.get(bits, (8, bits))


def pack_indices(index: np.ndarray, bits: int, table_size: int) -> np.ndarray:
  """Stored codes of table indices ``(K, N)``: unsigned little-endian units along K
  (2 to 7 bits), or signed int8 codes ``index - table_size // 2`` (8 bits)."""
  if bits == 8:
    return (index - table_size // 2).astype(np.int8)
  per_unit, nbytes = code_unit(bits)
  k, n = index.shape
  u = np.pad(index, ((0, -k % per_unit), (0, 0))).astype(np.int64)
  u = u.reshape(-1, per_unit, n)
  word = sum(u[:, j] << (bits * j) for j in range(per_unit))
  planes = [(word >> (8 * b)) & 0xFF for b in range(nbytes)]
  return np.stack(planes, axis=1).reshape(-1, n).astype(np.uint8)


def unpack_indices(codes: np.ndarray, bits: int, k: int, table_size: int) -> np.ndarray:
  """Table indices ``(k, N)`` of stored codes: the inverse of :func:`pack_indices`."""
  codes = np.asarray(codes)
  n = codes.shape[1]
  if bits == 8:
    return codes.astype(np.int64)[:k] + table_size // 2
  per_unit, nbytes = code_unit(bits)
  planes = codes.astype(np.int64).reshape(-1, nbytes, n)
  word = sum(planes[:, b] << (8 * b) for b in range(nbytes))
  index = np.stack([(word >> (bits * j)) & (2**bits - 1) for j in range(per_unit)], 1)
  return index.reshape(-1, n)[:k]


def scale_values(scale: np.ndarray, column_scale: np.ndarray | None) -> np.ndarray:
  """Float32 block scales from their storage: float values, or uint8 counts of 255ths
  of the column's scale (``u / 255`` rounded once to float32, times it)."""
  if column_scale is None:
    return np.asarray(scale, np.float32)
  steps = (np.asarray(scale) / 255).astype(np.float32)
  return steps * np.asarray(column_scale, np.float32)


def block_scales(scale: np.ndarray, k: int) -> np.ndarray:
  """Each of ``k`` rows' scale ``(k, ncol)`` from block scales ``(nk, ncol)``."""
  scale = np.asarray(scale)
  return scale[np.arange(k) // -(-k // scale.shape[0])]


def decode_stored(
  codes: np.ndarray,
  scale: np.ndarray,
  table: np.ndarray,
  bits: int,
  k: int,
  dtype: type = np.float64,
) -> np.ndarray:
  """The ``(k, N)`` weight of stored codes: table level times block scale, in
  ``dtype``."""
  index = unpack_indices(codes, bits, k, len(table))
  return np.asarray(table, dtype)[index] * block_scales(np.asarray(scale, dtype), k)
