"""The command line, end to end on real files."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization
from safetensors.numpy import save_file

import pqjax
from pqjax._src.io import safetensors
from pqjax.tools import minilm
from pqjax.tools.cli import main, native_line


@pytest.fixture(scope='module')
def params():
  rng = np.random.default_rng(0)
  return {
    'dense': {
      'kernel': rng.standard_normal((32, 16)).astype(np.float32),
      'bias': rng.standard_normal(16).astype(np.float32),
    },
    'embed': {'embedding': rng.standard_normal((24, 16)).astype(np.float32)},
  }


@pytest.fixture
def inputs(tmp_path, params):
  (tmp_path / 'p.msgpack').write_bytes(serialization.msgpack_serialize(params))
  ocp.PyTreeCheckpointer().save((tmp_path / 'orbax_in').absolute(), params)
  save_file(
    {
      'dense.kernel': params['dense']['kernel'],
      'dense.bias': params['dense']['bias'],
      'embed.embedding': params['embed']['embedding'],
      'embed.position_ids': np.arange(24, dtype=np.int64)[None],
    },
    tmp_path / 'p.safetensors',
  )
  return tmp_path


def summary_numbers(s):
  """The numbers of a Summary as the table prints them."""
  rows = [
    (
      r.path,
      str(r.bits),
      f'{r.exponent:.4f}',
      f'{r.bytes_before:,}',
      f'{r.bytes_after:,}',
      f'{r.bits_per_weight:.3f}',
    )
    for r in s.leaves
  ]
  return rows, f'total: {s.total_before:,} -> {s.total_after:,} bytes'


def printed_numbers(text):
  rows = []
  for line in text.splitlines()[2:]:
    if not line.strip():
      break
    cells = line.split()
    rows.append((cells[0], cells[3], cells[5], cells[-3], cells[-2], cells[-1]))
  (total,) = [x for x in text.splitlines() if x.startswith('total: ')]
  return rows, total.split(' (')[0]


@pytest.mark.parametrize(
  'source, out',
  [
    ('p.msgpack', 'q.safetensors'),
    ('p.safetensors', 'q_orbax'),
    ('orbax_in', 'q.safetensors'),
  ],
)
def test_quantize_then_info(inputs, params, capsys, source, out):
  code = main(
    [
      'quantize',
      str(inputs / source),
      str(inputs / out),
      '--bits',
      '3',
      '--granularity',
      '8',
      '--exponent',
      '0.6',
    ]
  )
  printed = capsys.readouterr().out
  assert code == 0
  loaded = pqjax.load(inputs / out)
  assert os.path.isdir(inputs / out) == (out == 'q_orbax')
  want, _ = pqjax.quantize(params, 3, granularity=8, exponent=0.6)
  for name in ('dense', 'embed'):
    kernel = 'kernel' if name == 'dense' else 'embedding'
    got, ref = loaded[name][kernel], want[name][kernel]
    assert got.bits == 3 and got.scale.shape == (got.shape[0] // 8, 16)
    np.testing.assert_array_equal(got.codes, ref.codes)
    np.testing.assert_array_equal(got.scale, ref.scale)
  np.testing.assert_array_equal(loaded['dense']['bias'], params['dense']['bias'])
  if source == 'p.safetensors':
    ids = loaded['embed']['position_ids']
    assert ids.dtype == np.int64 and ids.tolist() == [list(range(24))]

  s = pqjax.summary(loaded)
  assert printed_numbers(printed) == summary_numbers(s)
  assert main(['info', str(inputs / out)]) == 0
  info = capsys.readouterr().out
  assert info == f'{s}\n{native_line()}\n'
  info = info.removesuffix(f'{native_line()}\n')
  assert printed_numbers(info) == summary_numbers(s)


def test_format_flag_and_defaults(inputs, capsys):
  assert (
    main(
      [
        'quantize',
        str(inputs / 'p.msgpack'),
        str(inputs / 'q.bin'),
        '--format',
        'safetensors',
      ]
    )
    == 0
  )
  loaded = pqjax.load_safetensors(inputs / 'q.bin')
  assert loaded['dense']['kernel'].bits == 4
  assert loaded['dense']['kernel'].scale.shape == (1, 16)  # per channel
  assert (
    main(
      [
        'quantize',
        str(inputs / 'p.msgpack'),
        str(inputs / 'q_dir'),
        '--granularity',
        'tensor',
        '--exponent',
        'global',
      ]
    )
    == 0
  )
  loaded = pqjax.load_orbax(inputs / 'q_dir')
  kernel, table = loaded['dense']['kernel'], loaded['embed']['embedding']
  assert kernel.scale.shape == (1, 1) and float(kernel.alpha) == float(table.alpha)


def test_grid_and_clip_flags(inputs, params):
  for i, (flags, kwargs) in enumerate(
    (
      (['--grid', 'symmetric', '--clip', 'off'], dict(grid='symmetric', clip=False)),
      (['--clip', 'block'], dict(clip='block')),
      (['--clip', '0.8', '--exponent', '0.7'], dict(clip=0.8, exponent=0.7)),
      (['--granularity', '4'], dict(granularity=4)),  # 8 blocks a column: uint8
      (
        ['--granularity', '4', '--scale-dtype', 'float16'],
        dict(granularity=4, scale_dtype='float16'),
      ),
    )
  ):
    out = inputs / f'q{i}.safetensors'
    assert main(['quantize', str(inputs / 'p.msgpack'), str(out), *flags]) == 0
    got = pqjax.load_safetensors(out)['dense']['kernel']
    want = pqjax.quantize(params, 4, **kwargs)[0]['dense']['kernel']
    assert got.grid == want.grid and got.scale.dtype == want.scale.dtype
    np.testing.assert_array_equal(got.codes, want.codes)
    np.testing.assert_array_equal(got.scale, want.scale)
    np.testing.assert_array_equal(got.block_scale(), want.block_scale())


def test_layer_axes_flag(tmp_path, capsys):
  rng = np.random.default_rng(1)
  scale = (1.5 ** np.arange(4, dtype=np.float32))[:, None, None]
  params = {
    'layers': {
      'kernel': rng.standard_normal((4, 32, 16)).astype(np.float32) * scale,
      'bias': rng.standard_normal((4, 16)).astype(np.float32),
    },
    'embed': rng.standard_normal((24, 16)).astype(np.float32),
  }
  pqjax.save_safetensors(tmp_path / 'f.safetensors', params)
  out = tmp_path / 'q.safetensors'
  argv = ['quantize', str(tmp_path / 'f.safetensors'), str(out), '--layer-axes', '1']
  assert main(argv) == 0
  printed = capsys.readouterr().out
  loaded = pqjax.load_safetensors(out)
  # Only leaves with room for a (K, N) layer are stacks; the others stay whole.
  axes = {'layers/kernel': 1}
  want, alphas = pqjax.quantize(
    params, 4, layer_axes=lambda path, leaf: axes.get(path, 0)
  )
  assert alphas['layers']['kernel'].shape == (4,)
  for got, ref in [
    (loaded['layers']['kernel'], want['layers']['kernel']),
    (loaded['layers']['bias'], want['layers']['bias']),
    (loaded['embed'], want['embed']),
  ]:
    assert got.layer_axes == ref.layer_axes
    for f in ('codes', 'scale', 'alpha', 'table'):
      np.testing.assert_array_equal(np.asarray(getattr(got, f)), getattr(ref, f))
  assert loaded['layers']['kernel'].layer_axes == 1
  assert main(['info', str(out)]) == 0
  info = capsys.readouterr().out.removesuffix(f'{native_line()}\n')
  assert info.strip() == str(pqjax.summary(loaded))
  assert info.splitlines()[0].split()[2] == 'layers'
  (row,) = [x.split() for x in info.splitlines() if x.startswith('layers/kernel ')]
  lo, hi = np.min(alphas['layers']['kernel']), np.max(alphas['layers']['kernel'])
  assert row[2] == '4' and row[6] == f'{lo:.4f}..{hi:.4f}'
  assert info.strip() in printed
  for bad in ('-1', 'x', '1.5'):
    with pytest.raises(SystemExit) as e:
      main([*argv[:-1], bad])
    assert e.value.code == 2
    assert 'must be a non-negative integer' in capsys.readouterr().err


def test_force(inputs, capsys):
  out = inputs / 'q.safetensors'
  argv = ['quantize', str(inputs / 'p.msgpack'), str(out), '--bits', '2']
  assert main(argv) == 0
  before = out.read_bytes()
  capsys.readouterr()
  assert main([*argv[:-1], '5']) == 2
  err = capsys.readouterr().err
  assert 'exists' in err and '--force' in err and str(out) in err
  assert out.read_bytes() == before
  assert main([*argv[:-1], '5', '--force']) == 0
  assert pqjax.load_safetensors(out)['dense']['kernel'].bits == 5
  assert sorted(os.listdir(inputs)) == [
    'orbax_in',
    'p.msgpack',
    'p.safetensors',
    'q.safetensors',
  ]
  # An existing Orbax directory is replaced the same way.
  (inputs / 'q_dir').mkdir()
  assert main(['quantize', str(inputs / 'p.msgpack'), str(inputs / 'q_dir')]) == 2
  assert os.listdir(inputs / 'q_dir') == []
  assert (
    main(['quantize', str(inputs / 'p.msgpack'), str(inputs / 'q_dir'), '--force']) == 0
  )
  assert sorted(os.listdir(inputs / 'q_dir')) == ['arrays', 'pqjax.json']


@pytest.mark.parametrize(
  'argv, message',
  [
    (['quantize', '{d}/missing.msgpack', '{d}/o.safetensors'], 'no such file'),
    (['quantize', '{d}/w.bin', '{d}/o.safetensors'], 'unknown checkpoint format'),
    (
      ['quantize', '{d}/p.msgpack', '{d}/o.safetensors', '--exponent', '-1'],
      'exponent must be',
    ),
    (['quantize', '{d}/p.msgpack', '{d}/o.safetensors', '--clip', '1.5'], 'clip must be'),
    (['quantize', '{d}/p.msgpack', '{d}/nodir/o.safetensors'], 'not a directory'),
    (['info', '{d}/p.safetensors'], 'not a pqjax checkpoint'),
    (['info', '{d}/w.bin'], 'truncated or not a safetensors file'),
    (['info', '{d}/orbax_in'], 'not a pqjax Orbax checkpoint'),
  ],
)
def test_errors_are_clean(inputs, capsys, argv, message):
  (inputs / 'w.bin').write_bytes(b'junk')
  argv = [a.format(d=inputs) for a in argv]
  assert main(argv) == 1
  captured = capsys.readouterr()
  assert captured.err.startswith('pqjax: error: ') and message in captured.err
  assert 'Traceback' not in captured.err and captured.out == ''
  assert not os.path.exists(inputs / 'o.safetensors')


def test_subprocess_has_no_traceback(tmp_path):
  (tmp_path / 'x.safetensors').write_bytes(os.urandom(64))
  run = subprocess.run(
    [sys.executable, '-m', 'pqjax', 'info', str(tmp_path / 'x.safetensors')],
    capture_output=True,
    text=True,
  )
  assert run.returncode == 1
  assert run.stderr.startswith('pqjax: error: ') and 'Traceback' not in run.stderr
  assert str(tmp_path / 'x.safetensors') in run.stderr


@pytest.mark.slow
def test_quantize_minilm_safetensors(tmp_path, capsys):
  source = minilm.model_dir() / 'model.safetensors'
  out = tmp_path / 'minilm-4bit.safetensors'
  assert main(['quantize', str(source), str(out), '--bits', '4']) == 0
  printed = capsys.readouterr().out
  loaded = pqjax.load_safetensors(out)
  tensors, _ = safetensors.read(source)
  ids = loaded['embeddings']['position_ids']
  assert ids.dtype == np.int64
  np.testing.assert_array_equal(ids, tensors['embeddings.position_ids'])
  query = loaded['encoder']['layer']['0']['attention']['self']['query']
  assert query['weight'].shape == (384, 384) and query['weight'].bits == 4
  np.testing.assert_array_equal(  # biases stay float, untouched
    query['bias'], tensors['encoder.layer.0.attention.self.query.bias']
  )
  leaves = jax.tree_util.tree_leaves(
    loaded, is_leaf=lambda x: isinstance(x, pqjax.QArray)
  )
  quantized = [x for x in leaves if isinstance(x, pqjax.QArray)]
  assert len(quantized) == 40
  assert pqjax.nbytes(loaded) <= 12.5e6 and os.path.getsize(out) <= 12.5e6
  s = pqjax.summary(loaded)
  assert printed_numbers(printed) == summary_numbers(s)
  # Decoding the file gives back the float weights up to 4-bit error.
  w = tensors['encoder.layer.0.intermediate.dense.weight']
  w_hat = np.asarray(
    jnp.asarray(
      loaded['encoder']['layer']['0']['intermediate']['dense']['weight'].dequantize()
    )
  )
  assert np.sum((w - w_hat) ** 2) / np.sum(w**2) < 0.03


def test_info_says_how_products_run(capsys, monkeypatch):
  assert main(['info']) == 0
  line = capsys.readouterr().out.strip()
  status = pqjax.native_status()
  if status.loaded:
    assert line.startswith(f'products: native CPU kernels, {status.level}')
  else:
    assert line == f'products: XLA paths ({status.reason})'
  out = subprocess.run(
    [sys.executable, '-m', 'pqjax', 'info'],
    env={**os.environ, 'PQJAX_NATIVE': '0'},
    capture_output=True,
    text=True,
  )
  assert out.stdout.strip() == 'products: XLA paths (disabled by PQJAX_NATIVE=0)'
