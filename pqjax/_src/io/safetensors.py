"""safetensors: one file; the pqjax metadata sits in the header's ``__metadata__``.

Any safetensors file can also be read as a float tree (Hugging Face, PyTorch): flat
names such as ``encoder.layer.0.weight`` become nested dicts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from pqjax._src.core.leaves import PyTree
from pqjax._src.io import atomic, orbax
from pqjax._src.io.sources import DTYPE_NAMES, DTYPES
from pqjax._src.io.treespec import (
  FORMAT,
  CheckpointError,
  PathLike,
  check_metadata,
  flatten,
  host,
  metadata,
  nest,
  unflatten,
  verify,
)


def _layout(
  tensors: dict[str, np.ndarray], meta: dict[str, str]
) -> tuple[bytes, list[str]]:
  """The header (its length field included) and the order of the tensors' data.

  Written here rather than by the safetensors package, whose header order varies
  from one save to the next: the same tree gives the same bytes. Tensors are laid
  out by decreasing item size, then by name, so each starts at a multiple of its
  item size; the header is padded with spaces to a multiple of 8 bytes.
  """
  order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
  header: dict[str, Any] = {'__metadata__': dict(sorted(meta.items()))}
  offset = 0
  for name in order:
    x = tensors[name]
    dtype = DTYPE_NAMES.get(np.dtype(x.dtype))
    if dtype is None:
      raise TypeError(f'{name}: arrays of dtype {x.dtype} cannot be saved in safetensors')
    header[name] = {
      'dtype': dtype,
      'shape': list(x.shape),
      'data_offsets': [offset, offset + x.nbytes],
    }
    offset += x.nbytes
  text = json.dumps(header, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  return len(text).to_bytes(8, 'little') + text, order


def save(path: PathLike, tree: PyTree, *, overwrite: bool = False) -> None:
  """Saves a (quantized) tree to one safetensors file; see the module docstring."""
  spec, tensors = flatten(tree)
  tensors = host(tensors)
  meta = metadata(json.dumps(spec, separators=(',', ':')), tensors)
  head, order = _layout(tensors, meta)

  def write(tmp: Path) -> None:
    with open(tmp, 'wb') as f:
      f.write(head)
      for name in order:
        x = tensors[name]
        x = x.byteswap() if sys.byteorder == 'big' else x  # safetensors: little-endian
        f.write(x.reshape(-1).view(np.uint8).data)
    atomic.fsync(tmp)

  atomic.atomic_write(path, write, overwrite, orbax.is_checkpoint)


def _header(data: bytes, where: Path) -> dict[str, Any]:
  """The JSON header of safetensors bytes, with clear errors for broken files."""
  if len(data) < 8:
    raise CheckpointError(
      f'{where}: truncated or not a safetensors file: {len(data)}'
      ' bytes, fewer than the 8-byte header length'
    )
  size = int.from_bytes(data[:8], 'little')
  if 8 + size > len(data):
    raise CheckpointError(
      f'{where}: truncated or not a safetensors file: the header should be {size}'
      f' bytes but only {len(data) - 8} follow the length field'
    )
  try:
    header = json.loads(data[8 : 8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(
      f'{where}: corrupted or not a safetensors file: the header is not valid JSON ({e})'
    ) from None
  if not isinstance(header, dict):
    raise CheckpointError(f'{where}: corrupted safetensors header: not a JSON object')
  try:
    end = max(
      (int(v['data_offsets'][1]) for k, v in header.items() if k != '__metadata__'),
      default=0,
    )
  except (KeyError, IndexError, TypeError, ValueError):
    raise CheckpointError(
      f'{where}: corrupted safetensors header: bad tensor entries'
    ) from None
  if end > len(data) - 8 - size:
    raise CheckpointError(
      f'{where}: truncated: its tensors need {end} bytes of data but the file holds'
      f' {len(data) - 8 - size}'
    )
  return header


def read(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
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
    dtype = DTYPES.get(view['dtype'])
    if dtype is None:
      raise CheckpointError(
        f'{path}: tensor {name!r} has unsupported dtype {view["dtype"]}'
      )
    tensors[name] = np.frombuffer(view['data'], dtype=dtype).reshape(tuple(view['shape']))
  return tensors, meta


def load(path: PathLike, target: PyTree = None) -> PyTree:
  """Loads a tree saved by :func:`save`, bit for bit, through a memory map: each
  tensor is copied onto the device (or where ``target``'s leaves' shardings place
  it) and its pages handed back."""
  from pqjax._src.io import mapped, sources

  path = Path(path)
  stored, meta = sources.header(path)
  with sources.Source(sources.flat_tensors(stored, sep=None), str(path)) as source:
    return mapped.from_maps(source, meta, path, target)


def from_tensors(
  path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]
) -> PyTree:
  spec = check_metadata(meta, path)
  verify(meta, tensors, path)
  return unflatten(spec, tensors, path)


def read_float(path: Path) -> PyTree:
  """A float tree from any safetensors file; a pqjax checkpoint loads as saved."""
  tensors, meta = read(path)
  if meta.get('format') == FORMAT:
    return from_tensors(path, tensors, meta)
  return nest(tensors, path)


def claims(path: Path) -> bool:
  return path.suffix == '.safetensors'
