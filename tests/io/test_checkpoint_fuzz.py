"""Fuzzing the checkpoint loader: every mutated file loads intact or fails cleanly."""

import contextlib
import copy
import inspect
import json
import random
import shutil
import signal
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import pqjax
from pqjax import CheckpointError, QArray
from pqjax._src.core.qarray import DATA_FIELDS, is_qarray
from pqjax._src.io import orbax, safetensors, treespec

SECONDS_PER_LOAD = 60


@pytest.fixture(scope='module')
def tree():
  """A small quantized tree: bits 2, 3, 4 and 8; f32, bf16 and f16; odd containers."""
  rng = np.random.default_rng(0)
  w = lambda shape, dtype: (rng.standard_normal(shape) * 0.1).astype(dtype)  # noqa: E731
  params = {
    'a': {'kernel': w((8, 6), np.float32), 'bias': w((6,), np.float32)},
    'b': [w((2, 3, 4), ml_dtypes.bfloat16), None],
    'c': (w((5, 4), np.float16), np.arange(3, dtype=np.int32)),
  }
  # A fixed exponent and no clipping search: the loader, not the search, is tested.
  fixed = {
    'exponent': 0.7,
    **({'clip': False} if 'clip' in inspect.signature(pqjax.quantize).parameters else {}),
  }
  out = {}
  for bits in (2, 3, 4, 8):
    out[f'q{bits}'], _ = pqjax.quantize(
      params, bits, granularity='tensor' if bits == 3 else 'channel', **fixed
    )
  return out


@pytest.fixture(scope='module')
def saved(tree, tmp_path_factory):
  root = tmp_path_factory.mktemp('fuzz')
  pqjax.save_safetensors(root / 'm.safetensors', tree)
  pqjax.save_orbax(root / 'm_orbax', tree)
  return root


def leaves(tree):
  return jax.tree_util.tree_flatten(tree, is_leaf=is_qarray)


def same_tree(a, b) -> bool:
  """Same structure, same QArray metadata, and bit-identical arrays."""
  (la, ta), (lb, tb) = leaves(a), leaves(b)
  if ta != tb or len(la) != len(lb):
    return False
  for x, y in zip(la, lb):
    if isinstance(x, QArray) != isinstance(y, QArray):
      return False
    if isinstance(x, QArray):
      if (x.bits, x.shape, np.dtype(x.dtype)) != (y.bits, y.shape, np.dtype(y.dtype)):
        return False
      pairs = [(getattr(x, f), getattr(y, f)) for f in DATA_FIELDS]
    else:
      pairs = [(x, y)]
    for u, v in pairs:
      if (u is None) != (v is None):
        return False
      if u is not None and (
        np.asarray(u).dtype != np.asarray(v).dtype
        or np.asarray(u).tobytes() != np.asarray(v).tobytes()
        or np.shape(u) != np.shape(v)
      ):
        return False
  return True


@contextlib.contextmanager
def deadline(seconds: int):
  def stop(*_):
    raise TimeoutError(f'a load took over {seconds} s')

  old = signal.signal(signal.SIGALRM, stop)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def outcome(load, original, resigned: bool = False) -> str:
  """``"error"``, ``"same"`` or, for a re-signed file, ``"usable"``; else it fails."""
  try:
    with deadline(SECONDS_PER_LOAD):
      got = load()
  except CheckpointError:
    return 'error'
  if same_tree(got, original):
    return 'same'
  # A file whose checksum was recomputed after the edit is self-consistent; it may
  # describe another tree, but that tree must be usable.
  assert resigned, 'a corrupted checkpoint loaded with different data'
  with deadline(SECONDS_PER_LOAD):
    jax.block_until_ready(pqjax.dequantize(got))
  return 'usable'


# --- safetensors -------------------------------------------------------------------


def split(data: bytes) -> tuple[dict, bytes]:
  size = int.from_bytes(data[:8], 'little')
  return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict, body: bytes) -> bytes:
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text + body


