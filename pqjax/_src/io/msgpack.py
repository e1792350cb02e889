"""flax msgpack files (``flax.serialization``), read as float trees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pqjax._src.io.treespec import CheckpointError


def read_float(path: Path) -> Any:
  """The float tree of a flax msgpack file."""
  from flax import serialization

  try:
    tree = serialization.msgpack_restore(path.read_bytes())
  except OSError as e:
    raise CheckpointError(f'{path}: cannot read: {e.strerror or e}') from None
  except Exception as e:  # msgpack raises several unrelated types
    raise CheckpointError(f'{path}: not a valid flax msgpack file: {e}') from None
  if not isinstance(tree, dict):
    raise CheckpointError(
      f'{path}: not a flax msgpack parameter tree (got {type(tree).__name__})'
    )
  return tree


def claims(path: Path) -> bool:
  return path.suffix == '.msgpack'
