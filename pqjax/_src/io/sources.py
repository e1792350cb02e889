"""Tensors of checkpoints on disk, read through memory maps a block at a time.

A :class:`Source` lists a checkpoint's tensors by the tree path each becomes, with its
shape and dtype, and reads any block of one: a safetensors file, a folder of shards
with its ``model.safetensors.index.json``, or a Hugging Face model folder (whose
PyTorch names and layouts :mod:`hf_layout` turns into a Flax model's). Nothing is read
until asked, and pages read are handed back to the system after each block, so a
source of any size holds about one block in memory.

Every error names the file and the tensor: a truncated or corrupt shard, a missing
shard, an index naming a tensor no shard holds, an unsupported dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from pqjax._src.io import orbax
from pqjax._src.io.treespec import CheckpointError

INDEX = 'model.safetensors.index.json'
# safetensors' dtype names; ml_dtypes gives NumPy the ones it lacks.
DTYPES: dict[str, type[np.generic]] = {
  'BOOL': np.bool_,
  'U8': np.uint8,
  'I8': np.int8,
  'U16': np.uint16,
  'I16': np.int16,
  'U32': np.uint32,
  'I32': np.int32,
  'U64': np.uint64,
  'I64': np.int64,
  'F16': np.float16,
  'BF16': ml_dtypes.bfloat16,
  'F32': np.float32,
  'F64': np.float64,
  'C64': np.complex64,
  'F8_E4M3': ml_dtypes.float8_e4m3fn,
  'F8_E5M2': ml_dtypes.float8_e5m2,
}
DTYPE_NAMES = {np.dtype(t): name for name, t in DTYPES.items()}
# Floating dtypes a source may quantize.
FLOAT_DTYPES = frozenset(
  np.dtype(t) for t in (np.float16, ml_dtypes.bfloat16, np.float32)
)
# Bytes of stored rows copied between handing pages back.
BLOCK_BYTES = 32 << 20
# The largest header a safetensors file may have (its own reader's limit).
MAX_HEADER = 100 << 20


@dataclasses.dataclass(frozen=True)
class Stored:
  """One tensor as a file stores it: row-major bytes at ``offset``."""

  file: Path
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  offset: int

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A tensor of a source as the tree holds it: ``stored`` with its axes permuted.

  Has ``shape``, ``dtype`` and ``ndim`` like an array (filters and options see it as
  one), but no values: :meth:`Source.read` reads them.
  """

  path: str
  stored: Stored
  perm: tuple[int, ...] | None = None  # axes of ``stored`` in the tree's order

  @property
  def shape(self) -> tuple[int, ...]:
    s = self.stored.shape
    return s if self.perm is None else tuple(s[i] for i in self.perm)

  @property
  def dtype(self) -> np.dtype:
    return self.stored.dtype

  @property
  def ndim(self) -> int:
    return len(self.stored.shape)

  @property
  def size(self) -> int:
    return math.prod(self.stored.shape)

  @property
  def nbytes(self) -> int:
    return self.stored.nbytes

  def swapaxes(self, a: int, b: int) -> Tensor:
    """This tensor with two axes swapped (as ``np.swapaxes``), nothing read."""
    perm = list(self.perm or range(self.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    same = perm == list(range(self.ndim))
    return dataclasses.replace(self, perm=None if same else tuple(perm))

  def __repr__(self) -> str:
    return f'Tensor({self.path}, {self.shape}, {self.dtype.name})'


def header(path: Path) -> tuple[dict[str, Stored], dict[str, str]]:
  """The tensors of a safetensors file and its metadata, from its header alone."""
  try:
    size = path.stat().st_size
    with open(path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f'{path}: truncated or not a safetensors file')
      length = int.from_bytes(head, 'little')
      if length > min(MAX_HEADER, size - 8):
        raise CheckpointError(
          f'{path}: truncated or not a safetensors file: a header of {length} bytes'
          f' in a file of {size}'
        )
      text = f.read(length)
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
  try:
    entries = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f'{path}: corrupted safetensors header: {e}') from None
  if not isinstance(entries, dict):
    raise CheckpointError(f'{path}: corrupted safetensors header: not an object')
  meta = entries.pop('__metadata__', None) or {}
  start = 8 + length
  out = {}
  for name, entry in entries.items():
    try:
      dtype = np.dtype(DTYPES[entry['dtype']])
    except KeyError:
      raise CheckpointError(
        f'{path}: tensor {name!r} has unsupported dtype {entry.get("dtype")!r}'
      ) from None
    except (TypeError, AttributeError):
      raise CheckpointError(f'{path}: tensor {name!r}: bad header entry') from None
    try:
      shape = tuple(int(d) for d in entry['shape'])
      lo, hi = (int(x) for x in entry['data_offsets'])
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f'{path}: tensor {name!r}: bad header entry') from None
    if any(d < 0 for d in shape) or hi - lo != math.prod(shape) * dtype.itemsize:
      raise CheckpointError(
        f'{path}: tensor {name!r}: {hi - lo} bytes of data for a {dtype.name} of'
        f' shape {shape}'
      )
    if lo < 0 or start + hi > size:
      raise CheckpointError(
        f'{path}: truncated: tensor {name!r} ends at byte {start + hi} of a file of'
        f' {size}'
      )
    out[name] = Stored(path, name, shape, dtype, start + lo)
  return out, meta


