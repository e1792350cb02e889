"""benchmarks/references.py against plain decoding formulas and brute force."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[2] / 'benchmarks' / 'references.py'
_SPEC = importlib.util.spec_from_file_location('benchmark_references', _PATH)
assert _SPEC is not None and _SPEC.loader is not None
R = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = R  # dataclasses look their module up
_SPEC.loader.exec_module(R)

F32 = np.float32


def _gauss(k: int, n: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((k, n)).astype(F32)


def _rel(w: np.ndarray, w_hat: np.ndarray) -> float:
  return float(np.sum((w - w_hat) ** 2) / np.sum(w**2))


def _llama_weights(x: np.ndarray, kind: str) -> np.ndarray:
  """The fits' weights of one sub-block, written out."""
  if kind == 'rms+abs':
    return F32(np.sqrt(np.mean(x * x))) + np.abs(x)
  return {'abs': np.abs(x), 'square': x * x}[kind]


# (a) Decoded values lie on each format's grid, decoded here from the stored parts.


@pytest.mark.parametrize('fmt', [R.Q4_K, R.Q2_K], ids=['Q4_K', 'Q2_K'])
def test_affine_parts_on_the_grid(fmt):
  k, n = 300, 6  # a full super-block, then a short one ending in a partial sub-block
  w = _gauss(k, n, 1)
  parts = R.encode_affine(w, fmt)
  nsub = -(-k // fmt.sub)
  nsup = -(-nsub // fmt.per_super)
  assert parts.codes.shape == (nsub * fmt.sub, n) and parts.codes.dtype == np.uint8
  assert parts.scales.shape == parts.mins.shape == (nsub, n)
  assert parts.d.shape == parts.dmin.shape == (nsup, n)
  assert parts.d.dtype == parts.dmin.dtype == np.float16
  assert parts.codes.max() <= 2**fmt.code_bits - 1
  assert max(parts.scales.max(), parts.mins.max()) <= 2**fmt.scale_bits - 1
  assert np.all(parts.codes[k:] == 0)
  sub = np.arange(k) // fmt.sub
  sup = sub // fmt.per_super
  d = parts.d.astype(F32)[sup] * parts.scales[sub]
  dmin = parts.dmin.astype(F32)[sup] * parts.mins[sub]
  expected = d * parts.codes[:k] - dmin
  decoded, bpw = (R.q4_k if fmt is R.Q4_K else R.q2_k)(w)
  np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
  stored = (
    parts.codes.size * fmt.code_bits
    + (parts.scales.size + parts.mins.size) * fmt.scale_bits
    + (parts.d.size + parts.dmin.size) * 16
  )
  assert bpw == pytest.approx(stored / w.size, rel=1e-12)


def test_q3_k_parts_on_the_grid():
  k, n = 300, 6
  w = _gauss(k, n, 2)
  parts = R.encode_q3_k(w)
  assert parts.codes.shape == (304, n) and parts.codes.dtype == np.int8
  assert parts.scales.shape == (19, n) and parts.scales.dtype == np.int8
  assert parts.d.shape == (2, n) and parts.d.dtype == np.float16
  assert -4 <= parts.codes.min() and parts.codes.max() <= 3
  assert -32 <= parts.scales.min() and parts.scales.max() <= 31
  sub = np.arange(k) // 16
  expected = parts.d.astype(F32)[sub // 16] * parts.scales[sub] * parts.codes[:k]
  decoded, bpw = R.q3_k(w)
  np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
  stored = parts.codes.size * 3 + parts.scales.size * 6 + parts.d.size * 16
  assert bpw == pytest.approx(stored / w.size, rel=1e-12)


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_hqq_parts_on_the_grid(bits):
  k, n = 150, 5
  w = _gauss(k, n, 3)
  parts = R.encode_hqq(w, bits)
  assert parts.codes.shape == (192, n) and parts.codes.max() <= 2**bits - 1
  assert parts.scale.dtype == parts.zero.dtype == np.float16
  assert parts.scale.shape == parts.zero.shape == (3, n)
  g = np.arange(k) // 64
  expected = parts.scale.astype(F32)[g] * (parts.codes[:k] - parts.zero.astype(F32)[g])
  decoded, bpw = R.hqq(w, bits)
  np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-7)
  assert bpw == pytest.approx((192 * bits + 3 * 32) / 150, rel=1e-12)


def test_padding_rows_are_left_out():
  # Ten rows in [1, 2]: zero pad rows in the group would set its minimum to 0.
  w = np.random.default_rng(4).uniform(1, 2, (10, 7)).astype(F32)
  parts = R.encode_hqq(w, 4)
  np.testing.assert_array_equal(
    parts.scale[0], ((w.max(0) - w.min(0)) / 15).astype(np.float16)
  )
  assert _rel(w, R.hqq(w, 4)[0]) < 1e-3


# (b) Bits per weight, counted by hand.


def test_bits_per_weight():
  assert R.affine_bits(256, R.Q4_K) == 4.5
  assert R.q3_k_bits(256) == 3.4375
  assert R.affine_bits(256, R.Q2_K) == 2.625
  assert (
    R.hqq_bits(64, 4) == 4.5 and R.hqq_bits(64, 3) == 3.5 and R.hqq_bits(64, 2) == 2.5
  )
  # 384 rows: one full super-block and one of half the sub-blocks.
  assert R.affine_bits(384, R.Q4_K) == (384 * 4 + 12 * 12 + 2 * 32) / 384
  assert R.q3_k_bits(384) == (384 * 3 + 24 * 6 + 2 * 16) / 384
  assert R.affine_bits(384, R.Q2_K) == (384 * 2 + 24 * 8 + 2 * 32) / 384
  # 30522 rows: the last sub-block holds 26 rows (Q4_K) or 10 (Q2_K), codes stored
  # for the whole sub-block.
  assert R.affine_bits(30522, R.Q4_K) == (30528 * 4 + 954 * 12 + 120 * 32) / 30522
  assert R.affine_bits(30522, R.Q2_K) == (30528 * 2 + 1908 * 8 + 120 * 32) / 30522
  assert R.hqq_bits(30522, 4) == (30528 * 4 + 477 * 32) / 30522


# (c) The fits against dense grids and exhaustive searches.


def _blocks(seed: int, rows: int, count: int) -> np.ndarray:
  """Sub-blocks of mixed signs, all positive and all negative: each edge of the
  constrained fit (b <= 0, s >= 0) is reached."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((count, rows, 1)).astype(F32)
  x[1::3] = np.abs(x[1::3]) + F32(0.5)
  x[2::3] = -np.abs(x[2::3]) - F32(0.5)
  return x


@pytest.mark.parametrize('qmax,kind', [(15, 'rms+abs'), (3, 'abs')])
def test_affine_refit_is_the_constrained_least_squares(qmax, kind):
  rows = 32 if qmax == 15 else 16
  x = _blocks(5, rows, 12)
  w = np.stack([_llama_weights(b, kind) for b in x])
  valid = np.ones((len(x), rows, 1), bool)
  lo = np.minimum(x.min(axis=1, keepdims=True), 0)
  span = x.max(axis=1, keepdims=True) - lo
  q = np.clip(np.rint((x - lo) * (qmax - F32(0.3)) / span), 0, qmax)
  s, b = R.refit_affine(q, x, w)
  assert np.all(s >= 0) and np.all(b <= 0)
  for i in range(len(x)):
    xi, wi, qi = (v[i, :, 0].astype(np.float64) for v in (x, w, q))
    err = np.sum(wi * (s[i, 0] * qi + b[i, 0] - xi) ** 2)
    top = float(np.abs(xi).max())
    # A coarse grid over the whole feasible quadrant, s >= 0 and b <= 0 ...
    sg = np.linspace(0, 2 * top / max(qi.max(), 1), 401)[:, None, None]
    bg = np.linspace(-2 * top, 0, 401)[None, :, None]
    coarse = np.sum(wi * (sg * qi + bg - xi) ** 2, axis=-1).min()
    # ... and a fine one around the answer: a convex function has no lower point
    # near its minimiser, and every other point has one.
    sg = np.clip(s[i, 0] + np.linspace(-0.02, 0.02, 201) * top, 0, None)[:, None, None]
    bg = np.clip(b[i, 0] + np.linspace(-0.05, 0.05, 201) * top, None, 0)[None, :, None]
    fine = np.sum(wi * (sg * qi + bg - xi) ** 2, axis=-1).min()
    assert err <= min(coarse, fine) * (1 + 1e-9) + 1e-12, i
  assert R.fit_affine(x, w, valid, qmax, R.Q4_OFFSETS)[0].shape == (len(x), 1)


def test_q3_k_refit_is_the_least_squares_scale():
  x = _blocks(6, 16, 9)
  w = x * x
  amax = np.take_along_axis(x, np.argmax(np.abs(x), axis=1)[:, None], axis=1)
  q = np.clip(np.rint(x * F32(-4.2) / amax), -4, 3)
  s = R.refit_scale(q, x, w)
  for i in range(len(x)):
    xi, wi, qi = (v[i, :, 0].astype(np.float64) for v in (x, w, q))
    err = np.sum(wi * (s[i, 0] * qi - xi) ** 2)
    top = 2 * float(np.abs(xi).max())
    sg = np.linspace(-top, top, 40001)[:, None]
    grid = np.sum(wi * (sg * qi - xi) ** 2, axis=-1)
    assert err <= grid.min() * (1 + 1e-9) + 1e-12, i


def _lattice_ratios(kind: str) -> np.ndarray:
  """Per sub-block: the encoder's weighted error over the best of every lattice point
  (all sub-scales and mins of the format against the stored float16 numbers), each
  with its nearest codes."""
  if kind == 'Q3_K':
    w = _gauss(256, 8, 7)
    parts = R.encode_q3_k(w)
    decoded = R.decode_q3_k(parts)
    sub, per_super, lattice = 16, 16, np.arange(-32, 32, dtype=F32)
  else:
    fmt = R.Q4_K if kind == 'Q4_K' else R.Q2_K
    w = _gauss(256, 8 if kind == 'Q4_K' else 4, 8)
    parts = R.encode_affine(w, fmt)
    decoded = R.decode_affine(parts)
    sub, per_super = fmt.sub, fmt.per_super
    lattice = np.arange(2**fmt.scale_bits, dtype=F32)
  ratios = []
  for j in range(w.shape[1]):
    for i in range(per_super):
      rows = slice(i * sub, (i + 1) * sub)
      x = w[rows, j]
      if kind == 'Q3_K':
        wt = _llama_weights(x, 'square')
        step = F32(parts.d[0, j]) * lattice[:, None]
        q = np.clip(np.rint(x / np.where(step != 0, step, 1)), -4, 3)
        dec = step * np.where(step != 0, q, 0)
      else:
        wt = _llama_weights(x, fmt.weights)
        step = (F32(parts.d[0, j]) * lattice)[:, None, None]
        shift = (F32(parts.dmin[0, j]) * lattice)[None, :, None]
        qmax = 2**fmt.code_bits - 1
        q = np.clip(np.rint((x + shift) / np.where(step > 0, step, 1)), 0, qmax)
        dec = step * np.where(step > 0, q, 0) - shift
      best = np.sum(wt * (dec - x) ** 2, axis=-1).min()
      ours = np.sum(wt * (decoded[rows, j] - x) ** 2)
      ratios.append(ours / best)
  return np.array(ratios)


@pytest.mark.parametrize(
  'kind,mean,optimal', [('Q4_K', 1.03, 0.6), ('Q3_K', 1.01, 0.9), ('Q2_K', 1.02, 0.85)]
)
def test_k_quant_sub_blocks_near_the_exhaustive_lattice_search(kind, mean, optimal):
  ratios = _lattice_ratios(kind)
  assert ratios.min() >= 1 - 1e-5  # nothing beats the exhaustive search
  assert ratios.mean() <= mean
  assert np.mean(ratios <= 1 + 1e-6) >= optimal


@pytest.mark.parametrize('bits', [2, 4])
def test_hqq_zero_near_the_best_zero(bits):
  w = _gauss(64, 64, 9)
  parts = R.encode_hqq(w, bits)
  ours = np.abs(w - R.decode_hqq(parts)).sum(axis=0)
  qmax = 2**bits - 1
  s = parts.scale.astype(F32)[0]
  zg = np.linspace(-0.5 * qmax, 1.5 * qmax, 4001, dtype=F32)[:, None, None]
  q = np.clip(np.rint(w / s + zg), 0, qmax)
  best = np.abs(w - s * (q - zg)).sum(axis=1).min(axis=0)
  z0 = -w.min(axis=0) / s
  start = np.abs(w - s * (np.clip(np.rint(w / s + z0), 0, qmax) - z0)).sum(axis=0)
  assert np.all(ours >= best * (1 - 2e-3))
  assert np.mean(ours / best) <= 1.05
  assert np.mean(ours) < np.mean(start)  # the half-quadratic steps help


# (d) More bits, less error.


def test_error_falls_from_q2_k_to_q4_k():
  w = _gauss(512, 32, 10)
  errors = [_rel(w, f(w)[0]) for f in (R.q2_k, R.q3_k, R.q4_k)]
  assert errors[0] > errors[1] > errors[2]
  assert 0.05 < errors[0] < 0.15 and 0.002 < errors[2] < 0.01
  hqq = [_rel(w, R.hqq(w, b)[0]) for b in (2, 3, 4)]
  assert hqq[0] > hqq[1] > hqq[2]


# Edge cases.


@pytest.mark.parametrize('name', ['q4_k', 'q3_k', 'q2_k', 'hqq'])
def test_zeros_decode_to_zeros_and_inputs_stay(name):
  f = getattr(R, name)
  zeros = np.zeros((300, 3), F32)
  decoded, _ = f(zeros)
  assert np.all(decoded == 0)
  w = _gauss(40, 3, 11)
  before = w.copy()
  first, _ = f(w)
  np.testing.assert_array_equal(w, before)
  np.testing.assert_array_equal(f(w)[0], first)
  with pytest.raises(ValueError, match='NaN'):
    f(np.full((4, 2), np.nan, F32))
  with pytest.raises(ValueError, match='matrix'):
    f(np.ones(8, F32))
