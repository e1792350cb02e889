"""The command line on awkward inputs: broken files, bad arguments, --force, caches."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import serialization
from safetensors import safe_open
from safetensors.numpy import save_file

import pqjax
from pqjax._src.io import treespec
from pqjax.tools import cli
from pqjax.tools.cli import main


def _params():
  rng = np.random.default_rng(0)
  return {
    'dense': {
      'kernel': rng.standard_normal((32, 16)).astype(np.float32),
      'bias': rng.standard_normal(16).astype(np.float32),
    },
    'embed': rng.standard_normal((24, 16)).astype(np.float32),
  }


def _error_line(capsys) -> str:
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1, captured.err
  assert lines[0].startswith('pqjax: error: ') and 'Traceback' not in captured.err
  return lines[0]


def test_garbage_msgpack_says_why(tmp_path, capsys):
  for i, data in enumerate((b'\xc1' + os.urandom(40), b'\x91', b'junk')):
    path = tmp_path / f'g{i}.msgpack'
    path.write_bytes(data)
    assert main(['quantize', str(path), str(tmp_path / 'o.safetensors')]) == 1
    line = _error_line(capsys)
    reason = line.split('not a valid flax msgpack file: ')[1]
    assert str(path) in line and len(reason) > 10, line
  assert not os.path.exists(tmp_path / 'o.safetensors')


def test_string_leaf_fails_before_quantizing(tmp_path, capsys):
  tree = {**_params(), 'meta': {'name': 'bert-tiny', 'step': 7, 'lr': 0.5}}
  path = tmp_path / 'p.msgpack'
  path.write_bytes(serialization.msgpack_serialize(tree))
  out = tmp_path / 'o.safetensors'
  assert main(['quantize', str(path), str(out)]) == 1
  line = _error_line(capsys)
  assert f'{path}: meta/name is a str' in line and 'not an array' in line
  assert not out.exists()
  with pytest.raises(pqjax.CheckpointError, match='meta/name is a str'):
    pqjax.load_float(path)
  # Numbers are arrays of no axes: they pass through and are saved.
  del tree['meta']['name']
  path.write_bytes(serialization.msgpack_serialize(tree))
  assert main(['quantize', str(path), str(out)]) == 0
  loaded = pqjax.load(out)
  assert int(loaded['meta']['step']) == 7 and float(loaded['meta']['lr']) == 0.5
  assert isinstance(loaded['dense']['kernel'], pqjax.QArray)


@pytest.mark.parametrize(
  'argv, message',
  [
    (
      ['quantize', 'a.msgpack', 'b.safetensors', '--bits', '9'],
      "--bits: must be a width in 2..8 or a range LO..HI of them, got '9'",
    ),
    (['quantize', 'a.msgpack', 'b.safetensors', '--bits', 'abc'], "got 'abc'"),
    (
      ['quantize', 'a.msgpack', 'b.safetensors', '--bits-per-weight', 'x'],
      "--bits-per-weight: must be a number, got 'x'",
    ),
    (['quantize', 'a.msgpack'], 'required: output'),
    (['frob'], "invalid choice: 'frob'"),
    ([], 'no command given; use one of quantize, info, report, demo'),
  ],
)
def test_usage_errors_are_one_line(capsys, argv, message):
  with pytest.raises(SystemExit) as exit_:
    main(argv)
  assert exit_.value.code == 2
  line = _error_line(capsys)
  assert message in line and '--help' in line


def test_no_arguments_in_a_new_process():
  run = subprocess.run(
    [sys.executable, '-m', 'pqjax'], capture_output=True, text=True, timeout=120
  )
  assert run.returncode == 2 and run.stdout == ''
  assert run.stderr.startswith('pqjax: error: no command given')
  assert len(run.stderr.splitlines()) == 1


def test_orbax_format_under_a_safetensors_name_is_refused(tmp_path, capsys):
  src = tmp_path / 'p.msgpack'
  src.write_bytes(serialization.msgpack_serialize(_params()))
  out = tmp_path / 'q.safetensors'
  assert main(['quantize', str(src), str(out), '--format', 'orbax']) == 1
  assert '--format orbax writes a folder' in _error_line(capsys)
  assert not os.path.lexists(out)


def test_info_on_deeply_nested_metadata_is_one_line(tmp_path, capsys):
  path = tmp_path / 'q.safetensors'
  pqjax.save(path, pqjax.quantize(_params(), 4)[0])
  with safe_open(path, 'np') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = f.metadata()
  levels = 900
  tree = '{"type":"dict","keys":["a"],"values":[' * levels + meta['tree'] + ']}' * levels
  sha = treespec.checksum({**meta, 'tree': tree}, tensors)
  save_file(tensors, path, metadata={**meta, 'tree': tree, 'sha256': sha})
  assert main(['info', str(path)]) == 1
  line = _error_line(capsys)
  assert str(path) in line and 'nests too deeply' in line


def test_force_replaces_only_files_and_checkpoints(tmp_path, capsys):
  source = tmp_path / 'p.msgpack'
  source.write_bytes(serialization.msgpack_serialize(_params()))
  folder = tmp_path / 'project'
  folder.mkdir()
  (folder / 'train.py').write_text('print(1)')
  assert main(['quantize', str(source), str(folder), '--force']) == 2
  assert 'not a pqjax checkpoint' in _error_line(capsys)
  assert os.listdir(folder) == ['train.py']
  # A pqjax checkpoint folder and a file are replaced.
  ckpt = tmp_path / 'ckpt'
  assert main(['quantize', str(source), str(ckpt), '--bits', '3']) == 0
  assert main(['quantize', str(source), str(ckpt), '--bits', '5', '--force']) == 0
  assert pqjax.load(ckpt)['embed'].bits == 5
  other = tmp_path / 'other.safetensors'
  other.write_bytes(b'anything')
  assert main(['quantize', str(source), str(other), '--force']) == 0
  assert pqjax.load(other)['embed'].bits == 4


def test_output_never_replaces_the_input(tmp_path, capsys):
  source = tmp_path / 'p.safetensors'
  save_file({'w': np.ones((8, 8), np.float32)}, source)
  before = source.read_bytes()
  assert main(['quantize', str(source), str(source), '--force']) != 0
  assert 'replace the input' in _error_line(capsys)
  with pytest.raises(ValueError, match='replace the input'):
    pqjax.quantize_checkpoint(source, source, overwrite=True)
  # Nor a folder holding it.
  with pytest.raises(ValueError, match='replace the input'):
    pqjax.quantize_checkpoint(source, tmp_path, overwrite=True)
  assert source.read_bytes() == before


def test_compile_cache_folder_and_switches(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.config, 'update', lambda *a: calls.append(a))
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  monkeypatch.delenv('PQJAX_NO_COMPILE_CACHE')
  assert cli.cache_dir() == tmp_path / 'xdg' / 'pqjax' / 'jax'
  assert cli.use_compile_cache(False) is None and calls == []
  monkeypatch.setenv('PQJAX_NO_COMPILE_CACHE', '1')
  assert cli.use_compile_cache() is None and calls == []
  monkeypatch.setenv('PQJAX_NO_COMPILE_CACHE', '0')
  assert cli.use_compile_cache() == cli.cache_dir() and cli.cache_dir().is_dir()
  assert ('jax_compilation_cache_dir', str(cli.cache_dir())) in calls
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert cli.cache_dir() == tmp_path / 'home' / '.cache' / 'pqjax' / 'jax'


def _run(argv, env, cwd):
  return subprocess.run(
    [sys.executable, '-m', 'pqjax', *argv],
    capture_output=True,
    text=True,
    env=env,
    cwd=cwd,
    timeout=300,
  )


def test_new_processes_x64_and_the_compile_cache(tmp_path, capsys):
  # In this process: no x64, no cache. In new ones: x64 on, the cache in a
  # temporary folder; the file written is the same, byte for byte.
  tensors = {
    'a.kernel': _params()['dense']['kernel'],
    'a.bias': _params()['dense']['bias'],
    'ids': np.arange(24, dtype=np.int64)[None],
    'empty': np.zeros((0, 16), np.float32),
  }
  source = tmp_path / 'p.safetensors'
  save_file(tensors, source)
  assert main(['quantize', str(source), str(tmp_path / 'ref.safetensors')]) == 0
  env = {k: v for k, v in os.environ.items() if k != 'PQJAX_NO_COMPILE_CACHE'}
  env.update(JAX_ENABLE_X64='1', XDG_CACHE_HOME=str(tmp_path / 'xdg'))
  out = tmp_path / 'x64.safetensors'
  run = _run(['quantize', str(source), str(out)], env, tmp_path)
  assert run.returncode == 0, run.stderr
  assert out.read_bytes() == (tmp_path / 'ref.safetensors').read_bytes()
  cache = tmp_path / 'xdg' / 'pqjax' / 'jax'
  assert len(os.listdir(cache)) >= 3  # statistics, search, encoding at least
  run = _run(
    ['info', str(out), '--no-compile-cache'], {**env, 'XDG_CACHE_HOME': 'x'}, tmp_path
  )
  assert run.returncode == 0 and 'quantized leaves: 1' in run.stdout
  assert not os.path.exists(tmp_path / 'x')