def byte_mutations(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
  """Bit flips, truncations and insertions at positions spread over the file."""
  n = len(data)
  header_end = 8 + int.from_bytes(data[:8], 'little')
  spots = sorted(
    {0, 1, 7, 8, 9, header_end - 1, header_end, n - 1}
    | {rng.randrange(n) for _ in range(40)}
  )
  out = []
  for i in spots:
    bit = 1 << rng.randrange(8)
    out.append(
      (f'flip bit {bit} of byte {i}', data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :])
    )
  for cut in sorted({0, 3, 8, header_end // 2, header_end, (header_end + n) // 2, n - 1}):
    out.append((f'truncate to {cut}', data[:cut]))
  for i in (0, 8, header_end // 2, header_end, n):
    out.append((f'insert at {i}', data[:i] + b'\x00\xff{' + data[i:]))
  out.append(('length field huge', (2**63).to_bytes(8, 'little') + data[8:]))
  out.append(('empty header', join({}, b'')))
  return out


def tensor_mutations(header: dict, body: bytes) -> list[tuple[str, bytes]]:
  """Safetensors index edits: dtypes, shapes, offsets, swapped tensors."""
  names = sorted(k for k in header if k != '__metadata__')
  a, b = names[0], names[-1]
  out = []

  def edited(label, fn):
    h = copy.deepcopy(header)
    fn(h)
    out.append((label, join(h, body)))

  for name in (a, b):
    for dtype in ('F32', 'I8', 'BF16', 'F64', 'BOOL', 'XX'):
      edited(f'{name} dtype {dtype}', lambda h, n=name, d=dtype: h[n].update(dtype=d))
    edited(
      f'{name} shape reversed', lambda h, n=name: h[n].update(shape=h[n]['shape'][::-1])
    )
    edited(f'{name} shape [0]', lambda h, n=name: h[n].update(shape=[0]))
    edited(f'{name} shape [-1]', lambda h, n=name: h[n].update(shape=[-1]))
    edited(f'{name} shape huge', lambda h, n=name: h[n].update(shape=[2**40, 2**40]))
    edited(
      f'{name} offsets reversed',
      lambda h, n=name: h[n].update(data_offsets=h[n]['data_offsets'][::-1]),
    )
    edited(
      f'{name} offsets past the end',
      lambda h, n=name: h[n].update(data_offsets=[0, len(body) + 8]),
    )
    edited(
      f'{name} offsets strings', lambda h, n=name: h[n].update(data_offsets=['0', '1'])
    )
    edited(f'{name} removed', lambda h, n=name: h.pop(n))
  edited('two tensors swapped', lambda h: h.update({a: h[b], b: h[a]}))
  edited('metadata removed', lambda h: h.pop('__metadata__'))
  edited('metadata not strings', lambda h: h.update(__metadata__={'format': 1}))
  return out


def metadata_mutations(meta: dict) -> list[tuple[str, dict]]:
  """Edits of pqjax's metadata and of the tree spec inside it."""
  spec = json.loads(meta['tree'])
  out = [
    ('format', {**meta, 'format': 'other'}),
    ('version newer', {**meta, 'format_version': '2'}),
    ('version int', {**meta, 'format_version': 1}),
    ('tree not json', {**meta, 'tree': '{"type": '}),
    ('tree a list', {**meta, 'tree': '[]'}),
    ('sha256 removed', {k: v for k, v in meta.items() if k != 'sha256'}),
  ]

  def nodes(node, path=()):
    yield path, node
    if isinstance(node, dict):
      for k, v in node.items():
        yield from nodes(v, (*path, k))
    elif isinstance(node, list):
      for i, v in enumerate(node):
        yield from nodes(v, (*path, i))

  def at(root, path):
    for p in path:
      root = root[p]
    return root

  edits = []
  for path, node in nodes(spec):
    if not isinstance(node, dict):
      continue
    kind = node.get('type')
    if kind == 'qarray':
      for bits in (0, 1, 9, '4', 4.0, None, True):
        edits.append((f'{path} bits {bits!r}', path, 'bits', bits))
      for shape in ([], [3], [1, 1], [-1, 4], [2**62, 2], 'x', [1.5, 2]):
        edits.append((f'{path} shape {shape!r}', path, 'shape', shape))
      for dtype in ('int8', 'float64', 'bool', 'object', 'U3', 'nope', 3):
        edits.append((f'{path} dtype {dtype!r}', path, 'dtype', dtype))
      edits.append((f'{path} fields missing', path, 'fields', {}))
      edits.append((f'{path} fields list', path, 'fields', []))
    elif kind == 'array':
      for shape in ([2**62], [-3], None, [[1]]):
        edits.append((f'{path} shape {shape!r}', path, 'shape', shape))
      for dtype in ('float16', 'V8', 'complex128', 'str', None):
        edits.append((f'{path} dtype {dtype!r}', path, 'dtype', dtype))
      edits.append((f'{path} name missing', path, 'name', 'nope'))
      edits.append((f'{path} name null', path, 'name', None))
    elif kind in ('dict', 'frozendict'):
      edits.append((f'{path} keys short', path, 'keys', node['keys'][:-1]))
      edits.append((f'{path} keys objects', path, 'keys', [{}] * len(node['keys'])))
      edits.append((f'{path} values not a list', path, 'values', 3))
    elif kind in ('list', 'tuple'):
      edits.append((f'{path} values null', path, 'values', None))
    if kind is not None:
      edits.append((f'{path} type unknown', path, 'type', 'mystery'))
      edits.append((f'{path} type missing', path, 'type', None))
  edits.append(('root not a node', (), 'type', ['dict']))
  # Two array nodes pointing at each other's tensor.
  arrays = [
    p
    for p, n in nodes(spec)
    if isinstance(n, dict) and n.get('type') == 'array' and n.get('name')
  ]
  for label, path, key, value in edits:
    s = copy.deepcopy(spec)
    if value is None and key == 'type':
      at(s, path).pop('type')
    else:
      at(s, path)[key] = value
    out.append((label, {**meta, 'tree': json.dumps(s)}))
  if len(arrays) >= 2:
    s = copy.deepcopy(spec)
    x, y = at(s, arrays[0]), at(s, arrays[1])
    x['name'], y['name'] = y['name'], x['name']
    out.append(('array names swapped', {**meta, 'tree': json.dumps(s)}))
  return out


def resign(meta: dict, tensors: dict) -> dict:
  """Metadata with its checksum recomputed, as a buggy or hostile writer would."""
  return {**meta, 'sha256': treespec.checksum(meta, tensors)}


def write_mutants(dest: Path, name: str, data: bytes) -> Path:
  path = dest / f'{name}.safetensors'
  path.write_bytes(data)
  return path


def test_safetensors_byte_mutations(saved, tree, tmp_path):
  data = (saved / 'm.safetensors').read_bytes()
  rng = random.Random(0)
  header, body = split(data)
  results = {}
  for i, (label, mutant) in enumerate(
    byte_mutations(data, rng) + tensor_mutations(header, body)
  ):
    path = write_mutants(tmp_path, f'm{i}', mutant)
    results[label] = outcome(lambda p=path: pqjax.load_safetensors(p), tree)
  assert 'error' in results.values()
  assert results['truncate to 0'] == 'error'
  assert results['two tensors swapped'] == 'error'


def test_safetensors_metadata_mutations(saved, tree, tmp_path):
  data = (saved / 'm.safetensors').read_bytes()
  header, body = split(data)
  tensors, meta = safetensors.read(saved / 'm.safetensors')
  results = {}
  for i, (label, new_meta) in enumerate(metadata_mutations(meta)):
    for resigned in (False, True):
      m = resign(new_meta, tensors) if resigned and 'sha256' in new_meta else new_meta
      path = write_mutants(
        tmp_path, f'm{i}_{resigned}', join({**header, '__metadata__': m}, body)
      )
      got = outcome(lambda p=path: pqjax.load_safetensors(p), tree, resigned)
      results[label, resigned] = got
      if not resigned:
        assert got == 'error', f'{label}: an edit without a new checksum loaded'
  assert len(results) > 100


def orbax_mutants(src: Path, dest: Path) -> list[tuple[str, Path]]:
  """Copies of an Orbax checkpoint with pqjax.json or array files damaged."""
  out = []

  def variant(label, damage):
    d = dest / f'o{len(out)}'
    shutil.copytree(src, d)
    damage(d)
    out.append((label, d))

  meta = json.loads((src / orbax.METADATA_FILE).read_text())
  text = (src / orbax.METADATA_FILE).read_text()
  variant('pqjax.json removed', lambda d: (d / orbax.METADATA_FILE).unlink())
  variant(
    'pqjax.json truncated',
    lambda d: (d / orbax.METADATA_FILE).write_text(text[: len(text) // 2]),
  )
  variant(
    'pqjax.json binary', lambda d: (d / orbax.METADATA_FILE).write_bytes(b'\xff\xfe\x00')
  )
  variant('pqjax.json a list', lambda d: (d / orbax.METADATA_FILE).write_text('[]'))
  variant('arrays removed', lambda d: shutil.rmtree(d / orbax.ARRAYS_DIR))
  for label, m in metadata_mutations(meta)[::7]:
    variant(
      f'metadata {label}',
      lambda d, m=m: (d / orbax.METADATA_FILE).write_text(json.dumps(m)),
    )
  files = sorted(
    p.relative_to(src) for p in (src / orbax.ARRAYS_DIR).rglob('*') if p.is_file()
  )
  for rel in files:
    size = (src / rel).stat().st_size
    variant(f'{rel} removed', lambda d, r=rel: (d / r).unlink())
    if size:
      variant(
        f'{rel} truncated',
        lambda d, r=rel, s=size: (d / r).write_bytes((d / r).read_bytes()[: s // 2]),
      )
      variant(
        f'{rel} bit flipped',
        lambda d, r=rel, s=size: (d / r).write_bytes(
          (lambda b: b[: s // 2] + bytes([b[s // 2] ^ 0x10]) + b[s // 2 + 1 :])(
            (d / r).read_bytes()
          )
        ),
      )
  return out


def test_orbax_mutations(saved, tree, tmp_path):
  results = {
    label: outcome(lambda p=path: pqjax.load_orbax(p), tree)
    for label, path in orbax_mutants(saved / 'm_orbax', tmp_path)
  }
  assert results['pqjax.json removed'] == 'error'
  assert results['arrays removed'] == 'error'
  assert len(results) > 30


def test_loader_dispatch_on_mutants(saved, tree, tmp_path):
  # pqjax.load and load_float take any path: they must fail as cleanly.
  for label, path in [
    ('missing', tmp_path / 'nope.safetensors'),
    ('empty dir', tmp_path / 'empty'),
    ('a file named like a dir', tmp_path / 'f'),
  ]:
    if label == 'empty dir':
      path.mkdir()
    elif label.startswith('a file'):
      path.write_bytes(b'12345678')
    for load in (pqjax.load, pqjax.load_float):
      assert outcome(lambda f=load, p=path: f(p), tree) == 'error', (label, load)
