"""Saving and loading quantized trees: safetensors, Orbax, float checkpoints."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import serialization
from flax.core import FrozenDict
from safetensors.numpy import save_file

import pqjax
from pqjax import CheckpointError, QArray
from pqjax._src.core.qarray import is_qarray
from pqjax._src.io import safetensors, treespec
from pqjax.tools import minilm

GRANULARITIES = ('tensor', 'channel', 8)


def _w(rng, shape, dtype):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.1, dtype)


@pytest.fixture(scope='module')
def tree():
  """Every bits 2..8; tensor, channel and group-8 scales; f32, bf16 and f16 leaves.

  Nested dicts, a list, a tuple, a None leaf, a float bias and an int buffer.
  """
  rng = np.random.default_rng(0)
  blocks = []
  for bits in range(2, 9):
    granularity = GRANULARITIES[bits % 3]
    leaves = {
      'f32': _w(rng, (24, 16), jnp.float32),
      'bf16': _w(rng, (3, 8, 12), jnp.bfloat16),
      'f16': _w(rng, (40, 4), jnp.float16),
    }
    if granularity != 8:
      leaves['ragged'] = _w(rng, (13, 5), jnp.float32)  # K not a whole packing unit
    # Fixed exponents keep the fixture fast; the search is tested elsewhere.
    params_q, _ = pqjax.quantize(
      leaves, bits, granularity=granularity, exponent=0.4 + 0.1 * bits
    )
    blocks.append(params_q)
  return {
    'encoder': {
      'layers': blocks[:4],
      'norm': {'scale': jnp.ones((16,), jnp.bfloat16), 'bias': None},
    },
    'decoder': tuple(blocks[4:]),
    'head': {'kernel': blocks[0]['f32'], 'bias': _w(rng, (16,), jnp.float32)},
    'position_ids': np.arange(7, dtype=np.int32)[None],
    'empty': jnp.zeros((0, 3), jnp.float16),
  }


def assert_identical(a, b):
  """Same structure (QArray bits, shape, dtype included), dtypes and bytes."""
  leaves_a, def_a = jax.tree_util.tree_flatten(a)
  leaves_b, def_b = jax.tree_util.tree_flatten(b)
  assert def_a == def_b
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def test_tree_covers_every_case(tree):
  qs = [
    x for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray) if isinstance(x, QArray)
  ]
  assert {q.bits for q in qs} == set(range(2, 9))
  assert {np.dtype(q.dtype).name for q in qs} == {'float32', 'bfloat16', 'float16'}
  nk_ncol = {(q.scale.shape[0] > 1, q.scale.shape[1] > 1) for q in qs}
  assert nk_ncol == {(False, False), (False, True), (True, True)}


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_round_trip_is_bit_exact(tmp_path, tree, fmt):
  path = tmp_path / ('q.safetensors' if fmt == 'safetensors' else 'q')
  save, load = (
    (pqjax.save_safetensors, pqjax.load_safetensors)
    if fmt == 'safetensors'
    else (pqjax.save_orbax, pqjax.load_orbax)
  )
  save(path, tree)
  loaded = load(path)
  assert_identical(loaded, tree)
  assert isinstance(loaded['decoder'], tuple)
  assert isinstance(loaded['encoder']['layers'], list)
  assert loaded['encoder']['norm']['bias'] is None
  assert loaded['encoder']['norm']['scale'].dtype == jnp.bfloat16
  assert loaded['position_ids'].dtype == np.int32
  assert loaded['empty'].shape == (0, 3) and loaded['empty'].dtype == np.float16
  decode = jax.jit(pqjax.dequantize)  # one compilation for the whole tree
  assert_identical(decode(loaded), decode(tree))
  assert pqjax.nbytes(loaded) == pqjax.nbytes(tree)
  assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left


def test_safetensors_layout_read_by_hand(tmp_path, tree):
  """The file parsed with struct and json only: names, dtypes, packed shapes."""
  path = tmp_path / 'q.safetensors'
  pqjax.save_safetensors(path, tree)
  data = path.read_bytes()
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8 : 8 + size])
  meta = header.pop('__metadata__')
  assert meta['format'] == 'pqjax' and meta['format_version'] == '1'
  q = tree['encoder']['layers'][0]['f32']  # 2 bits, (24, 16): 4 codes a byte
  entry = header['encoder/layers/0/f32.codes']
  assert (entry['dtype'], entry['shape']) == ('U8', [6, 16])
  start, end = entry['data_offsets']
  codes = np.frombuffer(data[8 + size + start : 8 + size + end], np.uint8).reshape(6, 16)
  np.testing.assert_array_equal(codes, np.asarray(q.codes))
  assert header['encoder/layers/1/f32.codes']['shape'] == [9, 16]  # 3 bits: 8 in 3 bytes
  assert header['encoder/layers/2/f32.codes']['shape'] == [12, 16]  # 4 bits: 2 a byte
  assert header['decoder/0/f32.codes']['dtype'] == 'U8'  # 6 bits: 8 in 6 bytes
  assert header['encoder/norm/scale']['dtype'] == 'BF16'
  assert header['head/kernel.alpha']['shape'] == []
  assert 'empty' not in header and 'encoder/norm/bias' not in header
  spec = json.loads(meta['tree'])
  assert spec['type'] == 'dict' and spec['keys'][0] == 'encoder'


def test_orbax_load_with_target(tmp_path, tree):
  pqjax.save_orbax(tmp_path / 'q', tree)
  abstract = jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree
  )
  assert_identical(pqjax.load_orbax(tmp_path / 'q', target=tree), tree)
  assert_identical(pqjax.load_orbax(tmp_path / 'q', target=abstract), tree)
  other = {**tree, 'head': {**tree['head'], 'bias': jnp.zeros((17,))}}
  with pytest.raises(
    CheckpointError, match=r'target does not match .* head/bias: shape \[16\] vs \[17\]'
  ):
    pqjax.load_orbax(tmp_path / 'q', target=other)
  kernel = tree['encoder']['layers'][1]['f32']
  other = {**tree, 'head': {**tree['head'], 'kernel': kernel}}
  with pytest.raises(CheckpointError, match='at head/kernel: bits 2 vs 3'):
    pqjax.load_orbax(tmp_path / 'q', target=other)


@pytest.mark.parametrize(
  'small',
  [
    {},
    jnp.arange(3.0),
    [None, (jnp.ones((2, 2), jnp.bfloat16),)],
    {
      'ints': {1: jnp.ones(2), 0: jnp.zeros(3)},
      'a/b': {'c': jnp.ones(1)},
      'a': {'b': {'c': jnp.zeros(1)}},
    },
    FrozenDict({'x': jnp.ones((2,), jnp.float16)}),
  ],
  ids=['empty', 'root-array', 'lists', 'int-and-clashing-keys', 'frozendict'],
)
@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_small_trees_round_trip(tmp_path, small, fmt):
  path = tmp_path / 'q.safetensors'
  save, load = (
    (pqjax.save_safetensors, pqjax.load_safetensors)
    if fmt == 'safetensors'
    else (pqjax.save_orbax, pqjax.load_orbax)
  )
  save(path, small)
  loaded = load(path)
  assert type(loaded) is type(small)
  assert_identical(loaded, small)


def test_unsupported_nodes_are_refused(tmp_path):
  class Box:
    pass

  for bad, what in (
    ({'a': Box()}, 'a: cannot save.*Box'),
    ({('t',): jnp.ones(1)}, 'dict keys must be str or int'),
    ({'s': 'text'}, 's: cannot save'),
  ):
    with pytest.raises(TypeError, match=what):
      pqjax.save_safetensors(tmp_path / 'x.safetensors', bad)
  assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, tree):
  path = tmp_path / 'q.safetensors'
  path.write_bytes(b'keep')
  with pytest.raises(FileExistsError, match='overwrite=True'):
    pqjax.save_safetensors(path, tree)
  assert path.read_bytes() == b'keep'
  pqjax.save_safetensors(path, tree, overwrite=True)
  assert_identical(pqjax.load_safetensors(path), tree)
  (tmp_path / 'o').mkdir()
  with pytest.raises(FileExistsError):
    pqjax.save_orbax(tmp_path / 'o', tree)
  pqjax.save_orbax(tmp_path / 'o', tree, overwrite=True)
  assert_identical(pqjax.load_orbax(tmp_path / 'o'), tree)
  assert sorted(os.listdir(tmp_path)) == ['o', 'q.safetensors']


def test_failed_writes_leave_nothing(tmp_path, tree, monkeypatch):
  import orbax.checkpoint as ocp

  from pqjax._src.io import atomic

  def broken_fsync(path):  # the data is written, then the disk fills up
    raise OSError('disk full')

  monkeypatch.setattr(atomic, 'fsync', broken_fsync)
  with pytest.raises(OSError, match='disk full'):
    pqjax.save_safetensors(tmp_path / 'q.safetensors', tree)
  assert os.listdir(tmp_path) == []

  (tmp_path / 'old.safetensors').write_bytes(b'old')
  with pytest.raises(OSError, match='disk full'):
    pqjax.save_safetensors(tmp_path / 'old.safetensors', tree, overwrite=True)
  assert os.listdir(tmp_path) == ['old.safetensors']
  assert (tmp_path / 'old.safetensors').read_bytes() == b'old'

  def broken_orbax_save(self, directory, *args, **kwargs):
    os.makedirs(directory)
    (directory / 'partial').write_bytes(b'x')
    raise RuntimeError('interrupted')

  monkeypatch.setattr(ocp.PyTreeCheckpointer, 'save', broken_orbax_save)
  with pytest.raises(RuntimeError, match='interrupted'):
    pqjax.save_orbax(tmp_path / 'o', tree)
  assert os.listdir(tmp_path) == ['old.safetensors']


# --- broken files ------------------------------------------------------------------


@pytest.fixture(scope='module')
def saved(tmp_path_factory, tree):
  path = tmp_path_factory.mktemp('saved') / 'q.safetensors'
  pqjax.save_safetensors(path, tree)
  return path.read_bytes()


def _load_bytes(tmp_path, data, name='x.safetensors'):
  path = tmp_path / name
  path.write_bytes(data)
  return path, (lambda: pqjax.load_safetensors(path))


@pytest.mark.parametrize('keep', [0, 5, 8, 100, -1, -1000])
def test_truncated_file(tmp_path, saved, keep):
  path, load = _load_bytes(tmp_path, saved[:keep] if keep >= 0 else saved[:keep])
  with pytest.raises(CheckpointError, match=f'{path}.*(truncated|not a valid)'):
    load()


def test_every_flipped_header_byte_is_caught(tmp_path, saved):
  size = struct.unpack('<Q', saved[:8])[0]
  rng = np.random.default_rng(1)
  # The length field, the start of every metadata value, and a random sample.
  values = [
    saved.index(f'"{k}":"'.encode()) + len(k) + 4
    for k in ('format', 'format_version', 'pqjax_version', 'sha256')
  ]
  positions = sorted(
    set(range(8)) | set(values) | set(rng.choice(size, 300, replace=False) + 8)
  )
  path = tmp_path / 'x.safetensors'
  for pos in positions:
    data = bytearray(saved)
    data[pos] ^= 1 << int(rng.integers(8))
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(path)):
      pqjax.load_safetensors(path)


def test_flipped_data_byte_fails_the_checksum(tmp_path, saved):
  data = bytearray(saved)
  data[-3] ^= 0x10
  path, load = _load_bytes(tmp_path, bytes(data))
  with pytest.raises(CheckpointError, match=f'{path}: corrupted.*checksum'):
    load()


def test_garbage_file(tmp_path):
  garbage = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
  path, load = _load_bytes(tmp_path, garbage)
  with pytest.raises(CheckpointError, match=str(path)):
    load()
  path, load = _load_bytes(tmp_path, b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": [1, 2]}   ')
  with pytest.raises(CheckpointError, match=str(path)):
    load()


def test_foreign_safetensors_file(tmp_path):
  path = tmp_path / 'plain.safetensors'
  save_file({'w': np.ones((2, 2), np.float32)}, path)
  with pytest.raises(CheckpointError, match=f'{path}: not a pqjax checkpoint'):
    pqjax.load_safetensors(path)
  save_file({'w': np.ones((2, 2), np.float32)}, path, metadata={'format': 'pt'})
  with pytest.raises(CheckpointError, match='not a pqjax checkpoint'):
    pqjax.load_safetensors(path)


def _rewrite(path, out, **changes):
  """Copies a pqjax safetensors file with metadata fields changed (raw tensors kept)."""
  tensors, meta = safetensors.read(path)
  save_file(dict(tensors), out, metadata={**meta, **changes})


def _rewrite_tree(path, out, tree_json):
  """Copies a pqjax safetensors file with another tree spec and the checksum anyone
  can recompute for it, so that the checks of the tree itself are what fail."""
  tensors, meta = safetensors.read(path)
  checksum = treespec.checksum({**meta, 'tree': tree_json}, tensors)
  _rewrite(path, out, tree=tree_json, sha256=checksum)


@pytest.mark.parametrize('version', ['2', '0', 'x'])
def test_unknown_version_is_refused(tmp_path, saved, version):
  path, _ = _load_bytes(tmp_path, saved, 'good.safetensors')
  _rewrite(path, tmp_path / 'v.safetensors', format_version=version)
  with pytest.raises(
    CheckpointError, match=f"v.safetensors: .*version '{version}' is not supported"
  ):
    pqjax.load_safetensors(tmp_path / 'v.safetensors')

  pqjax.save_orbax(tmp_path / 'o', {'w': jnp.ones(2)})
  meta = json.loads((tmp_path / 'o' / 'pqjax.json').read_text())
  (tmp_path / 'o' / 'pqjax.json').write_text(
    json.dumps({**meta, 'format_version': version})
  )
  with pytest.raises(CheckpointError, match='version .* is not supported'):
    pqjax.load_orbax(tmp_path / 'o')


def test_metadata_that_lies_about_tensors(tmp_path, saved):
  path, _ = _load_bytes(tmp_path, saved, 'good.safetensors')
  spec = json.loads(safetensors.read(path)[1]['tree'])
  spec['values'][0]['values'][1]['values'][0]['shape'] = [17]  # encoder/norm/scale
  _rewrite_tree(path, tmp_path / 'bad.safetensors', json.dumps(spec))
  with pytest.raises(CheckpointError, match='malformed.*encoder/norm/scale'):
    pqjax.load_safetensors(tmp_path / 'bad.safetensors')


def _nested(tree_json, levels):
  """A tree spec wrapping ``tree_json`` in ``levels`` dicts (json.dumps would recurse)."""
  return '{"type":"dict","keys":["a"],"values":[' * levels + tree_json + ']}' * levels


@pytest.mark.parametrize('levels', [900, 20_000])
def test_deeply_nested_metadata_is_refused(tmp_path, saved, levels):
  path, _ = _load_bytes(tmp_path, saved, 'good.safetensors')
  deep = tmp_path / 'deep.safetensors'
  _rewrite_tree(path, deep, _nested(safetensors.read(path)[1]['tree'], levels))
  with pytest.raises(CheckpointError, match=f'{deep}: .*nests too deeply'):
    pqjax.load(deep)
  pqjax.save_orbax(tmp_path / 'o', {'w': jnp.ones(2)})
  meta_file = tmp_path / 'o' / 'pqjax.json'
  orbax_meta = json.loads(meta_file.read_text())
  tree_json = _nested(orbax_meta['tree'], levels)
  meta_file.write_text(json.dumps({**orbax_meta, 'tree': tree_json}))
  with pytest.raises(CheckpointError, match=f'{tmp_path / "o"}: .*nests too deeply'):
    pqjax.load(tmp_path / 'o')


def test_deeply_nested_header_is_refused(tmp_path):
  header = b'{"a":' * 5000 + b'1' + b'}' * 5000
  data = len(header).to_bytes(8, 'little') + header
  path, load = _load_bytes(tmp_path, data)
  with pytest.raises(CheckpointError, match=str(path)):
    load()
  (tmp_path / 'o').mkdir()
  (tmp_path / 'o' / 'pqjax.json').write_bytes(header)
  with pytest.raises(CheckpointError, match=str(tmp_path / 'o')):
    pqjax.load_orbax(tmp_path / 'o')


def test_tree_too_deep_to_load_is_not_saved(tmp_path):
  tree = {'w': np.ones(2, np.float32)}
  for _ in range(treespec.MAX_DEPTH):
    tree = {'a': tree}
  with pytest.raises(ValueError, match='nests deeper than'):
    pqjax.save_safetensors(tmp_path / 'deep.safetensors', tree)
  assert not os.path.exists(tmp_path / 'deep.safetensors')
  pqjax.save_safetensors(tmp_path / 'ok.safetensors', tree['a'])
  assert pqjax.load(tmp_path / 'ok.safetensors')['a']['a']['a'] is not None


@pytest.mark.parametrize('dtype', ['bool', 'uint8', 'complex64', 'int4'])
def test_qarray_with_a_non_float_dtype_is_refused(tmp_path, dtype):
  w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
  path = tmp_path / 'good.safetensors'
  pqjax.save_safetensors(path, {'enc': {'w': pqjax.quantize({'w': w}, 4)[0]['w']}})
  spec = json.loads(safetensors.read(path)[1]['tree'])
  spec['values'][0]['values'][0]['dtype'] = dtype
  # The checksum anyone can recompute: the QArray's own checks must refuse it.
  bad = tmp_path / 'bad.safetensors'
  _rewrite_tree(path, bad, json.dumps(spec))
  with pytest.raises(
    CheckpointError, match=f"{bad}: .*QArray 'enc/w': dtype {dtype} is not a floating"
  ):
    pqjax.load(bad)


def test_broken_orbax_directories(tmp_path):
  pqjax.save_orbax(tmp_path / 'o', {'w': jnp.ones((4, 4))})
  with pytest.raises(CheckpointError, match='not a directory'):
    pqjax.load_orbax(tmp_path / 'missing')
  (tmp_path / 'e').mkdir()
  with pytest.raises(CheckpointError, match=f'{tmp_path / "e"}: not a pqjax'):
    pqjax.load_orbax(tmp_path / 'e')
  meta = tmp_path / 'o' / 'pqjax.json'
  good = meta.read_text()
  meta.write_text(good[: len(good) // 2])
  with pytest.raises(CheckpointError, match='corrupted pqjax.json'):
    pqjax.load_orbax(tmp_path / 'o')
  meta.write_text(good)
  for f in (tmp_path / 'o' / 'arrays').rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b'\0' * f.stat().st_size)
  with pytest.raises(CheckpointError, match=str(tmp_path / 'o')):
    pqjax.load_orbax(tmp_path / 'o')


# --- float checkpoints -------------------------------------------------------------


def test_load_float_from_msgpack_orbax_and_safetensors(tmp_path):
  import orbax.checkpoint as ocp

  rng = np.random.default_rng(3)
  dense = {
    'kernel': rng.standard_normal((8, 4)).astype(np.float32),
    'bias': np.zeros(4, np.float32),
  }
  embed = {'embedding': rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16)}
  params = {'dense': dense, 'embed': embed}
  (tmp_path / 'p.msgpack').write_bytes(serialization.msgpack_serialize(params))
  ocp.PyTreeCheckpointer().save((tmp_path / 'orbax').absolute(), params)
  save_file(
    {
      'dense.kernel': dense['kernel'],
      'dense.bias': dense['bias'],
      'embed.embedding': embed['embedding'],
      'embed.position_ids': np.arange(5, dtype=np.int64),
    },
    tmp_path / 'p.safetensors',
  )
  for name in ('p.msgpack', 'orbax', 'p.safetensors'):
    loaded = pqjax.load_float(tmp_path / name)
    for path, want in (
      ('dense/kernel', params['dense']['kernel']),
      ('embed/embedding', params['embed']['embedding']),
    ):
      a, b = path.split('/')
      got = np.asarray(loaded[a][b])
      assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, path)
  ids = pqjax.load_float(tmp_path / 'p.safetensors')['embed']['position_ids']
  assert ids.dtype == np.int64 and list(ids) == list(range(5))


def test_load_float_errors(tmp_path):
  (tmp_path / 'w.bin').write_bytes(b'x')
  with pytest.raises(CheckpointError, match='w.bin: unknown checkpoint format'):
    pqjax.load_float(tmp_path / 'w.bin')
  with pytest.raises(CheckpointError, match='no such file'):
    pqjax.load_float(tmp_path / 'none.msgpack')
  (tmp_path / 'bad.msgpack').write_bytes(b'\xc1\xc1garbage')
  with pytest.raises(CheckpointError, match='bad.msgpack: not a valid flax msgpack'):
    pqjax.load_float(tmp_path / 'bad.msgpack')
  save_file(
    {'a.b': np.ones(2, np.float32), 'a.b.c': np.ones(2, np.float32)},
    tmp_path / 'clash.safetensors',
  )
  with pytest.raises(CheckpointError, match="'a.b' and 'a.b.c' clash"):
    pqjax.load_float(tmp_path / 'clash.safetensors')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(CheckpointError, match='empty directory'):
    pqjax.load_float(tmp_path / 'empty')
  pqjax.save_safetensors(
    tmp_path / 'q.safetensors',
    pqjax.quantize({'w': jnp.ones((8, 8))}, 4, exponent=1.0)[0],
  )
  with pytest.raises(CheckpointError, match='already quantized'):
    pqjax.load_float(tmp_path / 'q.safetensors')


# --- the real model ----------------------------------------------------------------


@pytest.fixture(scope='module')
def minilm_q():
  model = minilm.load()
  params_q, _ = pqjax.quantize(model.params, 4, granularity='channel')
  return params_q


@pytest.mark.slow
def test_minilm_round_trips_bit_exact(tmp_path, minilm_q):
  assert pqjax.nbytes(minilm_q) <= 12.5e6
  pqjax.save_safetensors(tmp_path / 'm.safetensors', minilm_q)
  assert os.path.getsize(tmp_path / 'm.safetensors') <= 12.5e6
  assert_identical(pqjax.load_safetensors(tmp_path / 'm.safetensors'), minilm_q)
  pqjax.save_orbax(tmp_path / 'm', minilm_q)
  assert_identical(pqjax.load_orbax(tmp_path / 'm'), minilm_q)
