"""Saving and loading quantized trees, and reading float checkpoints.

A quantized tree is saved as plain tensors plus JSON metadata that rebuilds it
exactly. Each array leaf is one tensor named by its path (``encoder/0/bias``); each
:class:`QArray` is four: ``<path>.codes``, ``.scale``, ``.alpha`` and ``.table``. The
metadata records the format name, a format version, the tree (dicts, lists, tuples,
None) with every leaf's shape and dtype and every QArray's bits, and a SHA-256 over
the metadata and the tensor bytes, so corruption anywhere is caught on load.

- safetensors: one file; the metadata sits in the header's ``__metadata__``.
- Orbax: a directory holding ``pqjax.json`` (the metadata) and ``arrays/``, an Orbax
  checkpoint of the flat ``{name: tensor}`` dict.

Writes go to a temporary path in the destination's folder and are renamed into
place, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pqjax import power
from pqjax.qarray import DATA_FIELDS, QArray, contains_qarray, is_array
from pqjax.tree import path_str

FORMAT = 'pqjax'
FORMAT_VERSION = 1
METADATA_FILE = 'pqjax.json'
ARRAYS_DIR = 'arrays'

PathLike = str | os.PathLike

# safetensors' dtype names; ml_dtypes gives NumPy the ones it lacks.
_SAFETENSORS_DTYPES = {
    'BOOL': np.bool_, 'U8': np.uint8, 'I8': np.int8, 'U16': np.uint16,
    'I16': np.int16, 'U32': np.uint32, 'I32': np.int32, 'U64': np.uint64,
    'I64': np.int64, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
    'F32': np.float32, 'F64': np.float64, 'C64': np.complex64,
    'F8_E4M3': ml_dtypes.float8_e4m3fn, 'F8_E5M2': ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: missing, truncated, corrupted or foreign."""


# --- dtypes ------------------------------------------------------------------------


def dtype_name(dtype: Any) -> str:
  """The name a dtype is recorded under (``float32``, ``bfloat16``...)."""
  return np.dtype(dtype).name


def parse_dtype(name: Any) -> np.dtype:
  """The dtype recorded as ``name``; NumPy's own names and ml_dtypes' (bfloat16)."""
  if not isinstance(name, str):
    raise ValueError(f'dtype name must be a string, got {name!r}')
  extra = getattr(ml_dtypes, name, None)
  if isinstance(extra, type) and issubclass(extra, np.generic):
    return np.dtype(extra)
  try:
    dtype = np.dtype(name)
  except TypeError as e:
    raise ValueError(f'unknown dtype {name!r}') from e
  if dtype.kind not in 'biufc':
    raise ValueError(f'unsupported dtype {name!r}')
  return dtype


# --- tree <-> (spec, tensors) -------------------------------------------------------


@dataclasses.dataclass
class _Flat:
  """Tensors collected while walking a tree, by unique name."""

  tensors: dict[str, Any] = dataclasses.field(default_factory=dict)

  def add(self, name: str, x: Any) -> dict[str, Any]:
    """Registers ``x`` and returns its reference; empty arrays are not stored."""
    ref = {'shape': [int(d) for d in x.shape], 'dtype': dtype_name(x.dtype)}
    if not int(np.prod(x.shape)):
      return {'name': None, **ref}
    unique, n = name, 1
    # '__metadata__' is the safetensors header's own key.
    while unique in self.tensors or unique == '__metadata__':
      unique, n = f'{name}~{n}', n + 1
    self.tensors[unique] = x
    return {'name': unique, **ref}


def _check_key(key: Any, path: tuple[Any, ...]) -> None:
  if isinstance(key, bool) or not isinstance(key, (str, int)):
    raise TypeError(f'{path_str(path)}: dict keys must be str or int to be saved, got'
                    f' {key!r}')


def _is_frozen_dict(node: Any) -> bool:
  # Without importing flax: a FrozenDict exists only if flax is loaded already.
  module = sys.modules.get('flax.core.frozen_dict')
  return module is not None and type(node) is module.FrozenDict


