"""NumPy references for strong data-free weight formats: k-quants (Q4_K, Q3_K, Q2_K)
and HQQ, written from the public descriptions of the formats.

Every function takes a float32 matrix ``W`` of shape ``(K, N)`` and quantizes each
column in blocks along ``K`` (the first axis), so a Flax kernel ``(in, out)`` is cut
along its input features, as llama.cpp cuts a row of a ``(out, in)`` matrix. Each
returns the decoded matrix and the stored bits per weight, everything counted: codes,
sub-block scales and mins, and the float16 numbers of each super-block or group.

Blocks that do not fit: ``K`` is padded with zero rows up to a whole sub-block (or
group); the pad rows get weight zero in every fit and are left out of every minimum
and maximum, so they change nothing, but their codes are counted as stored. The last
super-block of a column holds the sub-blocks that remain (fewer than a full one) and
has its own float16 numbers. For ``K = 384`` a 256-row super-block and a 128-row one.

- Q4_K-like: super-blocks of 8 sub-blocks of 32, ``x = d * sc_i * q - dmin * m_i``
  with ``q`` in 0..15, 6-bit ``sc_i`` and ``m_i`` and float16 ``d``, ``dmin``:
  4 + (8 * 12 + 32) / 256 = 4.5 bits per weight.
- Q3_K-like: super-blocks of 16 sub-blocks of 16, ``x = d * sc_i * q`` with ``q`` in
  -4..3, signed 6-bit ``sc_i`` in -32..31 and a float16 ``d``:
  3 + (16 * 6 + 16) / 256 = 3.4375 bits per weight.
- Q2_K-like: super-blocks of 16 sub-blocks of 16, ``q`` in 0..3, 4-bit ``sc_i`` and
  ``m_i``, float16 ``d`` and ``dmin``: 2 + (16 * 8 + 32) / 256 = 2.625 bits per weight.
- HQQ-like: groups of 64, ``x = s * (q - z)`` with ``q`` in 0..2**bits - 1, the scale
  from the group's minimum and maximum, the zero point refined by half-quadratic
  steps under an l_p loss (p = 0.7); float16 ``s`` and ``z``: bits + 0.5 per weight.

How the k-quants are fitted (llama.cpp's reference encoder, without an importance
matrix, in our words): each sub-block is fitted in float, then the super-block's
float16 maxima are set and each sub-block's scale (and min) rounded on that 6- or
4-bit lattice, and the codes re-rounded against the stored numbers. The float fit
tries candidate inverse scales around ``qmax / (max - min)`` (Q4_K: 21 offsets
-1..1 of the level count, Q2_K: 16 offsets -0.5..1, Q3_K: 19 offsets -0.9..0.9 with
the largest magnitude mapped to -4), rounds the codes for each and refits (scale,
min) by weighted least squares given those codes, keeping the candidate of least
weighted squared error. The weights are llama.cpp's by default: ``rms(x) + |x|``
over the sub-block for Q4_K, ``|x|`` for Q2_K, ``x**2`` for Q3_K; ``weights='ones'``
fits the plain squared error instead. One step goes beyond its reference encoder:
after rounding a sub-block's scale (and min) to the lattice, the neighbouring lattice
points (+-1 in each) are tried too and the best by weighted error kept, which lowers
the error at no cost in bits (``refine=False`` leaves it out).

The search is a heuristic: on Gaussian sub-blocks the weighted error is on average
2.6% (Q4_K), 0.05% (Q3_K) and 1.4% (Q2_K) above that of the best lattice point found
by trying every sub-block scale and min against the stored float16 numbers, and up
to 1.5x above it in a few sub-blocks (tests/benchmarks/test_references.py).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import numpy as np

# Candidate offsets of the inverse scale, in levels (qmax + offset) / (max - min).
Q4_OFFSETS = tuple(-1.0 + 0.1 * t for t in range(21))
Q2_OFFSETS = tuple(-0.5 + 0.1 * t for t in range(16))
Q3_OFFSETS = tuple(0.1 * t for t in range(-9, 10))
NEIGHBOURS = (-1, 0, 1)
# Weights of the fits' squared error: llama.cpp's per format, or none ('ones').
Weights = Literal['rms+abs', 'abs', 'square', 'ones']


@dataclasses.dataclass(frozen=True)
class AffineFormat:
  """A k-quant with mins: ``x = d * sc * q - dmin * m`` in each sub-block."""

  name: str
  code_bits: int
  sub: int  # rows of a sub-block
  per_super: int  # sub-blocks of a super-block
  scale_bits: int  # bits of each sub-block scale, and of each min
  offsets: tuple[float, ...]
  weights: Weights  # llama.cpp's for this format


Q4_K = AffineFormat('Q4_K-like', 4, 32, 8, 6, Q4_OFFSETS, 'rms+abs')
Q2_K = AffineFormat('Q2_K-like', 2, 16, 16, 4, Q2_OFFSETS, 'abs')
Q3_SUB, Q3_PER_SUPER, Q3_QMIN, Q3_QMAX, Q3_SMIN, Q3_SMAX = 16, 16, -4, 3, -32, 31


class Affine(NamedTuple):
  """Stored parts of a k-quant with mins."""

  codes: np.ndarray  # uint8 (Kp, N), 0..2**code_bits - 1
  scales: np.ndarray  # uint8 (Kp / sub, N), 0..2**scale_bits - 1
  mins: np.ndarray  # uint8 (Kp / sub, N), 0..2**scale_bits - 1
  d: np.ndarray  # float16 (super-blocks, N)
  dmin: np.ndarray  # float16 (super-blocks, N)
  rows: int  # K before padding
  per_super: int  # sub-blocks of a super-block


class Symmetric(NamedTuple):
  """Stored parts of a Q3_K-like matrix."""

  codes: np.ndarray  # int8 (Kp, N), -4..3
  scales: np.ndarray  # int8 (Kp / 16, N), -32..31
  d: np.ndarray  # float16 (super-blocks, N)
  rows: int


class Hqq(NamedTuple):
  """Stored parts of an HQQ-like matrix: ``x = scale * (codes - zero)``."""

  codes: np.ndarray  # uint8 (Kp, N), 0..2**bits - 1
  scale: np.ndarray  # float16 (groups, N)
  zero: np.ndarray  # float16 (groups, N)
  bits: int
  rows: int


def _check(w: np.ndarray) -> np.ndarray:
  w = np.asarray(w)
  if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
    raise ValueError(f'expected a non-empty (K, N) matrix, got shape {w.shape}')
  if not np.all(np.isfinite(w)):
    raise ValueError('the matrix holds NaN or Inf')
  return w.astype(np.float32)


def _blocks(w: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """``(K, N)`` as ``(ceil(K / size), size, N)`` padded with zero rows, and the mask
  ``(blocks, size, 1)`` of the rows that are not padding."""
  k, n = w.shape
  nb = -(-k // size)
  x = np.zeros((nb * size, n), np.float32)
  x[:k] = w
  valid = (np.arange(nb * size) < k).reshape(nb, size, 1)
  return x.reshape(nb, size, n), valid


def _supers(v: np.ndarray, per_super: int) -> np.ndarray:
  """Per-sub-block values ``(nsub, N)`` as ``(nsup, per_super, N)``, zero padded."""
  nsub, n = v.shape
  nsup = -(-nsub // per_super)
  out = np.zeros((nsup * per_super, n), v.dtype)
  out[:nsub] = v
  return out.reshape(nsup, per_super, n)


def _per_sub(v: np.ndarray, per_super: int, nsub: int) -> np.ndarray:
  """Per-super-block values ``(nsup, N)`` repeated for each of its sub-blocks: the
  first ``nsub`` rows (the last super-block may hold fewer than ``per_super``)."""
  return np.repeat(v, per_super, axis=0)[:nsub]


def _sum(a: np.ndarray) -> np.ndarray:
  """Sum over a block's rows (axis 1) in float64: the fits subtract nearly equal sums."""
  return np.add.reduce(a, axis=1, dtype=np.float64)


