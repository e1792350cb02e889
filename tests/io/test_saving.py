"""Saving: racing writers, byte-reproducible files, what overwrite may replace."""

import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

import pqjax
from pqjax._src.io import atomic

SAVERS = {
  'safetensors': ('q.safetensors', pqjax.save_safetensors, pqjax.load_safetensors),
  'orbax': ('q_orbax', pqjax.save_orbax, pqjax.load_orbax),
}


def _tree(seed):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((16, 8)).astype(np.float32)
  return {
    'w': pqjax.quantize({'w': w}, 4)[0]['w'],
    'b': rng.standard_normal(8).astype(np.float32),
    'seed': np.int32(seed),
  }


@pytest.mark.parametrize('fmt', sorted(SAVERS))
def test_racing_writers_one_wins_none_replaces(tmp_path, monkeypatch, fmt):
  name, save, load = SAVERS[fmt]
  path = tmp_path / name
  writers = 4
  # Every writer finishes its temporary copy before any moves it into place, so
  # all of them have seen the path free: the race the final step must settle.
  barrier = threading.Barrier(writers, timeout=60)
  fsync = atomic.fsync

  def wait_then_fsync(p):
    fsync(p)
    barrier.wait()

  monkeypatch.setattr(atomic, 'fsync', wait_then_fsync)
  results = [None] * writers

  def run(i):
    try:
      save(path, _tree(i))
      results[i] = 'saved'
    except FileExistsError as e:
      results[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(writers)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  saved = [i for i, r in enumerate(results) if r == 'saved']
  assert len(saved) == 1, results
  for i, r in enumerate(results):
    if i not in saved:
      assert isinstance(r, FileExistsError) and str(path) in str(r)
  loaded = load(path)
  assert int(loaded['seed']) == saved[0]  # the winner's tree, whole
  np.testing.assert_array_equal(loaded['b'], _tree(saved[0])['b'])
  assert sorted(os.listdir(tmp_path)) == [name]  # no temporary left behind


def test_safetensors_bytes_are_reproducible(tmp_path):
  tree = {
    **_tree(0),
    'z': {f'k{i}': np.full((i + 1,), i, np.float32) for i in range(20)},
    'h': jnp.ones((3, 2), jnp.bfloat16),
    'i': np.arange(6, dtype=np.int64),
  }
  paths = [tmp_path / f'{i}.safetensors' for i in range(3)]
  for p in paths:
    pqjax.save_safetensors(p, tree)
  first = paths[0].read_bytes()
  assert all(p.read_bytes() == first for p in paths[1:])
  # The file is ordinary safetensors: its own reader agrees.
  with safe_open(paths[0], 'np') as f:
    assert json.loads(f.metadata()['tree'])['type'] == 'dict'
    np.testing.assert_array_equal(f.get_tensor('w.codes'), tree['w'].codes)
    np.testing.assert_array_equal(f.get_tensor('i'), tree['i'])
  size = int.from_bytes(first[:8], 'little')
  assert (8 + size) % 8 == 0  # tensor data starts aligned


def test_orbax_metadata_is_reproducible(tmp_path):
  # Orbax's own files carry timestamps and random names; pqjax.json and the
  # arrays do not change.
  tree = _tree(0)
  pqjax.save_orbax(tmp_path / 'a', tree)
  pqjax.save_orbax(tmp_path / 'b', tree)
  meta = [(tmp_path / d / 'pqjax.json').read_bytes() for d in 'ab']
  assert meta[0] == meta[1]
  a, b = pqjax.load_orbax(tmp_path / 'a'), pqjax.load_orbax(tmp_path / 'b')
  np.testing.assert_array_equal(a['w'].codes, b['w'].codes)


@pytest.mark.parametrize('fmt', sorted(SAVERS))
def test_overwrite_replaces_only_files_and_checkpoints(tmp_path, fmt):
  name, save, load = SAVERS[fmt]
  folder = tmp_path / name
  folder.mkdir()
  (folder / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='not a pqjax checkpoint'):
    save(folder, _tree(0), overwrite=True)
  assert (folder / 'notes.txt').read_text() == 'keep me'
  (folder / 'notes.txt').unlink()
  save(folder, _tree(1), overwrite=True)  # an empty folder goes
  assert int(load(folder)['seed']) == 1
  save(folder, _tree(2), overwrite=True)  # so does a checkpoint
  assert int(load(folder)['seed']) == 2
  if fmt == 'orbax':
    (folder / 'extra').write_text('x')  # a checkpoint with something more is kept
    with pytest.raises(FileExistsError, match='not a pqjax checkpoint'):
      save(folder, _tree(3), overwrite=True)


def test_typed_prng_key_is_named(tmp_path):
  class Model(nnx.Module):
    def __init__(self):
      self.linear = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
      self.drop = nnx.Dropout(0.1, rngs=nnx.Rngs(0))

  _, state = nnx.split(Model())
  state_q, _ = pqjax.quantize(state, 4)
  with pytest.raises(TypeError, match=r'to_pure_dict'):
    pqjax.save_safetensors(tmp_path / 'a.safetensors', state_q)
  tree = nnx.to_pure_dict(state_q)
  for save, path in (
    (pqjax.save_safetensors, tmp_path / 'a.safetensors'),
    (pqjax.save_orbax, tmp_path / 'a'),
  ):
    with pytest.raises(TypeError, match=r'^drop/rngs/key: a typed PRNG key array'):
      save(path, tree)
    assert not os.path.exists(path)
  # Its raw data saves.
  tree['drop']['rngs']['key'] = jax.random.key_data(tree['drop']['rngs']['key'])
  pqjax.save_safetensors(tmp_path / 'a.safetensors', tree)


@pytest.mark.parametrize('fmt', ['orbax', 'shards'])
def test_folder_format_under_a_safetensors_name_is_refused(tmp_path, fmt):
  path = tmp_path / 'q.safetensors'
  with pytest.raises(
    ValueError, match=rf'q.safetensors: .*format={fmt!r} writes a folder'
  ):
    pqjax.save(path, _tree(0), format=fmt)
  assert not os.path.lexists(path)
  # Other names in these formats load back.
  pqjax.save(tmp_path / 'q', _tree(0), format=fmt)
  assert pqjax.load(tmp_path / 'q')['seed'] == 0