def _encode(node: Any, path: tuple[Any, ...], flat: _Flat) -> dict[str, Any]:
  if node is None:
    return {'type': 'none'}
  if isinstance(node, QArray):
    fields = {f: flat.add(f'{path_str(path)}.{f}', getattr(node, f))
              for f in DATA_FIELDS}
    return {'type': 'qarray', 'bits': node.bits, 'shape': list(node.shape),
            'dtype': dtype_name(node.dtype), 'fields': fields}
  if type(node) is dict or _is_frozen_dict(node):
    keys = list(node.keys())
    for k in keys:
      _check_key(k, path)
    return {'type': 'dict' if type(node) is dict else 'frozendict', 'keys': keys,
            'values': [_encode(node[k], (*path, jax.tree_util.DictKey(k)), flat)
                       for k in keys]}
  if type(node) in (list, tuple):
    return {'type': type(node).__name__,
            'values': [_encode(v, (*path, jax.tree_util.SequenceKey(i)), flat)
                       for i, v in enumerate(node)]}
  if is_array(node):
    if np.dtype(node.dtype).kind not in 'biufcV':
      raise TypeError(f'{path_str(path)}: arrays of dtype {node.dtype} cannot be saved')
    return {'type': 'array', **flat.add(path_str(path), node)}
  raise TypeError(
      f'{path_str(path)}: cannot save a {type(node).__module__}.{type(node).__name__};'
      ' checkpoints hold trees of dicts, lists, tuples, None, arrays and QArray')


def flatten(tree: Any) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(spec, tensors)``: the JSON description of ``tree`` and its arrays by name."""
  flat = _Flat()
  return _encode(tree, (), flat), flat.tensors


def _as_jax(x: np.ndarray) -> Any:
  # A dtype JAX would narrow (int64 without x64) stays a NumPy array.
  if jax.dtypes.canonicalize_dtype(x.dtype) == x.dtype:
    return jnp.asarray(x)
  return np.array(x)


def _tensor(ref: dict[str, Any], tensors: dict[str, Any], used: set[str]) -> Any:
  dtype = parse_dtype(ref['dtype'])
  shape = tuple(int(d) for d in ref['shape'])
  if any(d < 0 for d in shape):
    raise ValueError(f'negative dimension in shape {shape}')
  if ref['name'] is None:
    if np.prod(shape):
      raise ValueError(f'a non-empty {shape} array has no tensor')
    return np.zeros(shape, dtype)
  name = ref['name']
  if name not in tensors:
    raise ValueError(f'tensor {name!r} is missing')
  if name in used:
    raise ValueError(f'tensor {name!r} is used twice')
  used.add(name)
  x = tensors[name]
  if np.dtype(x.dtype) != dtype or tuple(x.shape) != shape:
    raise ValueError(f'tensor {name!r} is {dtype_name(x.dtype)} {tuple(x.shape)}, the'
                     ' metadata says'
                     f' {dtype.name} {shape}')
  return x


def _decode(spec: dict[str, Any], tensors: dict[str, Any], used: set[str],
            convert: Callable[[Any], Any]) -> Any:
  kind = spec['type']
  if kind == 'none':
    return None
  if kind in ('dict', 'frozendict'):
    keys, values = spec['keys'], spec['values']
    if len(keys) != len(values):
      raise ValueError('a dict has as many keys as values')
    node = {k: _decode(v, tensors, used, convert) for k, v in zip(keys, values)}
    if kind == 'frozendict':
      from flax.core import FrozenDict

      return FrozenDict(node)
    return node
  if kind in ('list', 'tuple'):
    items = [_decode(v, tensors, used, convert) for v in spec['values']]
    return items if kind == 'list' else tuple(items)
  if kind == 'array':
    return convert(_tensor(spec, tensors, used))
  if kind == 'qarray':
    bits = spec['bits']
    if type(bits) is not int or not power.MIN_BITS <= bits <= power.MAX_BITS:
      raise ValueError(f'bad bits {bits!r}')
    fields = {f: convert(_tensor(spec['fields'][f], tensors, used))
              for f in DATA_FIELDS}
    return QArray(**fields, bits=bits, shape=tuple(int(d) for d in spec['shape']),
                  dtype=parse_dtype(spec['dtype']))
  raise ValueError(f'unknown node type {kind!r}')


def unflatten(spec: dict[str, Any], tensors: dict[str, Any], where: Path,
              convert: Callable[[Any], Any] = _as_jax) -> Any:
  """Rebuilds the tree that :func:`flatten` described; checks every tensor is used.

  ``convert`` turns each stored array into the leaf (default: a JAX array).
  """
  used: set[str] = set()
  try:
    tree = _decode(spec, tensors, used, convert)
  except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f'{where}: malformed pqjax metadata: {e}') from None
  extra = sorted(set(tensors) - used)
  if extra:
    raise CheckpointError(f'{where}: holds tensors its metadata does not describe:'
                          f' {extra[:5]}')
  return tree


# --- metadata ----------------------------------------------------------------------


def _bytes_of(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def checksum(meta: dict[str, str], tensors: dict[str, np.ndarray]) -> str:
  """SHA-256 of the metadata (less this checksum) and each tensor's name, type, bytes."""
  fields = {k: v for k, v in meta.items() if k != 'sha256'}
  h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
  for name in sorted(tensors):
    x = tensors[name]
    h.update(f'\0{name}\0{dtype_name(x.dtype)}\0{list(x.shape)}\0'.encode())
    h.update(_bytes_of(x))
  return h.hexdigest()


