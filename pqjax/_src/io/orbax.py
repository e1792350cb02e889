"""Orbax: a directory holding ``pqjax.json`` (the metadata) and ``arrays/``.

``arrays/`` is an Orbax checkpoint of the flat ``{name: tensor}`` dict, so arrays can
be restored straight onto a mesh with a target's shardings. Any other Orbax
directory can be read as a float tree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pqjax._src.core.leaves import KeyPath, PyTree, path_str
from pqjax._src.io import atomic
from pqjax._src.io.treespec import (
  FORMAT,
  CheckpointError,
  PathLike,
  as_jax,
  check_metadata,
  flatten,
  host,
  metadata,
  unflatten,
  verify,
  walk_refs,
)

METADATA_FILE = 'pqjax.json'
ARRAYS_DIR = 'arrays'


def save(directory: PathLike, tree: PyTree, *, overwrite: bool = False) -> None:
  """Saves a (quantized) tree as an Orbax checkpoint plus ``pqjax.json``."""
  import orbax.checkpoint as ocp

  spec, tensors = flatten(tree)
  meta = metadata(json.dumps(spec, separators=(',', ':')), host(tensors))

  def write(tmp: Path) -> None:
    tmp.mkdir()
    if tensors:
      ocp.PyTreeCheckpointer().save(tmp.absolute() / ARRAYS_DIR, tensors)
    (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=1))
    atomic.fsync(tmp / METADATA_FILE)

  atomic.atomic_write(directory, write, overwrite, is_checkpoint)


def is_checkpoint(directory: Path) -> bool:
  """Whether ``directory`` holds a pqjax Orbax checkpoint and nothing else."""
  try:
    names = set(os.listdir(directory))
    meta = json.loads((directory / METADATA_FILE).read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
    return False
  return (
    isinstance(meta, dict)
    and meta.get('format') == FORMAT
    and names <= {METADATA_FILE, ARRAYS_DIR}
  )


def read_json(path: Path, where: Path) -> Any:
  """A metadata file's JSON; CheckpointError naming ``where`` if missing or corrupt."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise CheckpointError(
      f'{where}: not a pqjax Orbax checkpoint (no {METADATA_FILE})'
    ) from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise CheckpointError(f'{where}: corrupted {METADATA_FILE}: {e}') from None


def _restore_args(target_tensors: dict[str, Any]) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  def one(x: Any) -> Any:
    sharding = getattr(x, 'sharding', None)
    if sharding is None:
      return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(
      sharding=sharding, global_shape=tuple(x.shape), dtype=x.dtype
    )

  return {k: one(v) for k, v in target_tensors.items()}


def reorder(target: PyTree, spec: Any) -> PyTree:
  """``target`` with its dicts in the checkpoint's key order (tree_map sorts keys)."""
  if not isinstance(spec, dict):
    return target
  kind, values = spec.get('type'), spec.get('values') or []
  if (
    kind in ('dict', 'frozendict')
    and isinstance(target, dict)
    and set(target) == set(spec.get('keys', ()))
  ):
    node = {k: reorder(target[k], v) for k, v in zip(spec['keys'], values)}
    return node if type(target) is dict else type(target)(node)
  if (
    kind in ('list', 'tuple')
    and type(target) in (list, tuple)
    and len(target) == len(values)
  ):
    return type(target)(reorder(t, v) for t, v in zip(target, values))
  return target


def spec_difference(a: dict[str, Any], b: dict[str, Any], path: KeyPath = ()) -> str:
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
        return spec_difference(x, y, (*path, make(k)))
    return where
  meta = ('bits', 'shape', 'dtype', 'layer_axes', 'transposed')
  if kind == 'qarray' and all(a.get(k) == b.get(k) for k in meta):
    a, b = a['fields'], b['fields']
  diff = [
    f'{k} {a.get(k)!r} vs {b.get(k)!r}'
    for k in sorted(set(a) | set(b))
    if a.get(k) != b.get(k)
  ]
  return f'{where}: ' + ', '.join(diff)


def load(directory: PathLike, target: PyTree = None) -> PyTree:
  """Loads a tree saved by :func:`save`, bit for bit.

  ``target``, a tree like the saved one (arrays or ``jax.ShapeDtypeStruct``
  leaves), must match the checkpoint; its leaves' shardings place the restored
  arrays.
  """
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: not a directory (an Orbax checkpoint is one)')
  meta = read_json(directory / METADATA_FILE, directory)
  spec = check_metadata(meta, directory)
  want: dict[str, Any] = {}
  target_tensors = None
  # The tree spec is read before the checksum can be checked (it names the arrays to
  # restore), so a malformed one must fail here as cleanly as in unflatten.
  try:
    if target is not None:
      target_spec, target_tensors = flatten(reorder(target, spec))
      if target_spec != spec:
        raise CheckpointError(
          f'{directory}: target does not match the checkpoint at '
          + spec_difference(spec, target_spec)
          + ' (checkpoint vs target)'
        )
    walk_refs(spec, want)
  except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f'{directory}: malformed pqjax metadata: {e!r}') from None
  tensors = _restore_arrays(directory, want, target_tensors) if want else {}
  if target_tensors is None:
    verify(meta, tensors, directory)
    return unflatten(spec, tensors, directory)
  if all(getattr(x, 'is_fully_addressable', True) for x in tensors.values()):
    verify(meta, {k: np.asarray(v) for k, v in tensors.items()}, directory)
  # Keep the arrays where the target's shardings put them; host arrays go to JAX.
  return unflatten(
    spec,
    tensors,
    directory,
    convert=lambda x: x if isinstance(x, jax.Array) else as_jax(x),
  )


def _restore_arrays(
  directory: Path, want: dict[str, Any], target_tensors: dict[str, Any] | None
) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  arrays = directory / ARRAYS_DIR
  if not arrays.is_dir():
    raise CheckpointError(f'{directory}: incomplete: {ARRAYS_DIR}/ is missing')
  args = (
    _restore_args({k: target_tensors[k] for k in want})
    if target_tensors is not None
    else {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want}
  )
  try:
    restored = ocp.PyTreeCheckpointer().restore(arrays.absolute(), restore_args=args)
  except Exception as e:  # Orbax and TensorStore raise many kinds of errors
    raise CheckpointError(f'{directory}: cannot read the Orbax arrays: {e}') from None
  if not isinstance(restored, dict) or set(restored) != set(want):
    raise CheckpointError(f'{directory}: its Orbax arrays do not match {METADATA_FILE}')
  return restored


def read_float(directory: Path) -> PyTree:
  """A float tree from an Orbax directory; a pqjax checkpoint loads as saved."""
  if (directory / METADATA_FILE).exists():
    return load(directory)
  import orbax.checkpoint as ocp

  if not any(directory.iterdir()):
    raise CheckpointError(f'{directory}: empty directory, not an Orbax checkpoint')
  try:
    return ocp.PyTreeCheckpointer().restore(directory.absolute())
  except Exception as e:  # Orbax and TensorStore raise many kinds of errors
    raise CheckpointError(
      f'{directory}: cannot read as an Orbax checkpoint: {e}'
    ) from None


def claims(path: Path) -> bool:
  # A directory, or a new name with no suffix, to be written as one.
  return path.is_dir() or not (os.path.lexists(path) or path.suffix)
