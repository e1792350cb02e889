"""Checkpoints of stacked layers: layer axes round trip, and older files still load."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import pqjax
from pqjax import CheckpointError
from pqjax._src.io import safetensors, treespec


@pytest.fixture(scope='module')
def tree():
  rng = np.random.default_rng(0)
  params = {
    'scan': {
      'kernel': rng.standard_normal((3, 24, 16)).astype(np.float32),
      'conv': rng.standard_normal((2, 2, 3, 3, 4, 8)).astype(np.float32),
      'bias': rng.standard_normal((3, 16)).astype(np.float32),
    },
    'head': rng.standard_normal((16, 8)).astype(np.float32),
  }
  axes = {'scan/kernel': 1, 'scan/conv': 2}
  params_q, _ = pqjax.quantize(
    params,
    3,
    granularity=8,
    exponent=0.6,
    layer_axes=lambda path, leaf: axes.get(path, 0),
    filter=lambda path, leaf: path != 'scan/bias',
  )
  return params_q


def _identical(a, b):
  leaves_a, def_a = jax.tree_util.tree_flatten(a)
  leaves_b, def_b = jax.tree_util.tree_flatten(b)
  assert def_a == def_b  # QArray meta fields, layer axes included
  for x, y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_round_trip_keeps_layer_axes(tmp_path, tree, fmt):
  path = tmp_path / ('q.safetensors' if fmt == 'safetensors' else 'q')
  pqjax.save(path, tree, format=fmt)
  loaded = pqjax.load(path)
  _identical(loaded, tree)
  assert loaded['scan']['kernel'].layer_axes == 1
  assert loaded['scan']['conv'].layer_axes == 2
  assert loaded['head'].layer_axes == 0
  np.testing.assert_array_equal(
    np.asarray(pqjax.dequantize(loaded)['scan']['conv']),
    np.asarray(tree['scan']['conv'].dequantize()),
  )


def test_orbax_target_must_agree_on_layer_axes(tmp_path, tree):
  pqjax.save_orbax(tmp_path / 'q', tree)
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  _identical(pqjax.load_orbax(tmp_path / 'q', target=target), tree)
  # The same arrays read as one matrix per leaf: a different tree.
  kernel = np.ones(tree['scan']['kernel'].shape, np.float32)
  flat, _ = pqjax.quantize(kernel, 3, granularity=8, exponent=0.6)
  assert flat.layer_axes == 0
  other = {**tree, 'scan': {**tree['scan'], 'kernel': flat}}
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), other)
  with pytest.raises(CheckpointError, match=r'scan/kernel: .*layer_axes 1 vs None'):
    pqjax.load_orbax(tmp_path / 'q', target=target)


def _spec(path):
  _, meta = safetensors.read(path)
  return json.loads(meta['tree'])


def _qarray_specs(spec):
  if spec.get('type') == 'qarray':
    yield spec
  for v in spec.get('values', []):
    yield from _qarray_specs(v)


def _rewrite(path, out, spec):
  """``path`` with its tree spec replaced, under a consistent checksum."""
  tensors, meta = safetensors.read(path)
  tree_json = json.dumps(spec)
  meta = {**meta, 'tree': tree_json}
  meta['sha256'] = treespec.checksum(meta, tensors)
  save_file(dict(tensors), out, metadata=meta)


def test_files_without_layer_axes_load_as_single_matrices(tmp_path, tree):
  """Older files record no layer axes; such a QArray is one matrix, as it was."""
  plain = {'head': tree['head'], 'b': np.ones(3, np.float32)}
  pqjax.save_safetensors(tmp_path / 'plain.safetensors', plain)
  specs = list(_qarray_specs(_spec(tmp_path / 'plain.safetensors')))
  assert specs and all('layer_axes' not in s for s in specs)
  meta = safetensors.read(tmp_path / 'plain.safetensors')[1]
  assert meta['format_version'] == '1'
  loaded = pqjax.load_safetensors(tmp_path / 'plain.safetensors')
  assert loaded['head'].layer_axes == 0
  _identical(loaded, plain)
  # A stacked leaf stripped of its layer axes no longer matches its arrays.
  pqjax.save_safetensors(tmp_path / 'q.safetensors', tree)
  spec = _spec(tmp_path / 'q.safetensors')
  for s in _qarray_specs(spec):
    s.pop('layer_axes', None)
  _rewrite(tmp_path / 'q.safetensors', tmp_path / 'old.safetensors', spec)
  with pytest.raises(CheckpointError, match='malformed.*codes shape'):
    pqjax.load_safetensors(tmp_path / 'old.safetensors')


@pytest.mark.parametrize('bad', [-1, 'x', 1.0, True, 5])
def test_bad_layer_axes_in_metadata(tmp_path, tree, bad):
  pqjax.save_safetensors(tmp_path / 'q.safetensors', tree)
  spec = _spec(tmp_path / 'q.safetensors')
  for s in _qarray_specs(spec):
    if 'layer_axes' in s:
      s['layer_axes'] = bad
  _rewrite(tmp_path / 'q.safetensors', tmp_path / 'bad.safetensors', spec)
  with pytest.raises(CheckpointError, match='bad.safetensors: malformed'):
    pqjax.load_safetensors(tmp_path / 'bad.safetensors')