def _fp16(v: np.ndarray) -> np.ndarray:
  return v.astype(np.float16)


def _masked_extremes(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  lo = np.min(np.where(valid, x, np.inf), axis=1)
  hi = np.max(np.where(valid, x, -np.inf), axis=1)
  return lo, hi


def _weights(x: np.ndarray, valid: np.ndarray, kind: Weights) -> np.ndarray:
  """llama.cpp's weights of the k-quant fits; zero on padding rows."""
  if kind == 'rms+abs':
    count = np.maximum(np.sum(valid, axis=1, keepdims=True), 1)
    rms = np.sqrt(np.sum(x * x, axis=1, keepdims=True) / count)
    w = rms + np.abs(x)
  elif kind == 'abs':
    w = np.abs(x)
  elif kind == 'square':
    w = x * x
  elif kind == 'ones':
    w = np.ones_like(x)
  else:
    raise ValueError(f'unknown weights {kind!r}')
  return np.where(valid, w, np.float32(0)).astype(np.float32)


def _quad(
  s: np.ndarray,
  b: np.ndarray,
  a_: np.ndarray,
  b_: np.ndarray,
  c_: np.ndarray,
  d_: np.ndarray,
  f_: np.ndarray,
) -> np.ndarray:
  """``sum w (s q + b - x)**2 - sum w x**2`` from the sums ``A = sum w q**2``,
  ``B = sum w q``, ``C = sum w``, ``D = sum w q x``, ``F = sum w x``."""
  return s * s * a_ + 2 * s * b * b_ + b * b * c_ - 2 * s * d_ - 2 * b * f_


def _code_sums(
  q: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(sum w q**2, sum w q, sum w q x)`` over each block's rows."""
  wq = w * q
  return _sum(wq * q), _sum(wq), _sum(wq * x)


def _solve_affine(
  a_: np.ndarray, b_: np.ndarray, c_: np.ndarray, d_: np.ndarray, f_: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Minimiser of ``_quad`` over ``s >= 0, b <= 0``: the free minimiser if it lies in
  the quadrant, else the better of the two edges (the quadratic is convex)."""
  det = a_ * c_ - b_ * b_
  ok = det > 1e-12 * np.maximum(a_ * c_, 1e-300)
  safe = np.where(ok, det, 1.0)
  s0 = (c_ * d_ - b_ * f_) / safe
  b0 = (a_ * f_ - b_ * d_) / safe
  inside = ok & (s0 >= 0) & (b0 <= 0)
  s1 = np.maximum(d_ / np.where(a_ > 0, a_, 1.0), 0.0)  # the edge b = 0
  b2 = np.minimum(f_ / np.where(c_ > 0, c_, 1.0), 0.0)  # the edge s = 0
  first = _quad(s1, 0.0, a_, b_, c_, d_, f_) <= _quad(0.0, b2, a_, b_, c_, d_, f_)
  s = np.where(inside, s0, np.where(first, s1, 0.0))
  b = np.where(inside, b0, np.where(first, 0.0, b2))
  return s, b


def refit_affine(
  q: np.ndarray, x: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Weighted least-squares ``(s, b)`` of ``x ~ s * q + b`` with ``s >= 0, b <= 0``.

  Args:
    q: codes, shape ``(blocks, rows, N)``.
    x: values, same shape.
    w: non-negative weights, same shape (zero on padding).

  Returns:
    ``(s, b)``, each ``(blocks, N)`` float64: the exact minimiser over the quadrant.
  """
  a_, b_, d_ = _code_sums(q, x, w)
  return _solve_affine(a_, b_, _sum(w), d_, _sum(w * x))


def fit_affine(
  x: np.ndarray, w: np.ndarray, valid: np.ndarray, qmax: int, offsets: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """Float fit of each block: ``x ~ s * q + b``, ``q`` in ``0..qmax``, ``s >= 0``,
  ``b <= 0``, by a search over inverse scales with a least-squares refit.

  Args:
    x: values ``(blocks, rows, N)``.
    w: weights of the squared error, same shape.
    valid: mask of the rows that are not padding, ``(blocks, rows, 1)``.
    qmax: largest code.
    offsets: candidate inverse scales ``(qmax + offset) / (max - min)``.

  Returns:
    ``(s, b)`` of least weighted squared error among the candidates, ``(blocks, N)``.
  """
  lo, hi = _masked_extremes(x, valid)
  lo = np.minimum(lo, 0.0)  # the offset is a min subtracted: never positive
  span = hi - lo
  flat = span <= 0
  inv_span = np.where(flat, 0.0, 1.0 / np.where(flat, 1.0, span)).astype(np.float32)
  shifted = x - lo[:, None]
  c_, f_ = _sum(w), _sum(w * x)
  best_s = np.zeros(lo.shape)
  best_b = np.minimum(f_ / np.where(c_ > 0, c_, 1.0), 0.0)  # all codes zero
  best_e = _quad(0.0, best_b, 0.0, 0.0, c_, 0.0, f_)
  for off in offsets:
    iscale = (np.float32(qmax + off) * inv_span)[:, None]
    q = np.clip(np.rint(shifted * iscale), 0, qmax)
    a_, b_, d_ = _code_sums(q, x, w)
    s, b = _solve_affine(a_, b_, c_, d_, f_)
    e = _quad(s, b, a_, b_, c_, d_, f_)
    better = e < best_e
    best_s = np.where(better, s, best_s)
    best_b = np.where(better, b, best_b)
    best_e = np.where(better, e, best_e)
  return best_s, best_b


def _nearest(x: np.ndarray, step: np.ndarray, shift: np.ndarray, lo: int, hi: int):
  """Codes ``q`` in ``lo..hi`` nearest to ``(x + shift) / step``; 0 where step is 0."""
  inv = np.where(step != 0, 1.0 / np.where(step != 0, step, 1.0), 0.0)
  return np.clip(np.rint((x + shift) * inv.astype(np.float32)), lo, hi)


def _werr(x: np.ndarray, w: np.ndarray, decoded: np.ndarray) -> np.ndarray:
  r = decoded - x
  return _sum(w * r * r)


def encode_affine(
  w: np.ndarray, fmt: AffineFormat, refine: bool = True, weights: Weights | None = None
) -> Affine:
  """Q4_K- or Q2_K-like encoding of a ``(K, N)`` matrix (see the module docstring).

  Args:
    w: the matrix.
    fmt: ``Q4_K`` or ``Q2_K``.
    refine: also try the neighbours of each rounded sub-block scale and min.
    weights: the fits' weights; None: the format's (llama.cpp's).

  Returns:
    The stored parts.
  """
  w = _check(w)
  qmax, lmax = 2**fmt.code_bits - 1, 2**fmt.scale_bits - 1
  x, valid = _blocks(w, fmt.sub)
  wt = _weights(x, valid, weights or fmt.weights)
  s, b = fit_affine(x, wt, valid, qmax, fmt.offsets)
  m = -b
  nsub = x.shape[0]
  d = _fp16(np.max(_supers(s, fmt.per_super), axis=1) / lmax)
  dmin = _fp16(np.max(_supers(m, fmt.per_super), axis=1) / lmax)
  d_sub = _per_sub(d.astype(np.float64), fmt.per_super, nsub)
  dmin_sub = _per_sub(dmin.astype(np.float64), fmt.per_super, nsub)
  sc0 = np.clip(
    np.rint(np.where(d_sub > 0, s / np.where(d_sub > 0, d_sub, 1), 0)), 0, lmax
  )
  mn0 = np.clip(
    np.rint(np.where(dmin_sub > 0, m / np.where(dmin_sub > 0, dmin_sub, 1), 0)), 0, lmax
  )
  best = None
  steps = NEIGHBOURS if refine else (0,)
  for ds in steps:
    for dm in steps:
      sc = np.clip(sc0 + ds, 0, lmax)
      mn = np.clip(mn0 + dm, 0, lmax)
      step = (d_sub * sc).astype(np.float32)[:, None]
      shift = (dmin_sub * mn).astype(np.float32)[:, None]
      q = _nearest(x, step, shift, 0, qmax)
      e = _werr(x, wt, step * q - shift)
      if best is None:
        best = [e, sc, mn, q]
        continue
      better = e < best[0]
      best[0] = np.where(better, e, best[0])
      best[1] = np.where(better, sc, best[1])
      best[2] = np.where(better, mn, best[2])
      best[3] = np.where(better[:, None], q, best[3])
  _, sc, mn, q = best
  q = np.where(valid, q, 0)
  return Affine(
    codes=q.reshape(-1, w.shape[1]).astype(np.uint8),
    scales=sc.astype(np.uint8),
    mins=mn.astype(np.uint8),
    d=d,
    dmin=dmin,
    rows=w.shape[0],
    per_super=fmt.per_super,
  )


def decode_affine(parts: Affine) -> np.ndarray:
  """``d * sc * q - dmin * m`` of every sub-block, as the ``(K, N)`` float32 matrix."""
  nsub, n = parts.scales.shape
  sub = parts.codes.shape[0] // nsub
  d = _per_sub(parts.d.astype(np.float32), parts.per_super, nsub)
  dmin = _per_sub(parts.dmin.astype(np.float32), parts.per_super, nsub)
  step = (d * parts.scales.astype(np.float32))[:, None]
  shift = (dmin * parts.mins.astype(np.float32))[:, None]
  q = parts.codes.astype(np.float32).reshape(nsub, sub, n)
  return (step * q - shift).reshape(-1, n)[: parts.rows]


def affine_bits(k: int, fmt: AffineFormat) -> float:
  """Stored bits per weight of a column of ``k`` rows."""
  nsub = -(-k // fmt.sub)
  nsup = -(-nsub // fmt.per_super)
  stored = nsub * fmt.sub * fmt.code_bits + nsub * 2 * fmt.scale_bits + nsup * 32
  return stored / k


def fit_symmetric(
  x: np.ndarray, w: np.ndarray, valid: np.ndarray, offsets: tuple[float, ...]
) -> np.ndarray:
  """Float fit of each block: ``x ~ s * q``, ``q`` in -4..3, by a search over inverse
  scales ``-(4 + offset) / amax`` (``amax`` the value of largest magnitude, so it
  lands near -4, the side with room) with a least-squares refit of ``s``.

  Args:
    x: values ``(blocks, rows, N)``.
    w: weights of the squared error, same shape.
    valid: mask of the rows that are not padding, ``(blocks, rows, 1)``.
    offsets: candidate offsets of the inverse scale, in levels.

  Returns:
    ``s`` of least weighted squared error among the candidates, ``(blocks, N)``.
  """
  xv = np.where(valid, x, np.float32(0))
  at = np.argmax(np.abs(xv), axis=1)
  amax = np.take_along_axis(xv, at[:, None], axis=1)[:, 0]
  inv = np.where(amax != 0, 1.0 / np.where(amax != 0, amax, 1.0), 0.0).astype(np.float32)
  best_s = np.zeros(amax.shape)
  best_gain = np.zeros(amax.shape)  # error = sum w x**2 - gain
  for off in offsets:
    iscale = (np.float32(Q3_QMIN - off) * inv)[:, None]
    q = np.clip(np.rint(x * iscale), Q3_QMIN, Q3_QMAX)
    wq = w * q
    a_, d_ = _sum(wq * q), _sum(wq * x)
    s = np.where(a_ > 0, d_ / np.where(a_ > 0, a_, 1.0), 0.0)
    gain = s * d_  # the least-squares error is sum w x**2 - (sum wqx)**2 / sum wq**2
    better = gain > best_gain
    best_s = np.where(better, s, best_s)
    best_gain = np.where(better, gain, best_gain)
  return best_s


def refit_scale(q: np.ndarray, x: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Weighted least-squares ``s`` of ``x ~ s * q`` in each block: ``sum wqx / sum wq^2``.

  Args:
    q: codes ``(blocks, rows, N)``.
    x: values, same shape.
    w: weights, same shape.

  Returns:
    ``s``, ``(blocks, N)`` float64 (0 where every code is 0).
  """
  wq = w * q
  a_ = _sum(wq * q)
  return np.where(a_ > 0, _sum(wq * x) / np.where(a_ > 0, a_, 1.0), 0.0)


def encode_q3_k(
  w: np.ndarray, refine: bool = True, weights: Weights = 'square'
) -> Symmetric:
  """Q3_K-like encoding of a ``(K, N)`` matrix (see the module docstring).

  Args:
    w: the matrix.
    refine: also try the neighbours of each rounded sub-block scale.
    weights: the fits' weights; ``'square'`` (``x**2``) is llama.cpp's.

  Returns:
    The stored parts.
  """
  w = _check(w)
  x, valid = _blocks(w, Q3_SUB)
  wt = _weights(x, valid, weights)
  s = fit_symmetric(x, wt, valid, Q3_OFFSETS)
  nsub = x.shape[0]
  grouped = _supers(s, Q3_PER_SUPER)
  at = np.argmax(np.abs(grouped), axis=1)
  smax = np.take_along_axis(grouped, at[:, None], axis=1)[:, 0]
  # The scale of largest magnitude lands on -32, the side with room.
  d = _fp16(smax / Q3_SMIN)
  d_sub = _per_sub(d.astype(np.float64), Q3_PER_SUPER, nsub)
  sc0 = np.clip(
    np.rint(np.where(d_sub != 0, s / np.where(d_sub != 0, d_sub, 1), 0)), Q3_SMIN, Q3_SMAX
  )
  best = None
  for ds in NEIGHBOURS if refine else (0,):
    sc = np.clip(sc0 + ds, Q3_SMIN, Q3_SMAX)
    step = (d_sub * sc).astype(np.float32)[:, None]
    q = _nearest(x, step, np.float32(0), Q3_QMIN, Q3_QMAX)
    e = _werr(x, wt, step * q)
    if best is None:
      best = [e, sc, q]
      continue
    better = e < best[0]
    best[0] = np.where(better, e, best[0])
    best[1] = np.where(better, sc, best[1])
    best[2] = np.where(better[:, None], q, best[2])
  _, sc, q = best
  q = np.where(valid, q, 0)
  return Symmetric(
    codes=q.reshape(-1, w.shape[1]).astype(np.int8),
    scales=sc.astype(np.int8),
    d=d,
    rows=w.shape[0],
  )


def decode_q3_k(parts: Symmetric) -> np.ndarray:
  """``d * sc * q`` of every sub-block, as the ``(K, N)`` float32 matrix."""
  nsub, n = parts.scales.shape
  d = _per_sub(parts.d.astype(np.float32), Q3_PER_SUPER, nsub)
  step = (d * parts.scales.astype(np.float32))[:, None]
  q = parts.codes.astype(np.float32).reshape(nsub, Q3_SUB, n)
  return (step * q).reshape(-1, n)[: parts.rows]


def q3_k_bits(k: int) -> float:
  """Stored bits per weight of a Q3_K-like column of ``k`` rows."""
  nsub = -(-k // Q3_SUB)
  nsup = -(-nsub // Q3_PER_SUPER)
  return (nsub * Q3_SUB * 3 + nsub * 6 + nsup * 16) / k


def _shrink_lp(e: np.ndarray, beta: float, p: float) -> np.ndarray:
  """Generalised soft-thresholding: the proximal step of ``|e|**p / beta``."""
  mag = np.abs(e)
  with np.errstate(divide='ignore'):
    cut = np.power(mag, np.float32(p - 1)) / np.float32(beta)
  return np.sign(e) * np.maximum(mag - cut, 0)


def encode_hqq(
  w: np.ndarray,
  bits: int = 4,
  group: int = 64,
  p: float = 0.7,
  beta: float = 10.0,
  kappa: float = 1.01,
  iters: int = 20,
) -> Hqq:
  """HQQ-like encoding of a ``(K, N)`` matrix in groups of ``group`` rows.

  The scale is ``(max - min) / (2**bits - 1)`` and stays; the zero point starts at
  ``-min / scale`` and is refined by half-quadratic splitting of
  ``min_z |x - s (q(z) - z)|_p^p``: the error ``e`` takes a generalised
  soft-thresholding step, then ``z`` the mean of ``q - (x - e) / s`` over the group,
  ``beta`` growing by ``kappa`` each step. Each group keeps the zero point of least
  mean absolute error seen (HQQ stops at the first step that does not lower it, over
  the whole matrix). Scale and zero are stored in float16; the codes are rounded
  against the stored values.

  Args:
    w: the matrix.
    bits: code width, 2 to 8.
    group: rows of a group.
    p: the exponent of the loss, below 1.
    beta: the first penalty weight of the splitting.
    kappa: its growth per step.
    iters: half-quadratic steps.

  Returns:
    The stored parts.
  """
  if not 2 <= bits <= 8:
    raise ValueError(f'bits must be 2..8, got {bits}')
  w = _check(w)
  qmax = np.float32(2**bits - 1)
  x, valid = _blocks(w, group)
  count = np.sum(valid, axis=1)
  lo, hi = _masked_extremes(x, valid)
  span = hi - lo
  flat = span <= 0
  scale = np.where(flat, 1.0, span / qmax).astype(np.float32)
  inv = (1 / scale)[:, None]
  zero = np.where(flat, 0.0, -lo / scale).astype(np.float32)
  best_z, best_e = zero, np.full(zero.shape, np.inf)
  for _ in range(iters):
    q = np.clip(np.rint(x * inv + zero[:, None]), 0, qmax)
    r = (q - zero[:, None]) * scale[:, None]
    err = _sum(np.where(valid, np.abs(x - r), 0)) / count
    better = err < best_e
    best_z = np.where(better, zero, best_z)
    best_e = np.where(better, err, best_e)
    e = _shrink_lp(x - r, beta, p)
    zero = (_sum(np.where(valid, q - (x - e) * inv, 0)) / count).astype(np.float32)
    beta *= kappa
  scale16, zero16 = _fp16(scale), _fp16(best_z)
  s = scale16.astype(np.float32)[:, None]
  z = zero16.astype(np.float32)[:, None]
  q = np.where(valid, np.clip(np.rint(x / s + z), 0, qmax), 0)
  return Hqq(
    codes=q.reshape(-1, w.shape[1]).astype(np.uint8),
    scale=scale16,
    zero=zero16,
    bits=bits,
    rows=w.shape[0],
  )


def decode_hqq(parts: Hqq) -> np.ndarray:
  """``scale * (q - zero)`` of every group, as the ``(K, N)`` float32 matrix."""
  ng, n = parts.scale.shape
  q = parts.codes.astype(np.float32).reshape(ng, -1, n)
  s = parts.scale.astype(np.float32)[:, None]
  z = parts.zero.astype(np.float32)[:, None]
  return (s * (q - z)).reshape(-1, n)[: parts.rows]


def hqq_bits(k: int, bits: int = 4, group: int = 64) -> float:
  """Stored bits per weight of an HQQ-like column of ``k`` rows."""
  ng = -(-k // group)
  return (ng * group * bits + ng * 32) / k


def q4_k(
  w: np.ndarray, refine: bool = True, weights: Weights = 'rms+abs'
) -> tuple[np.ndarray, float]:
  """Q4_K-like fake quantization of a ``(K, N)`` matrix.

  Args:
    w: the matrix.
    refine: also try the lattice neighbours of each rounded scale and min.
    weights: the fits' weights (``'rms+abs'`` is llama.cpp's).

  Returns:
    The decoded ``(K, N)`` float32 matrix and its stored bits per weight.
  """
  parts = encode_affine(w, Q4_K, refine, weights)
  return decode_affine(parts), affine_bits(np.shape(w)[0], Q4_K)


def q3_k(
  w: np.ndarray, refine: bool = True, weights: Weights = 'square'
) -> tuple[np.ndarray, float]:
  """Q3_K-like fake quantization of a ``(K, N)`` matrix.

  Args:
    w: the matrix.
    refine: also try the lattice neighbours of each rounded scale.
    weights: the fit's weights (``'square'`` is llama.cpp's).

  Returns:
    The decoded ``(K, N)`` float32 matrix and its stored bits per weight.
  """
  return decode_q3_k(encode_q3_k(w, refine, weights)), q3_k_bits(np.shape(w)[0])


def q2_k(
  w: np.ndarray, refine: bool = True, weights: Weights = 'abs'
) -> tuple[np.ndarray, float]:
  """Q2_K-like fake quantization of a ``(K, N)`` matrix.

  Args:
    w: the matrix.
    refine: also try the lattice neighbours of each rounded scale and min.
    weights: the fits' weights (``'abs'`` is llama.cpp's).

  Returns:
    The decoded ``(K, N)`` float32 matrix and its stored bits per weight.
  """
  parts = encode_affine(w, Q2_K, refine, weights)
  return decode_affine(parts), affine_bits(np.shape(w)[0], Q2_K)


def hqq(w: np.ndarray, bits: int = 4, group: int = 64) -> tuple[np.ndarray, float]:
  """HQQ-like fake quantization of a ``(K, N)`` matrix.

  Args:
    w: the matrix.
    bits: code width, 2 to 8.
    group: rows of a group.

  Returns:
    The decoded ``(K, N)`` float32 matrix and its stored bits per weight.
  """
  return decode_hqq(encode_hqq(w, bits, group)), hqq_bits(np.shape(w)[0], bits, group)
