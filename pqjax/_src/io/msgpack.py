"""flax msgpack files (``flax.serialization``), read as float trees."""

from __future__ import annotations

from pathlib import Path

from pqjax._src.core.leaves import PyTree
from pqjax._src.io.treespec import CheckpointError


def read_float(path: Path) -> PyTree:
  """The float tree of a flax msgpack file."""
  from flax import serialization

  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
  except Exception as e:  # msgpack raises several unrelated types
    raise CheckpointError(
      f'{path}: not a valid flax msgpack file: {_reason(e)}'
    ) from None
  if not isinstance(tree, dict):
    raise CheckpointError(
      f'{path}: not a flax msgpack parameter tree (got {type(tree).__name__})'
    )
  return tree


def _reason(e: Exception) -> str:
  """Why msgpack could not read the bytes; some of its errors carry no message."""
  import msgpack

  if isinstance(e, msgpack.ExtraData):
    return 'more bytes follow the first msgpack value'
  if isinstance(e, msgpack.FormatError):
    return 'malformed msgpack data (a byte that starts no msgpack value)'
  if isinstance(e, msgpack.StackError):
    return 'msgpack data nested too deeply'
  return str(e) or type(e).__name__


def claims(path: Path) -> bool:
  return path.suffix == '.msgpack'
