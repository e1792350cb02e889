"""A pqjax checkpoint's tensors read through memory maps into its tree.

Shared by a single safetensors file and a folder of shards: the tensors are checked
against the checksum a block at a time, then copied onto the device (or onto a
target's shardings) one at a time, each tensor's pages handed back after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from pqjax._src.core.leaves import PyTree
from pqjax._src.io import orbax, sources
from pqjax._src.io.treespec import (
  CheckpointError,
  as_jax,
  check_metadata,
  checksum,
  flatten,
  unflatten,
)


def _arrays(source: sources.Source) -> dict[str, np.ndarray]:
  """Every tensor of the source by its stored name, as read-only memory-mapped views."""
  return {t.stored.name: source.view(t.stored) for t in source}


def from_maps(
  source: sources.Source, meta: dict[str, Any], where: Path, target: PyTree = None
) -> PyTree:
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
    fields, tensors, lambda name, lo, hi: source.release(by_name[name], lo, hi)
  ):
    raise CheckpointError(
      f'{where}: corrupted: the data does not match the checksum in its metadata'
    )
  stored = {id(tensors[t.stored.name]): t.stored for t in source}

  def convert(x: np.ndarray) -> jax.Array | np.ndarray:
    # A host copy first: on CPU a device array may alias its host buffer.
    s = stored.get(id(x))
    place = places.get(s.name) if s is not None else None
    out = as_jax(np.array(x)) if place is None else jax.device_put(np.array(x), place)
    if s is not None:
      source.release(s)
    return out

  return unflatten(spec, tensors, where, convert=convert)


def _target_shardings(
  target: PyTree, spec: dict[str, Any], where: Path
) -> dict[str, jax.sharding.Sharding]:
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
