"""pqjax.summary and pqjax.nbytes against sizes worked out from the packing layout."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import pqjax


def packed_bytes(k: int, n: int, bits: int) -> int:
  """Bytes of packed codes: along K, 4 (2 bits), 8 in 3 bytes (3), 2 (4) or 1 a byte."""
  if bits == 2:
    return math.ceil(k / 4) * n
  if bits == 3:
    return math.ceil(k / 8) * 3 * n
  if bits == 4:
    return math.ceil(k / 2) * n
  return k * n


def qarray_bytes(shape, bits, scales, scale_bytes=4, grid='full'):
  k, n = math.prod(shape[:-1]), shape[-1]
  levels = 2**bits - (grid == 'symmetric')
  return packed_bytes(k, n, bits) + scale_bytes * scales + 4 + 4 * levels


@pytest.fixture(scope='module')
def tree():
  rng = np.random.default_rng(0)
  w = lambda shape, dtype: jnp.asarray(rng.standard_normal(shape), dtype)
  params = {
    'enc': {'kernel': w((3, 5, 16), jnp.bfloat16), 'bias': w((16,), jnp.float32)},
    'emb': [w((30, 7), jnp.float16)],
    'ids': np.arange(6, dtype=np.int32),
    'none': None,
  }
  q3, _ = pqjax.quantize(params, 3, granularity=5, exponent=0.7)
  q6, _ = pqjax.quantize(
    {'w': w((9, 4), jnp.float32)}, 6, granularity='tensor', exponent=0.5
  )
  return params, {**q3, 'extra': q6}


def test_leaf_rows_match_the_layout(tree):
  params, params_q = tree
  s = pqjax.summary(params_q)
  assert isinstance(s, pqjax.Summary)
  rows = {x.path: x for x in s.leaves}
  assert list(rows) == ['emb/0', 'enc/kernel', 'extra/w']

  r = rows['enc/kernel']
  assert (r.shape, r.dtype, r.bits, r.blocks) == ((3, 5, 16), 'bfloat16', 3, (3, 16))
  assert r.granularity == 'group 5'
  assert r.bytes_before == 3 * 5 * 16 * 2
  assert r.bytes_after == qarray_bytes((3, 5, 16), 3, 3 * 16, scale_bytes=2)
  assert r.bits_per_weight == 8 * r.bytes_after / (3 * 5 * 16)
  assert r.exponent == pytest.approx(0.7)

  r = rows['emb/0']
  assert (r.blocks, r.granularity, r.bytes_before) == ((6, 7), 'group 5', 30 * 7 * 2)
  assert r.bytes_after == qarray_bytes((30, 7), 3, 6 * 7, scale_bytes=2)

  r = rows['extra/w']
  assert (r.bits, r.blocks, r.granularity) == (6, (1, 1), 'tensor')
  assert r.bytes_after == qarray_bytes((9, 4), 6, 1)
  assert r.exponent == pytest.approx(0.5)


def test_totals(tree):
  params, params_q = tree
  s = pqjax.summary(params_q)
  assert (s.float_leaves, s.float_bytes) == (1, 16 * 4)
  assert (s.other_leaves, s.other_bytes) == (1, 6 * 4)
  assert s.total_after == pqjax.nbytes(params_q)
  assert s.total_before == pqjax.nbytes(params) + 9 * 4 * 4
  assert s.ratio == pytest.approx(s.total_before / s.total_after)


def test_channel_granularity_and_empty_tree():
  q, _ = pqjax.quantize({'w': jnp.ones((8, 3))}, 4, exponent=1.0)
  (row,) = pqjax.summary(q).leaves
  assert (row.blocks, row.granularity) == ((1, 3), 'channel')
  assert row.bytes_after == qarray_bytes((8, 3), 4, 3)
  empty = pqjax.summary({})
  assert empty.leaves == () and empty.total_after == 0 and empty.ratio == 1.0
  assert 'total: 0 -> 0 bytes' in str(empty)


def test_table_text(tree):
  _, params_q = tree
  s = pqjax.summary(params_q)
  text = s.format()
  assert text == str(s)
  lines = text.splitlines()
  assert lines[0].split() == [
    'path',
    'shape',
    'dtype',
    'bits',
    'grid',
    'exponent',
    'scales',
    'bytes',
    'before',
    'bytes',
    'after',
    'bits/weight',
  ]
  for r in s.leaves:
    (line,) = [x for x in lines if x.startswith(r.path + ' ')]
    cells = line.split()
    assert cells[1] == 'x'.join(map(str, r.shape)) and cells[2] == r.dtype
    assert cells[3] == str(r.bits) and cells[-3:] == [
      f'{r.bytes_before:,}',
      f'{r.bytes_after:,}',
      f'{r.bits_per_weight:.3f}',
    ]
  assert f'total: {s.total_before:,} -> {s.total_after:,} bytes' in text
  weights = sum(np.prod(r.shape) for r in s.leaves)
  assert f'({8 * s.quantized_after / weights:.3f} bits/weight)' in text


def test_public_names():

  assert pqjax.summary is pqjax.summary and pqjax.nbytes is pqjax.nbytes
  assert pqjax.nbytes({'a': np.zeros(3, np.float32)}) == 12
  assert pqjax.summary({}).leaves == ()