def shard_files(folder: Path) -> tuple[dict[str, Stored], dict[str, Any]]:
  """Every tensor of a folder of safetensors shards, by name, and the index's metadata.

  With ``model.safetensors.index.json``: the shards its ``weight_map`` names, each
  tensor in the file it names. Without: every ``*.safetensors`` file of the folder.
  """
  index_path = folder / INDEX
  if not index_path.exists():
    files = sorted(folder.glob('*.safetensors'))
    if not files:
      raise CheckpointError(f'{folder}: no {INDEX} and no .safetensors files')
    out: dict[str, Stored] = {}
    for file in files:
      tensors, _ = header(file)
      for name, t in tensors.items():
        if name in out:
          raise CheckpointError(
            f'{folder}: tensor {name!r} is in both {out[name].file.name} and {file.name}'
          )
        out[name] = t
    return out, {}
  try:
    index = json.loads(index_path.read_text())
    weight_map = index['weight_map']
    if not isinstance(weight_map, dict):
      raise TypeError('weight_map is not an object')
  except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
    raise CheckpointError(f'{index_path}: not a safetensors index: {e}') from None
  by_file: dict[str, dict[str, Stored]] = {}
  out = {}
  for name, file in weight_map.items():
    if not isinstance(file, str) or '/' in file or file.startswith('.'):
      raise CheckpointError(f'{index_path}: tensor {name!r} names a bad file {file!r}')
    if file not in by_file:
      if not (folder / file).exists():
        raise CheckpointError(
          f'{index_path}: shard {file} (of tensor {name!r}) is missing from {folder}'
        )
      by_file[file] = header(folder / file)[0]
    if name not in by_file[file]:
      raise CheckpointError(
        f'{index_path}: names tensor {name!r}, which {file} does not hold'
      )
    out[name] = by_file[file][name]
  meta = index.get('metadata') or {}
  return out, meta if isinstance(meta, dict) else {}


