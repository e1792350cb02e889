"""Folders of safetensors shards with ``model.safetensors.index.json``.

pqjax writes a checkpoint as such a folder (:mod:`writer`), its metadata in the
index's ``metadata``; Hugging Face writes float models the same way. Both are read
through memory maps, tensor by tensor: each tensor is copied onto the device and its
pages handed back, so loading needs about the checkpoint's own size, not twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pqjax._src.io import atomic, orbax, sources
from pqjax._src.io.treespec import (
  FORMAT,
  CheckpointError,
  PathLike,
  as_jax,
  check_metadata,
  checksum,
  flatten,
  host,
  metadata_fields,
  unflatten,
)
from pqjax._src.io.writer import Writer

# Output shards hold at most this many bytes by default.
SHARD_BYTES = 2 << 30


def claims(path: Path) -> bool:
  return path.is_dir() and (path / sources.INDEX).exists()


def _arrays(source: sources.Source) -> dict[str, np.ndarray]:
  """Every tensor of the source by its stored name, as read-only memory-mapped views."""
  return {t.stored.name: source.view(t.stored) for t in source}


def from_maps(
  source: sources.Source, meta: dict[str, Any], where: Path, target: Any = None
) -> Any:
  """The pqjax tree of memory-mapped tensors: checked, then copied tensor by tensor
  onto the device, or where ``target``'s leaves' shardings place them."""
  spec = check_metadata(meta, where)
  places = _target_shardings(target, spec, where) if target is not None else {}
  tensors = _arrays(source)
  # An index's metadata also says its size (total_size, an int as transformers writes
  # it), which is not checksummed.
  fields = {k: v for k, v in meta.items() if k != 'total_size'}
  by_name = {t.stored.name: t.stored for t in source}
  if meta.get('sha256') != checksum(
    fields, tensors, lambda name: source.release(by_name[name])
  ):
    raise CheckpointError(
      f'{where}: corrupted: the data does not match the checksum in its metadata'
    )
  stored = {id(tensors[t.stored.name]): t.stored for t in source}

  def convert(x: np.ndarray) -> Any:
    # A host copy first: on CPU a device array may alias its host buffer.
    s = stored.get(id(x))
    place = places.get(s.name) if s is not None else None
    out = as_jax(np.array(x)) if place is None else jax.device_put(np.array(x), place)
    if s is not None:
      source.release(s)
    return out

  return unflatten(spec, tensors, where, convert=convert)


def _target_shardings(target: Any, spec: dict[str, Any], where: Path) -> dict[str, Any]:
  """Each tensor's sharding in ``target``, a tree like the saved one (arrays or
  ``jax.ShapeDtypeStruct`` leaves); CheckpointError where the trees differ."""
  target_spec, leaves = flatten(orbax.reorder(target, spec))
  if target_spec != spec:
    raise CheckpointError(
      f'{where}: target does not match the checkpoint at '
      + orbax.spec_difference(spec, target_spec)
      + ' (checkpoint vs target)'
    )
  return {
    name: x.sharding
    for name, x in leaves.items()
    if getattr(x, 'sharding', None) is not None
  }


def load(path: PathLike, target: Any = None) -> Any:
  """A pqjax checkpoint written as a folder of shards, bit for bit (placed by
  ``target``'s shardings, as :func:`from_maps`)."""
  path = Path(path)
  stored, meta = sources.shard_files(path)
  with sources.Source(sources.flat_tensors(stored, sep=None), str(path)) as source:
    return from_maps(source, meta, path, target)


def read_float(path: Path) -> Any:
  """A float tree from a folder of shards: flat names split on ``.``; a pqjax
  checkpoint loads as saved."""
  from pqjax._src.io.safetensors import nest

  stored, meta = sources.shard_files(path)
  if meta.get('format') == FORMAT:
    return load(path)
  with sources.Source(sources.flat_tensors(stored, sep=None), str(path)) as source:
    return nest({t.stored.name: as_jax(source.read(t)) for t in source}, path)


def save(
  path: PathLike, tree: Any, *, overwrite: bool = False, shard_bytes: int = SHARD_BYTES
) -> None:
  """Saves a (quantized) tree as a folder of shards with an index."""
  spec, tensors = flatten(tree)
  tensors = host(tensors)
  meta = metadata_fields(json.dumps(spec, separators=(',', ':')))

  def write(tmp: Path) -> None:
    writer = Writer(
      tmp, {n: (x.shape, x.dtype) for n, x in tensors.items()}, meta, shard_bytes
    )
    try:
      for name, x in tensors.items():
        writer.write(name, x)
      writer.finish()
    except BaseException:
      writer.abort()
      raise

  atomic.atomic_write(
    path, write, overwrite, lambda p: claims(p) or orbax.is_checkpoint(p)
  )
