"""Folders of safetensors shards with ``model.safetensors.index.json``.

pqjax writes a checkpoint as such a folder (:mod:`writer`), its metadata in the
index's ``metadata``; Hugging Face writes float models the same way. Both are read
through memory maps, tensor by tensor: each tensor is copied onto the device and its
pages handed back, so loading needs about the checkpoint's own size, not twice.
"""

from __future__ import annotations

import json
from pathlib import Path

from pqjax._src.core.leaves import PyTree
from pqjax._src.io import atomic, mapped, orbax, sources
from pqjax._src.io.treespec import (
  FORMAT,
  PathLike,
  as_jax,
  flatten,
  host,
  metadata_fields,
  nest,
)
from pqjax._src.io.writer import Writer

# Output shards hold at most this many bytes by default.
SHARD_BYTES = 2 << 30


def claims(path: Path) -> bool:
  return path.is_dir() and (path / sources.INDEX).exists()


def load(path: PathLike, target: PyTree = None) -> PyTree:
  """A pqjax checkpoint written as a folder of shards, bit for bit (placed by
  ``target``'s shardings, as :func:`mapped.from_maps`)."""
  path = Path(path)
  stored, meta = sources.shard_files(path)
  with sources.Source(sources.flat_tensors(stored, sep=None), str(path)) as source:
    return mapped.from_maps(source, meta, path, target)


def read_float(path: Path) -> PyTree:
  """A float tree from a folder of shards: flat names split on ``.``; a pqjax
  checkpoint loads as saved."""
  stored, meta = sources.shard_files(path)
  if meta.get('format') == FORMAT:
    return load(path)
  with sources.Source(sources.flat_tensors(stored, sep=None), str(path)) as source:
    return nest({t.stored.name: as_jax(source.read(t)) for t in source}, path)


def save(
  path: PathLike, tree: PyTree, *, overwrite: bool = False, shard_bytes: int = SHARD_BYTES
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