def _metadata(tree_json: str, tensors: dict[str, np.ndarray]) -> dict[str, str]:
  from pqjax import __version__

  meta = {'format': FORMAT, 'format_version': str(FORMAT_VERSION),
          'pqjax_version': __version__, 'tree': tree_json}
  return {**meta, 'sha256': checksum(meta, tensors)}


def _check_metadata(meta: Any, where: Path) -> dict[str, Any]:
  """The tree spec of pqjax metadata, after checking format and version."""
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise CheckpointError(f'{where}: not a pqjax checkpoint (no "format": "{FORMAT}"'
                          ' in its metadata)')
  version = meta.get('format_version')
  if version != str(FORMAT_VERSION):
    newer = isinstance(version, str) and version.isdigit() and int(version) > 1
    raise CheckpointError(
        f'{where}: pqjax checkpoint format version {version!r} is not supported; this'
        f' pqjax reads version {FORMAT_VERSION}'
        + (' (the file was written by a newer pqjax)' if newer else ''))
  try:
    spec = json.loads(meta['tree'])
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{where}: malformed pqjax metadata: {e}') from None
  if not isinstance(spec, dict):
    raise CheckpointError(f'{where}: malformed pqjax metadata: the tree is not an'
                          ' object')
  return spec


def _verify(meta: dict[str, Any], tensors: dict[str, np.ndarray], where: Path) -> None:
  if meta.get('sha256') != checksum(meta, tensors):
    raise CheckpointError(f'{where}: corrupted: the data does not match the checksum'
                          ' in its metadata')


# --- atomic writes -----------------------------------------------------------------


def _fsync(path: Path) -> None:
  with open(path, 'rb') as f:
    os.fsync(f.fileno())


def _replace(src: Path, dest: Path, trash: Path) -> None:
  """Moves ``src`` to ``dest``, replacing what is there (file or directory)."""
  if src.is_file() and (dest.is_file() or not os.path.lexists(dest)):
    os.replace(src, dest)
    return
  moved = os.path.lexists(dest)
  if moved:
    os.rename(dest, trash)
  try:
    os.rename(src, dest)
  except BaseException:
    if moved:
      os.rename(trash, dest)
    raise


def atomic_write(dest: PathLike, write: Callable[[Path], None],
                 overwrite: bool = False) -> None:
  """Calls ``write(tmp)`` for a temporary path next to ``dest``, then renames it.

  On any failure the temporary path is removed and ``dest`` is left as it was.
  """
  dest = Path(dest)
  if os.path.lexists(dest) and not overwrite:
    raise FileExistsError(f'{dest} exists; pass overwrite=True to replace it')
  parent = dest.parent if str(dest.parent) else Path('.')
  if not parent.is_dir():
    raise FileNotFoundError(f'{parent} is not a directory (writing {dest})')
  # A private folder in the same file system makes the final rename atomic.
  work = Path(tempfile.mkdtemp(dir=parent, prefix=f'.{dest.name}.', suffix='.tmp'))
  try:
    tmp = work / dest.name
    write(tmp)
    _replace(tmp, dest, work / 'replaced')
  finally:
    shutil.rmtree(work, ignore_errors=True)


# --- safetensors -------------------------------------------------------------------


