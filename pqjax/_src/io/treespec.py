"""A tree as JSON metadata plus named tensors: what every checkpoint format stores.

A quantized tree is saved as plain tensors plus JSON metadata that rebuilds it
exactly. Each array leaf is one tensor named by its path (``encoder/0/bias``); each
:class:`QArray` is four: ``<path>.codes``, ``.scale``, ``.alpha`` and ``.table``, and a
fifth, ``.column_scale``, where its scales are uint8 steps of a column scale. The
metadata records the format name, a format version, the tree (dicts, lists, tuples,
None) with every leaf's shape and dtype and every QArray's bits and layer axes, and a
SHA-256 over the metadata and the tensor bytes, so corruption anywhere is caught on
load. Layer axes (and ``transposed``) are recorded only where a QArray has some, so
a QArray recorded without them (as every one was before they existed) has none.
Codes of 5 to 7 bits stored one int8 a byte (files written before they were packed)
are packed on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import numpy.typing as npt
from jax.typing import ArrayLike

from pqjax._src.core import grid, packing
from pqjax._src.core.leaves import KeyPath, PyTree, is_array, path_str
from pqjax._src.core.qarray import DATA_FIELDS, LoraArray, QArray
from pqjax._src.version import __version__

FORMAT = 'pqjax'
FORMAT_VERSION = 1

# QArray fields that may be absent (None): files without them read as before.
OPTIONAL_FIELDS = ('column_scale',)

PathLike = str | os.PathLike


class CheckpointError(ValueError):
  """A checkpoint that cannot be read: missing, truncated, corrupted or foreign."""


# --- dtypes ------------------------------------------------------------------------


def dtype_name(dtype: npt.DTypeLike) -> str:
  """The name a dtype is recorded under (``float32``, ``bfloat16``...)."""
  return np.dtype(dtype).name


def parse_dtype(name: object) -> np.dtype:
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

# Widths once stored one int8 code a byte, now packed 8 codes in ``bits`` bytes.
LEGACY_BYTE_BITS = (5, 6, 7)


def _pack_legacy(codes: ArrayLike, bits: int, table_size: int) -> jax.Array:
  """Signed int8 codes ``(*layers, K, N)`` of an older file, packed as stored today."""
  q = jnp.asarray(codes).astype(jnp.int32)
  *layers, k, n = q.shape
  pack = lambda x: packing.pack(x, bits, grid.zero_code(table_size))
  packed = jax.vmap(pack)(q.reshape(-1, k, n))
  return packed.reshape(*layers, packing.packed_rows(k, bits), n)


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


def _check_key(key: object, path: KeyPath) -> None:
  if isinstance(key, bool) or not isinstance(key, (str, int)):
    raise TypeError(
      f'{path_str(path)}: dict keys must be str or int to be saved, got {key!r}'
    )


def _is_frozen_dict(node: object) -> bool:
  # Without importing flax: a FrozenDict exists only if flax is loaded already.
  module = sys.modules.get('flax.core.frozen_dict')
  return module is not None and type(node) is module.FrozenDict


def _encode(node: PyTree, path: KeyPath, flat: _Flat) -> dict[str, Any]:
  if len(path) > MAX_DEPTH:
    # Saved, it could not be loaded back.
    raise ValueError(
      f'{path_str(path[:3])}/...: the tree nests deeper than {MAX_DEPTH} levels;'
      ' pqjax checkpoints hold at most that many'
    )
  if node is None:
    return {'type': 'none'}
  if isinstance(node, QArray):
    fields = {
      f: flat.add(f'{path_str(path)}.{f}', getattr(node, f))
      for f in DATA_FIELDS
      if getattr(node, f) is not None
    }
    # Recorded only where there are layer axes: a tree without any is written as
    # before they existed, and an Orbax target matches either.
    layers = {'layer_axes': node.layer_axes} if node.layer_axes else {}
    if node.transposed:
      layers['transposed'] = True
    return {
      'type': 'qarray',
      'bits': node.bits,
      'shape': list(node.shape),
      'dtype': dtype_name(node.dtype),
      **layers,
      'fields': fields,
    }
  if isinstance(node, LoraArray):
    # The base as a QArray, the adapter as two arrays: ``path/base.codes``, ``path/a``.
    return {
      'type': 'lora',
      'scale': float(node.scale),
      'values': [
        _encode(getattr(node, f), (*path, jax.tree_util.GetAttrKey(f)), flat)
        for f in ('base', 'a', 'b')
      ],
    }
  if type(node) is dict or _is_frozen_dict(node):
    keys = list(node.keys())
    for k in keys:
      _check_key(k, path)
    return {
      'type': 'dict' if type(node) is dict else 'frozendict',
      'keys': keys,
      'values': [_encode(node[k], (*path, jax.tree_util.DictKey(k)), flat) for k in keys],
    }
  if type(node) in (list, tuple):
    return {
      'type': type(node).__name__,
      'values': [
        _encode(v, (*path, jax.tree_util.SequenceKey(i)), flat)
        for i, v in enumerate(node)
      ],
    }
  if is_array(node):
    if jax.dtypes.issubdtype(node.dtype, jax.dtypes.prng_key):
      raise TypeError(
        f'{path_str(path)}: a typed PRNG key array ({node.dtype}) cannot be saved;'
        ' save jax.random.key_data(key) instead, or leave the random state out'
      )
    if np.dtype(node.dtype).kind not in 'biufcV':
      raise TypeError(f'{path_str(path)}: arrays of dtype {node.dtype} cannot be saved')
    return {'type': 'array', **flat.add(path_str(path), node)}
  # An nnx.State converts to plain dicts.
  hint = '; convert it with nnx.to_pure_dict' if hasattr(node, 'to_pure_dict') else ''
  raise TypeError(
    f'{path_str(path)}: cannot save a {type(node).__module__}.{type(node).__name__};'
    ' checkpoints hold trees of dicts, lists, tuples, None, arrays, QArray and'
    ' LoraArray' + hint
  )


def flatten(tree: PyTree) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(spec, tensors)``: the JSON description of ``tree`` and its arrays by name."""
  flat = _Flat()
  return _encode(tree, (), flat), flat.tensors


