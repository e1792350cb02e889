"""pqjax.summary and pqjax.nbytes against sizes worked out from the packing layout."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import pqjax


def packed_bytes(k: int, n: int, bits: int) -> int:
  """Bytes of packed codes along K: 4 a byte (2 bits), 2 a byte (4), 8 in ``bits``
  bytes (3, 5, 6, 7) or 1 a byte (8)."""
  if bits == 2:
    return math.ceil(k / 4) * n
  if bits == 4:
    return math.ceil(k / 2) * n
  if bits == 8:
    return k * n
  return math.ceil(k / 8) * bits * n


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

  assert r.scale_dtype == 'float16'  # 3 groups a column

  r = rows['emb/0']
  assert (r.blocks, r.granularity, r.bytes_before) == ((6, 7), 'group 5', 30 * 7 * 2)
  # 6 groups a column: a uint8 scale each, and a float32 scale per column.
  assert r.scale_dtype == 'uint8'
  assert r.bytes_after == qarray_bytes((30, 7), 3, 6 * 7, scale_bytes=1) + 4 * 7

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


def test_stacked_layers():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 3, 20, 8)).astype(np.float32)
  w *= np.float32(2.0) ** np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1)
  params_q, alphas = pqjax.quantize(
    {'scan': w, 'w': w[0, 0]}, 3, granularity=5, layer_axes=lambda p, x: x.ndim - 2
  )
  rows = {x.path: x for x in pqjax.summary(params_q).leaves}
  r = rows['scan']
  assert (r.layers, r.layer_count, r.blocks, r.granularity) == (
    (2, 3),
    6,
    (4, 8),
    'group 5',
  )
  want = [float(a) for a in alphas['scan'].reshape(-1)]
  assert r.exponents == tuple(want)
  assert r.exponent == pytest.approx(np.mean(want))
  assert r.exponent_range == (min(want), max(want)) and min(want) < max(want)
  # Every layer stores its codes, scales, exponent and table.
  assert r.bytes_after == 6 * qarray_bytes((20, 8), 3, 4 * 8, scale_bytes=2)
  assert r.bits_per_weight == 8 * r.bytes_after / w.size
  plain = rows['w']
  assert (plain.layers, plain.exponents, plain.layer_count) == ((), (), 1)
  assert plain.exponent_range == (plain.exponent, plain.exponent)

  lines = pqjax.summary(params_q).format().splitlines()
  assert lines[0].split()[:4] == ['path', 'shape', 'layers', 'dtype']
  (scan,) = [x.split() for x in lines if x.startswith('scan ')]
  (one,) = [x.split() for x in lines if x.startswith('w ')]
  assert scan[1:3] == ['2x3x20x8', '6'] and one[1:3] == ['20x8', '-']
  assert scan[6] == f'{min(want):.4f}..{max(want):.4f}'
  assert scan[7] == '192' and one[7] == '32'  # scales in all
  # Trees without stacked layers keep the table as it was.
  flat_lines = pqjax.summary({'w': params_q['w']}).format().splitlines()
  assert 'layers' not in flat_lines[0]


def test_relative_error_checks_its_arguments():
  rng = np.random.default_rng(1)
  params = {
    'enc': {'kernel': rng.standard_normal((16, 8)).astype(np.float32)},
    'emb': [rng.standard_normal((30, 7)).astype(np.float32)],
    'ids': np.arange(6, dtype=np.int32),
  }
  q, _ = pqjax.quantize(params, 4)
  assert 0 < pqjax.relative_error(params, q) < 0.1
  for first, second in ((q, params), (q, q)):
    with pytest.raises(ValueError, match=r'first argument .* emb/0 is a QArray'):
      pqjax.relative_error(first, second)
  short = {**params, 'emb': [params['emb'][0][:1]]}
  with pytest.raises(ValueError, match=r'^emb/0: shape \(1, 7\) .* \(30, 7\)'):
    pqjax.relative_error(short, q)
  fewer = {k: v for k, v in params.items() if k != 'ids'}
  with pytest.raises(ValueError, match=r'different structures.* ids'):
    pqjax.relative_error(fewer, q)
  with pytest.raises(ValueError, match=r'different structures'):
    pqjax.relative_error({'a': params['emb'][0]}, {'b': q['emb'][0]})
  with pytest.raises(ValueError, match=r'^emb/0: .* not a float array'):
    pqjax.relative_error({**params, 'emb': ['x']}, q)