class Source:
  """Tensors of checkpoint files by tree path (``a/b/kernel``), read on demand.

  Blocks are read through memory maps and their pages handed back once copied, so
  reading a tensor of any size keeps about one block resident.
  """

  def __init__(
    self,
    tensors: dict[str, Tensor],
    description: str,
    output_first: frozenset[str] = frozenset(),
  ):
    self.tensors = tensors
    self.description = description
    # Paths of 2-D tensors whose output features are their first axis.
    self.output_first = output_first
    self._maps: dict[Path, mmap.mmap] = {}

  def output_axis(self, path: str, tensor: Tensor) -> int:
    """-2 where the tensor holds its output features first, else -1."""
    return -2 if path in self.output_first else -1

  def __iter__(self) -> Iterator[Tensor]:
    return iter(self.tensors.values())

  @property
  def nbytes(self) -> int:
    return sum(t.nbytes for t in self.tensors.values())

  def _map(self, file: Path) -> mmap.mmap:
    if file not in self._maps:
      with open(file, 'rb') as f:
        self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return self._maps[file]

  def close(self) -> None:
    for m in self._maps.values():
      try:
        m.close()
      except BufferError:
        pass  # arrays still view it (an error's traceback): it closes with them
    self._maps.clear()

  def __enter__(self) -> Source:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  def read(
    self, tensor: Tensor, rows: slice | None = None, cols: slice | None = None
  ) -> np.ndarray:
    """A copy of ``tensor[rows, cols]`` (its 2-D view: the last axis by the others),
    in the stored dtype; the whole tensor, in its shape, without ``rows``/``cols``."""
    s = tensor.stored
    view = self.view(s)
    if tensor.perm is not None:
      view = view.transpose(tensor.perm)
    try:
      if rows is None and cols is None:
        return np.array(view)
      matrix = view.reshape(-1, view.shape[-1]) if view.ndim != 2 else view
      block = matrix[rows or slice(None), cols or slice(None)]
      if not block.size:
        return np.array(block)
      if tensor.perm == (1, 0):
        return self._read_transposed(s, block, cols)
      if tensor.perm is not None:
        return np.array(block)
      # Some columns of every row touch every page of the rows: copied a block of
      # rows at a time, each block's pages handed back, so the tensor's pages are
      # never all resident at once (a 128256-row embedding is 1 GB in bfloat16).
      out = np.empty(block.shape, block.dtype)
      first = (rows or slice(None)).indices(matrix.shape[0])[0]
      row_bytes = matrix.shape[1] * s.dtype.itemsize
      step = max(1, BLOCK_BYTES // row_bytes)
      for r0 in range(0, block.shape[0], step):
        out[r0 : r0 + step] = block[r0 : r0 + step]
        self.release(s, (first + r0) * row_bytes, (first + r0 + step) * row_bytes)
      return out
    finally:
      self.release(s)

  def _read_transposed(
    self, s: Stored, block: np.ndarray, cols: slice | None
  ) -> np.ndarray:
    """A copy of ``block``, some columns of a transposed 2-D tensor: columns are
    stored rows, copied a block of them at a time with their pages handed back (the
    rows of an 8B model's head held 131 MB of file pages per tile column read)."""
    out = np.empty(block.shape, block.dtype)
    first = (cols or slice(None)).indices(s.shape[0])[0]
    row_bytes = s.shape[1] * s.dtype.itemsize
    step = max(1, BLOCK_BYTES // row_bytes)
    for c0 in range(0, block.shape[1], step):
      out[:, c0 : c0 + step] = block[:, c0 : c0 + step]
      self.release(s, (first + c0) * row_bytes, (first + c0 + step) * row_bytes)
    return out

  def view(self, s: Stored) -> np.ndarray:
    """The stored tensor's bytes as a read-only array, mapped, not read."""
    if not s.nbytes:
      return np.zeros(s.shape, s.dtype)
    data = self._map(s.file)
    return np.frombuffer(data, s.dtype, math.prod(s.shape), s.offset).reshape(s.shape)

  def release(self, s: Stored, lo: int = 0, hi: int | None = None) -> None:
    """Hands the pages of the tensor's bytes ``[lo, hi)`` (all by default) back: they
    stay in the page cache, not in our RSS."""
    m = self._maps.get(s.file)
    if m is None or not hasattr(m, 'madvise'):
      return
    page = mmap.PAGESIZE
    start = (s.offset + lo) // page * page
    end = min(len(m), s.offset + (s.nbytes if hi is None else min(hi, s.nbytes)))
    if end > start:
      m.madvise(mmap.MADV_DONTNEED, start, end - start)


def flat_tensors(stored: dict[str, Stored], sep: str | None = '.') -> dict[str, Tensor]:
  """Tensors named by a tree path from flat names (``a.b.weight`` -> ``a/b/weight``);
  by their stored names where ``sep`` is None."""
  out = {}
  for name in sorted(stored):
    path = name if sep is None else '/'.join(name.split(sep))
    out[path] = Tensor(path, stored[name])
  return out


class OrbaxSource(Source):
  """Tensors of an Orbax checkpoint, read through TensorStore a slice at a time.

  TensorStore decodes whole chunks: Orbax writes an unsharded array as one chunk,
  so reading a block of its rows holds that array's stored bytes for the read
  (a sharded one's chunks are its shards).
  """

  def __init__(self, tensors: dict[str, Tensor], description: str, driver: str):
    super().__init__(tensors, description)
    self.driver = driver  # TensorStore's: "zarr", or "zarr3"
    self._stores: dict[str, Any] = {}

  def _store(self, s: Stored) -> Any:
    if s.name not in self._stores:
      import tensorstore as ts

      spec = {
        'driver': self.driver,
        'kvstore': {'driver': 'ocdbt', 'base': f'file://{s.file}', 'path': s.name},
      }
      try:
        self._stores[s.name] = ts.open(spec, open=True, read=True).result()
      except Exception as e:  # TensorStore raises many kinds of errors
        raise CheckpointError(f'{s.file}: tensor {s.name!r}: cannot open: {e}') from None
    return self._stores[s.name]

  def read(
    self, tensor: Tensor, rows: slice | None = None, cols: slice | None = None
  ) -> np.ndarray:
    s = tensor.stored
    store = self._store(s)
    try:
      if tensor.perm is None and len(s.shape) == 2 and (rows or cols):
        return np.asarray(store[rows or slice(None), cols or slice(None)].read().result())
      whole = np.asarray(store.read().result())
    except Exception as e:  # TensorStore raises many kinds of errors
      raise CheckpointError(f'{s.file}: tensor {s.name!r}: cannot read: {e}') from None
    if tensor.perm is not None:
      whole = whole.transpose(tensor.perm)
    if rows is None and cols is None:
      return whole
    matrix = whole.reshape(-1, whole.shape[-1])
    return np.array(matrix[rows or slice(None), cols or slice(None)])

  def close(self) -> None:
    self._stores.clear()


def open_orbax(directory: Path) -> OrbaxSource:
  """The arrays of an Orbax checkpoint by tree path: a float tree saved by Orbax, or
  a float tree saved by :func:`pqjax.save` in the Orbax format (its ``arrays/``)."""
  meta_file = directory / orbax.METADATA_FILE
  if meta_file.exists():
    refuse_quantized(orbax.read_json(meta_file, directory), directory)
    directory = directory / orbax.ARRAYS_DIR
  import jax
  import orbax.checkpoint as ocp
  from orbax.checkpoint import metadata as ocp_metadata

  from pqjax._src.core.leaves import path_str

  try:
    found = ocp.PyTreeCheckpointer().metadata(directory.absolute())
    tree = getattr(getattr(found, 'item_metadata', found), 'tree', found)
    zarr3 = bool(getattr(getattr(found, 'item_metadata', None), 'use_zarr3', False))
  except Exception as e:  # Orbax raises many kinds of errors
    raise CheckpointError(
      f'{directory}: cannot read as an Orbax checkpoint: {e}'
    ) from None
  is_array = lambda x: isinstance(x, ocp_metadata.ArrayMetadata)
  out = {}
  for key, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_array):
    path = path_str(key)
    if not is_array(leaf):
      raise CheckpointError(f'{directory}: {path} is not an array ({leaf!r})')
    dtype = np.dtype(leaf.dtype)
    stored = Stored(directory.absolute(), leaf.name, tuple(leaf.shape), dtype, 0)
    out[path] = Tensor(path, stored)
  return OrbaxSource(out, f'{directory} (Orbax)', 'zarr3' if zarr3 else 'zarr')


def is_orbax(path: Path) -> bool:
  """Whether a folder holds an Orbax checkpoint (or a pqjax one in that format)."""
  return (path / '_METADATA').exists() or (path / orbax.METADATA_FILE).exists()


def refuse_quantized(meta: Any, where: Path) -> None:
  """CheckpointError for pqjax metadata of a quantized tree: not a float source."""
  tree = meta.get('tree', '') if isinstance(meta, dict) else ''
  if '"qarray"' in str(tree):
    raise CheckpointError(f'{where}: already quantized (a pqjax checkpoint)')
