"""Property-based tests of quantize/dequantize over shapes, dtypes, bits and values."""

import inspect

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pqjax
from pqjax._src.core.blocks import matrix_shape
from tests import reference

DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16))
# Few distinct shapes: each new (shape, bits, options) costs an XLA compilation.
SHAPES = ((12, 6), (2, 3, 5), (1, 7))
# Magnitudes above 1 / float32 tiny (8.5e37) decode to zero (test_near_float32_max).
KINDS = ('normal', 'tiny', 'huge', 'denormal', 'equal', 'outlier', 'zeros', 'sparse')
OPTIONS = set(inspect.signature(pqjax.quantize).parameters)
GRIDS = ('symmetric', 'full') if 'grid' in OPTIONS else (None,)
CLIPS = (False, 0.8, 'block') if 'clip' in OPTIONS else (None,)


def values(kind: str, shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
  """A weight of ``kind`` (magnitudes that stress the operator) in ``dtype``."""
  rng = np.random.default_rng(seed)
  info = ml_dtypes.finfo(dtype)
  w = rng.standard_normal(shape)
  if kind == 'tiny':
    w = w * float(info.tiny) * 8
  elif kind == 'huge':
    w = w / np.abs(w).max() * float(info.max) / 2
  elif kind == 'denormal':
    w = rng.integers(-7, 8, shape) * float(info.smallest_subnormal)
  elif kind == 'equal':
    w = np.full(shape, rng.choice([-1, 1]) * rng.uniform(1e-3, 10))
  elif kind == 'outlier':
    w.flat[rng.integers(w.size)] = rng.choice([-1, 1]) * 1e3
  elif kind == 'zeros':
    w = np.zeros(shape)
  elif kind == 'sparse':
    w = w * (rng.random(shape) < 0.2)
  return w.astype(dtype)


@st.composite
def cases(draw):
  shape = draw(st.sampled_from(SHAPES))
  k, _ = matrix_shape(shape)
  return dict(
    shape=shape,
    dtype=draw(st.sampled_from(DTYPES)),
    bits=draw(st.integers(2, 8)),
    granularity=draw(st.sampled_from(['tensor', 'channel', 1, 4, k])),
    exponent=draw(st.sampled_from([0.3, 0.55, 1.0, 1.7])),
    grid=draw(st.sampled_from(GRIDS)),
    clip=draw(st.sampled_from(CLIPS)),
    kind=draw(st.sampled_from(KINDS)),
    seed=draw(st.integers(0, 2**16)),
  )


def options(case: dict, **override) -> dict:
  """The quantize options of a case, less those this version of quantize lacks."""
  out = {
    k: case[k]
    for k in ('granularity', 'exponent', 'grid', 'clip')
    if case.get(k) is not None
  }
  return {**out, **override}


def row_scales(q: pqjax.QArray) -> np.ndarray:
  """Float32 scale of every row of the (K, N) view, ``(K, ncol)``."""
  k, _ = matrix_shape(q.shape)
  return reference.block_scales(reference.scale_values(q.scale, q.column_scale), k)


def bracket(levels: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The table levels just below and above each ``x``; the extreme one beyond them."""
  lo_i = np.clip(np.searchsorted(levels, x, side='right') - 1, 0, len(levels) - 1)
  hi_i = np.clip(np.searchsorted(levels, x, side='left'), 0, len(levels) - 1)
  return levels[lo_i], levels[hi_i]


def check_decoded(w: np.ndarray, q: pqjax.QArray, decoded: np.ndarray) -> None:
  """Finite, same shape and dtype, no sign flip, and on a level bracketing w / scale."""
  assert decoded.shape == w.shape and decoded.dtype == w.dtype
  d64 = decoded.astype(np.float64)
  assert np.all(np.isfinite(d64))
  w64 = w.astype(np.float64)
  assert np.all((np.sign(d64) == np.sign(w64)) | (d64 == 0)), 'a sign flipped'
  scale = row_scales(q)
  k, n = matrix_shape(q.shape)
  w2 = w.astype(np.float32).reshape(k, n)
  x = w2 / np.where(scale > 0, scale, np.float32(1))
  levels = np.sort(np.asarray(q.table, np.float64))
  # Levels, not thresholds, bound the answer: however a threshold between two levels
  # is rounded, the code picked is one of the two levels around x.
  lo, hi = bracket(levels, x)

  # Decoding multiplies a float32 level by the scale, then rounds to the dtype.
  def to_dtype(level):
    return (level.astype(np.float32) * scale).astype(w.dtype).astype(np.float64)

  got = d64.reshape(k, n)
  lo, hi = to_dtype(lo), to_dtype(hi)
  ok = (got >= np.minimum(lo, hi)) & (got <= np.maximum(lo, hi))
  # XLA on CPU flushes float32 subnormals to zero, in the weights it reads and in
  # the products it writes: there zero is the right answer, off by under 1.2e-38.
  tiny = np.finfo(np.float32).tiny
  flushed = (np.abs(w2) < tiny) | (np.minimum(np.abs(lo), np.abs(hi)) < tiny)
  ok |= flushed & (got == 0)
  bad = np.argwhere(~ok)
  assert not len(bad), (
    f'{len(bad)} elements off their bracketing levels, first at {tuple(bad[0])}:'
    f' w={w2[tuple(bad[0])]!r} scale={scale[bad[0][0], bad[0][1] % scale.shape[1]]!r}'
    f' decoded={got[tuple(bad[0])]!r}'
  )


@settings(derandomize=True, max_examples=30, deadline=None)
@given(cases())
def test_round_trip(case):
  w = values(case['kind'], case['shape'], case['dtype'], case['seed'])
  params = {'w': w}
  params_q, alphas = pqjax.quantize(params, case['bits'], **options(case))
  q = params_q['w']
  assert isinstance(q, pqjax.QArray) and alphas['w'] == pytest.approx(case['exponent'])
  decoded = np.asarray(pqjax.dequantize(params_q)['w'])
  check_decoded(w, q, decoded)
  if case['kind'] == 'zeros':
    assert np.all(decoded == 0)


@settings(derandomize=True, max_examples=20, deadline=None)
@given(cases())
def test_requantizing_gives_the_same_codes(case):
  # The block scale is the absmax here (no clipping), so the decoded weights keep it
  # and re-quantizing them with the same exponent must land on the same codes.
  # Float32 subnormals are left out: XLA flushes them to zero on CPU.
  assume(case['kind'] not in ('tiny', 'denormal'))
  w = values(case['kind'], case['shape'], np.dtype(np.float32), case['seed'])
  opts = options(case, **({'clip': False} if case['clip'] is not None else {}))
  # Float scales: uint8 ones round a block below one step up to it, and its weights
  # may then decode to zeros (tests/test_scales.py checks them where none is).
  opts['scale_dtype'] = 'float32'
  q1, _ = pqjax.quantize({'w': w}, case['bits'], **opts)
  q2, _ = pqjax.quantize(pqjax.dequantize(q1), case['bits'], **opts)
  a, b = q1['w'], q2['w']
  np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
  np.testing.assert_array_equal(np.asarray(a.table), np.asarray(b.table))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


@settings(derandomize=True, max_examples=12, deadline=None)
@given(
  kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16)
)
def test_searched_defaults(kind, dtype, seed):
  """The library's defaults (searched exponent, default grid and clipping)."""
  w = values(kind, (24, 8), dtype, seed)
  params_q, alphas = pqjax.quantize({'w': w}, 4)
  q = params_q['w']
  assert np.isfinite(alphas['w']) and alphas['w'] > 0
  check_decoded(w, q, np.asarray(q.dequantize()))


def test_bracket_reference():
  # The bracket helper itself, on a hand-made table.
  levels = np.array([-1.0, -0.25, 0.0, 0.5, 1.0])
  lo, hi = bracket(levels, np.array([-2.0, -0.5, 0.0, 0.3, 0.5, 2.0]))
  np.testing.assert_array_equal(lo, [-1.0, -1.0, 0.0, 0.0, 0.5, 1.0])
  np.testing.assert_array_equal(hi, [-1.0, -0.25, 0.0, 0.5, 0.5, 1.0])


def test_check_decoded_catches_a_wrong_level():
  w = np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4)
  params_q, _ = pqjax.quantize({'w': w}, 3, exponent=1.0)
  q = params_q['w']
  decoded = np.asarray(q.dequantize()).copy()
  check_decoded(w, q, decoded)
  decoded[2, 1] = -decoded[2, 1] if decoded[2, 1] else 0.9
  with pytest.raises(AssertionError):
    check_decoded(w, q, decoded)


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_near_float32_max(dtype):
  w = np.array([[1.7e38], [-1.7e38], [0.0], [1.0e38]], dtype)
  case = {'granularity': 'tensor', 'exponent': 1.0, 'grid': GRIDS[0], 'clip': CLIPS[0]}
  params_q, _ = pqjax.quantize({'w': w}, 2, **options(case))
  check_decoded(w, params_q['w'], np.asarray(pqjax.dequantize(params_q)['w']))