def as_jax(x: np.ndarray) -> jax.Array | np.ndarray:
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
    raise ValueError(
      f'tensor {name!r} is {dtype_name(x.dtype)} {tuple(x.shape)}, the'
      ' metadata says'
      f' {dtype.name} {shape}'
    )
  return x


def _decode(
  spec: dict[str, Any],
  tensors: dict[str, Any],
  used: set[str],
  convert: Callable[[Any], Any],
) -> PyTree:
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
  if kind == 'lora':
    scale, values = spec['scale'], spec['values']
    if type(scale) not in (int, float) or not np.isfinite(scale) or len(values) != 3:
      raise ValueError(f'bad LoRA adapter {spec!r:.80}')
    base, a, b = (_decode(v, tensors, used, convert) for v in values)
    if not isinstance(base, QArray):
      raise ValueError("a LoRA adapter's base is not a QArray")
    return LoraArray(base=base, a=a, b=b, scale=float(scale))
  if kind == 'qarray':
    bits = spec['bits']
    if type(bits) is not int or not grid.MIN_BITS <= bits <= grid.MAX_BITS:
      raise ValueError(f'bad bits {bits!r}')
    layer_axes = spec.get('layer_axes', 0)
    if type(layer_axes) is not int or layer_axes < 0:
      raise ValueError(f'bad layer_axes {layer_axes!r}')
    transposed = spec.get('transposed', False)
    if type(transposed) is not bool:
      raise ValueError(f'bad transposed {transposed!r}')
    stored = spec['fields']
    fields = {
      f: convert(_tensor(stored[f], tensors, used))
      for f in DATA_FIELDS
      if f in stored or f not in OPTIONAL_FIELDS
    }
    if bits in LEGACY_BYTE_BITS and np.dtype(fields['codes'].dtype) == np.int8:
      fields['codes'] = _pack_legacy(fields['codes'], bits, fields['table'].shape[-1])
    try:
      return QArray(
        **fields,
        bits=bits,
        shape=tuple(int(d) for d in spec['shape']),
        dtype=parse_dtype(spec['dtype']),
        layer_axes=layer_axes,
        transposed=transposed,
      )
    except ValueError as e:
      # The constructor's checks are the file's: say which leaf broke them.
      raise ValueError(f'QArray {_qarray_name(stored)!r}: {e}') from None
  raise ValueError(f'unknown node type {kind!r}')


def _qarray_name(stored: dict[str, Any]) -> str:
  """A stored QArray's path: its codes tensor's name less ``.codes``."""
  name = stored['codes'].get('name') or '?'
  return str(name).removesuffix('.codes')


def unflatten(
  spec: dict[str, Any],
  tensors: dict[str, Any],
  where: Path,
  convert: Callable[[Any], Any] = as_jax,
) -> PyTree:
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
    raise CheckpointError(
      f'{where}: holds tensors its metadata does not describe: {extra[:5]}'
    )
  return tree


# --- metadata ----------------------------------------------------------------------

# How many levels of dicts, lists and tuples a saved tree may nest: far beyond any
# model's, and few enough that reading one (recursively) stays within Python's
# recursion limit.
MAX_DEPTH = 100