def _host(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
  # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
  return {k: np.require(np.asarray(v), requirements='C') for k, v in tensors.items()}


def save_safetensors(path: PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Saves a (quantized) tree to one safetensors file; see the module docstring."""
  from safetensors.numpy import save_file

  spec, tensors = flatten(tree)
  tensors = _host(tensors)
  meta = _metadata(json.dumps(spec, separators=(',', ':')), tensors)

  def write(tmp: Path) -> None:
    save_file(tensors, tmp, metadata=meta)
    _fsync(tmp)

  atomic_write(path, write, overwrite)


def _header(data: bytes, where: Path) -> dict[str, Any]:
  """The JSON header of safetensors bytes, with clear errors for broken files."""
  if len(data) < 8:
    raise CheckpointError(f'{where}: truncated or not a safetensors file: {len(data)}'
                          ' bytes, fewer than the 8-byte header length')
  size = int.from_bytes(data[:8], 'little')
  if 8 + size > len(data):
    raise CheckpointError(
        f'{where}: truncated or not a safetensors file: the header should be {size}'
        f' bytes but only {len(data) - 8} follow the length field')
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{where}: corrupted or not a safetensors file: the header'
                          f' is not valid JSON ({e})') from None
  if not isinstance(header, dict):
    raise CheckpointError(f'{where}: corrupted safetensors header: not a JSON object')
  try:
    end = max((int(v['data_offsets'][1]) for k, v in header.items()
               if k != '__metadata__'), default=0)
  except (KeyError, IndexError, TypeError, ValueError):
    raise CheckpointError(f'{where}: corrupted safetensors header: bad tensor'
                          ' entries') from None
  if end > len(data) - 8 - size:
    raise CheckpointError(
        f'{where}: truncated: its tensors need {end} bytes of data but the file holds'
        f' {len(data) - 8 - size}')
  return header


def read_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, metadata)`` of any safetensors file, every dtype included (bf16)."""
  import safetensors

  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
  header = _header(data, path)
  meta = header.get('__metadata__') or {}
  try:
    views = safetensors.deserialize(data)
  except Exception as e:  # the Rust reader raises its own SafetensorError
    raise CheckpointError(f'{path}: not a valid safetensors file: {e}') from None
  tensors = {}
  for name, view in sorted(views):
    dtype = _SAFETENSORS_DTYPES.get(view['dtype'])
    if dtype is None:
      raise CheckpointError(f'{path}: tensor {name!r} has unsupported dtype'
                            f' {view["dtype"]}')
    tensors[name] = np.frombuffer(view['data'], dtype=dtype).reshape(
        tuple(view['shape']))
  return tensors, meta


def load_safetensors(path: PathLike) -> Any:
  """Loads a tree saved by :func:`save_safetensors`, bit for bit."""
  path = Path(path)
  return _from_tensors(path, *read_safetensors(path))


def _from_tensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]
                  ) -> Any:
  spec = _check_metadata(meta, path)
  _verify(meta, tensors, path)
  return unflatten(spec, tensors, path)


# --- Orbax -------------------------------------------------------------------------


def save_orbax(directory: PathLike, tree: Any, *, overwrite: bool = False) -> None:
  """Saves a (quantized) tree as an Orbax checkpoint plus ``pqjax.json``."""
  import orbax.checkpoint as ocp

  spec, tensors = flatten(tree)
  meta = _metadata(json.dumps(spec, separators=(',', ':')), _host(tensors))

  def write(tmp: Path) -> None:
    tmp.mkdir()
    if tensors:
      ocp.PyTreeCheckpointer().save(tmp.absolute() / ARRAYS_DIR, tensors)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    _fsync(tmp / METADATA_FILE)

  atomic_write(directory, write, overwrite)