def _too_deep(spec: Any) -> bool:
  """Whether a tree spec nests beyond :data:`MAX_DEPTH`; walked without recursion."""
  stack = [(spec, 0)]
  while stack:
    node, depth = stack.pop()
    if depth > MAX_DEPTH:
      return True
    values = node.get('values') if isinstance(node, dict) else None
    if isinstance(values, list):
      stack.extend((v, depth + 1) for v in values)
  return False


# Bytes hashed between page releases.
CHECKSUM_BLOCK = 32 << 20


def _bytes_of(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x).reshape(-1).view(np.uint8)


def checksum(
  meta: dict[str, str],
  tensors: dict[str, np.ndarray],
  done: Callable[[str, int, int], None] | None = None,
) -> str:
  """SHA-256 of the metadata (less this checksum) and each tensor's name, type, bytes.

  ``done(name, lo, hi)`` is called after bytes ``[lo, hi)`` of a tensor are read, a
  block at a time: memory-mapped tensors hand those pages back there, so checking a
  checkpoint holds one block, not its largest tensor (the 128256 x 4096 codes of an
  8B model's head are 263 MB at 4 bits; peak RSS of writing an 8B model fell by that).
  """
  fields = {k: v for k, v in meta.items() if k != 'sha256'}
  h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
  for name in sorted(tensors):
    x = tensors[name]
    h.update(f'\0{name}\0{dtype_name(x.dtype)}\0{list(x.shape)}\0'.encode())
    data = _bytes_of(x)
    for lo in range(0, max(data.size, 1), CHECKSUM_BLOCK):
      hi = min(data.size, lo + CHECKSUM_BLOCK)
      h.update(data[lo:hi].data)
      if done is not None:
        done(name, lo, hi)
  return h.hexdigest()


def metadata_fields(tree_json: str) -> dict[str, str]:
  """The pqjax metadata of a tree, less its checksum."""
  return {
    'format': FORMAT,
    'format_version': str(FORMAT_VERSION),
    'pqjax_version': __version__,
    'tree': tree_json,
  }


def metadata(tree_json: str, tensors: dict[str, np.ndarray]) -> dict[str, str]:
  meta = metadata_fields(tree_json)
  return {**meta, 'sha256': checksum(meta, tensors)}


def check_metadata(meta: Any, where: Path) -> dict[str, Any]:
  """The tree spec of pqjax metadata, after checking format and version."""
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise CheckpointError(
      f'{where}: not a pqjax checkpoint (no "format": "{FORMAT}" in its metadata)'
    )
  version = meta.get('format_version')
  if version != str(FORMAT_VERSION):
    newer = isinstance(version, str) and version.isdigit() and int(version) > 1
    raise CheckpointError(
      f'{where}: pqjax checkpoint format version {version!r} is not supported; this'
      f' pqjax reads version {FORMAT_VERSION}'
      + (' (the file was written by a newer pqjax)' if newer else '')
    )
  too_deep = CheckpointError(
    f'{where}: malformed pqjax metadata: the tree nests too deeply (pqjax'
    f' checkpoints hold at most {MAX_DEPTH} levels)'
  )
  try:
    spec = json.loads(meta['tree'])
  except RecursionError:
    raise too_deep from None
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{where}: malformed pqjax metadata: {e}') from None
  if not isinstance(spec, dict):
    raise CheckpointError(f'{where}: malformed pqjax metadata: the tree is not an object')
  if _too_deep(spec):
    raise too_deep
  return spec


def verify(meta: dict[str, Any], tensors: dict[str, np.ndarray], where: Path) -> None:
  if meta.get('sha256') != checksum(meta, tensors):
    raise CheckpointError(
      f'{where}: corrupted: the data does not match the checksum in its metadata'
    )


def walk_refs(spec: Any, out: dict[str, Any]) -> None:
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
    yield from spec.get('fields', {}).values()
  else:
    for v in spec.get('values', []):
      yield from _refs(v)


def host(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
  # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
  return {k: np.require(np.asarray(v), requirements='C') for k, v in tensors.items()}


def nest(
  tensors: dict[str, Any], where: PathLike = '<tensors>', sep: str = '.'
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
        raise CheckpointError(
          f'{where}: tensor names {sep.join(parents[: i + 1])!r}'
          f' and {name!r} clash: one is a prefix of the other'
        )
      owner.setdefault(id(child), name)
      node = child
    if last in node:
      other = owner.get(id(node[last]), name)
      raise CheckpointError(
        f'{where}: tensor names {name!r} and {other!r} clash: one'
        ' is a prefix of the other'
      )
    node[last] = tensors[name]
  return root