def _read_json(path: Path, where: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(f'{where}: not a pqjax Orbax checkpoint (no'
                          f' {METADATA_FILE})') from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{where}: corrupted {METADATA_FILE}: {e}') from None


def _restore_args(target_tensors: dict[str, Any]) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  def one(x: Any) -> Any:
    sharding = getattr(x, 'sharding', None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=tuple(x.shape),
                                dtype=x.dtype)

  return {k: one(v) for k, v in target_tensors.items()}


def _reorder(target: Any, spec: Any) -> Any:
  """``target`` with its dicts in the checkpoint's key order (tree_map sorts keys)."""
  if not isinstance(spec, dict):
    return target
  kind, values = spec.get('type'), spec.get('values')
  if kind in ('dict', 'frozendict') and isinstance(target, dict) and set(
      target) == set(spec.get('keys', ())):
    node = {k: _reorder(target[k], v) for k, v in zip(spec['keys'], values)}
    return node if type(target) is dict else type(target)(node)
  if kind in ('list', 'tuple') and type(target) in (list, tuple) and len(
      target) == len(values):
    return type(target)(_reorder(t, v) for t, v in zip(target, values))
  return target


def _spec_difference(a: dict[str, Any], b: dict[str, Any], path: tuple[Any, ...] = ()
                     ) -> str:
  """Where two tree specs first differ: the leaf path, then checkpoint vs target."""
  where = path_str(path)
  kind = a.get('type')
  if kind != b.get('type'):
    return f'{where}: {kind} vs {b.get("type")}'
  if kind in ('dict', 'frozendict', 'list', 'tuple'):
    keys_a = a.get('keys', list(range(len(a['values']))))
    keys_b = b.get('keys', list(range(len(b['values']))))
    if keys_a != keys_b:
      return f'{where}: keys {keys_a} vs {keys_b}'
    make = jax.tree_util.DictKey if 'keys' in a else jax.tree_util.SequenceKey
    for k, x, y in zip(keys_a, a['values'], b['values']):
      if x != y:
        return _spec_difference(x, y, (*path, make(k)))
    return where
  if kind == 'qarray' and all(a.get(k) == b.get(k) for k in ('bits', 'shape', 'dtype')):
    a, b = a['fields'], b['fields']
  diff = [f'{k} {a.get(k)!r} vs {b.get(k)!r}' for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]
  return f'{where}: ' + ', '.join(diff)


def load_orbax(directory: PathLike, target: Any = None) -> Any:
  """Loads a tree saved by :func:`save_orbax`, bit for bit.

  ``target``, a tree like the saved one (arrays or ``jax.ShapeDtypeStruct``
  leaves), must match the checkpoint; its leaves' shardings place the restored
  arrays.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: not a directory (an Orbax checkpoint is one)')
  meta = _read_json(directory / METADATA_FILE, directory)
  spec = _check_metadata(meta, directory)
  want: dict[str, Any] = {}
  target_tensors = None
  # The tree spec is read before the checksum can be checked (it names the arrays to
  # restore), so a malformed one must fail here as cleanly as in unflatten.
  try:
    if target is not None:
      target_spec, target_tensors = flatten(_reorder(target, spec))
      if target_spec != spec:
        raise CheckpointError(f'{directory}: target does not match the checkpoint at '
                              + _spec_difference(spec, target_spec)
                              + ' (checkpoint vs target)')
    _walk_refs(spec, want)
  except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{directory}: malformed pqjax metadata: {e!r}') from None
  tensors = _restore_arrays(directory, want, target_tensors) if want else {}
  if target_tensors is None:
    _verify(meta, tensors, directory)
    return unflatten(spec, tensors, directory)
  if all(getattr(x, 'is_fully_addressable', True) for x in tensors.values()):
    _verify(meta, {k: np.asarray(v) for k, v in tensors.items()}, directory)
  # Keep the arrays where the target's shardings put them; host arrays go to JAX.
  return unflatten(spec, tensors, directory,
                   convert=lambda x: x if isinstance(x, jax.Array) else _as_jax(x))


def _walk_refs(spec: Any, out: dict[str, Any]) -> None:
  """Collects ``{name: ref}`` of every stored tensor of a tree spec."""
  for ref in _refs(spec):
    if ref.get('name') is not None:
      out[ref['name']] = ref


def _refs(spec: Any) -> Iterator[dict[str, Any]]:
  if not isinstance(spec, dict):
    return
  kind = spec.get('type')
  if kind == 'array':
    yield spec
  elif kind == 'qarray':
    for f in DATA_FIELDS:
      yield spec.get('fields', {}).get(f, {})
  else:
    for v in spec.get('values', []):
      yield from _refs(v)


def _restore_arrays(directory: Path, want: dict[str, Any],
                    target_tensors: dict[str, Any] | None) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  arrays = directory / ARRAYS_DIR
  if not arrays.is_dir():
    raise CheckpointError(f'{directory}: incomplete: {ARRAYS_DIR}/ is missing')
  args = (_restore_args({k: target_tensors[k] for k in want})
          if target_tensors is not None
          else {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want})
  try:
    restored = ocp.PyTreeCheckpointer().restore(arrays.absolute(), restore_args=args)
  except Exception as e:  # Orbax and TensorStore raise many kinds of errors
    raise CheckpointError(f'{directory}: cannot read the Orbax arrays: {e}') from None
  if not isinstance(restored, dict) or set(restored) != set(want):
    raise CheckpointError(f'{directory}: its Orbax arrays do not match {METADATA_FILE}')
  return restored


# --- float checkpoints -------------------------------------------------------------


def nest(tensors: dict[str, Any], where: PathLike = '<tensors>', sep: str = '.'
         ) -> dict[str, Any]:
  """Nested dicts from flat names split on ``sep`` (``encoder.layer.0.weight``)."""
  root: dict[str, Any] = {}
  owner: dict[int, str] = {}  # id of each inner dict -> the name that made it
  for name in sorted(tensors):
    *parents, last = name.split(sep)
    node = root
    for i, part in enumerate(parents):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise CheckpointError(f'{where}: tensor names {sep.join(parents[:i + 1])!r}'
                              f' and {name!r} clash: one is a prefix of the other')
      owner.setdefault(id(child), name)
      node = child
    if last in node:
      other = owner.get(id(node[last]), name)
      raise CheckpointError(f'{where}: tensor names {name!r} and {other!r} clash: one'
                            ' is a prefix of the other')
    node[last] = tensors[name]
  return root


def _read_msgpack(path: Path) -> Any:
  from flax import serialization

  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
  except Exception as e:  # msgpack raises several unrelated types
    raise CheckpointError(f'{path}: not a valid flax msgpack file: {e}') from None
  if not isinstance(tree, dict):
    raise CheckpointError(f'{path}: not a flax msgpack parameter tree (got'
                          f' {type(tree).__name__})')
  return tree


def _read_orbax_float(directory: Path) -> Any:
  import orbax.checkpoint as ocp

  if not any(directory.iterdir()):
    raise CheckpointError(f'{directory}: empty directory, not an Orbax checkpoint')
  try:
    return ocp.PyTreeCheckpointer().restore(directory.absolute())
  except Exception as e:  # Orbax and TensorStore raise many kinds of errors
    raise CheckpointError(f'{directory}: cannot read as an Orbax checkpoint: {e}'
                          ) from None


def load_float(path: PathLike) -> Any:
  """Reads a float parameter tree: an Orbax directory, flax msgpack or safetensors.

  The format follows the path: a directory is an Orbax checkpoint, ``*.msgpack`` a
  ``flax.serialization`` file, ``*.safetensors`` a safetensors file. A flat
  safetensors file (Hugging Face, PyTorch) becomes nested dicts by splitting names
  on ``.``; its arrays keep their layout (a PyTorch Linear weight stays
  ``(out, in)``). Non-float arrays (``position_ids``) come back untouched.
  """
  path = Path(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file or directory')
  if path.is_dir():
    tree = (load_orbax(path) if (path / METADATA_FILE).exists()
            else _read_orbax_float(path))
  elif path.suffix == '.msgpack':
    tree = _read_msgpack(path)
  elif path.suffix == '.safetensors':
    tensors, meta = read_safetensors(path)
    if meta.get('format') == FORMAT:
      tree = _from_tensors(path, tensors, meta)
    else:
      tree = nest(tensors, path)
  else:
    raise CheckpointError(
        f'{path}: unknown checkpoint format; expected an Orbax directory, a .msgpack'
        ' file (flax.serialization) or a .safetensors file')
  if contains_qarray(tree):
    raise CheckpointError(f'{path}: already quantized (it holds QArray leaves)')
  return tree


def load(path: PathLike) -> Any:
  """Loads a pqjax checkpoint: an Orbax directory or a safetensors file."""
  path = Path(path)
  if path.is_dir():
    return load_orbax(path)
  return load_safetensors(path)


def save(path: PathLike, tree: Any, *, format: str | None = None,
         overwrite: bool = False) -> None:
  """Saves to safetensors if ``path`` ends in ``.safetensors``, else to Orbax."""
  format = format or ('safetensors' if str(path).endswith('.safetensors') else 'orbax')
  if format == 'safetensors':
    save_safetensors(path, tree, overwrite=overwrite)
  elif format == 'orbax':
    save_orbax(path, tree, overwrite=overwrite)
  else:
    raise ValueError(f'format must be "safetensors" or "orbax", got {format!r}')


def disk_bytes(path: PathLike) -> int:
  """Bytes a checkpoint takes on disk (a directory: all its files)."""
  path = Path(path)
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())
