"""One registry of checkpoint formats, shared by load, save, the float readers, the CLI.

Each format is a module with ``claims(path)`` and some of ``save``, ``load`` (a pqjax
checkpoint) and ``read_float`` (any float tree in that format). A path's format is
the first registered one that claims it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from pqjax._src.core.leaves import KeyPath, PyTree, is_array, path_str
from pqjax._src.core.qarray import contains_qarray
from pqjax._src.io import msgpack, orbax, safetensors, shards
from pqjax._src.io.treespec import CheckpointError, PathLike

Capability = Literal['save', 'load', 'read_float']


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
  """A checkpoint format and what it can do."""

  # The name users pass as ``format=`` and the CLI's ``--format``.
  name: str
  # Whether a path (existing or to be written) is in this format.
  claims: Callable[[Path], bool]
  # ``save(path, tree, *, overwrite)``: writes a (quantized) tree atomically.
  save: Callable[..., None] | None = None
  # ``load(path, target=None)``: a pqjax checkpoint, bit for bit, placed by the
  # shardings of ``target``'s leaves.
  load: Callable[..., PyTree] | None = None
  # ``read_float(path)``: a float tree from any file of the format.
  read_float: Callable[[Path], PyTree] | None = None
  # How the format is described in error messages.
  description: str = ''


_FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> None:
  """Adds a format; a later format with the same name replaces the earlier one."""
  _FORMATS[fmt.name] = fmt


def formats(capability: Capability | None = None) -> tuple[str, ...]:
  """Names of the registered formats, those with ``capability`` if given."""
  return tuple(
    name
    for name, f in _FORMATS.items()
    if capability is None or getattr(f, capability) is not None
  )


def _by_name(name: object, capability: Capability) -> Format:
  fmt = _FORMATS.get(name) if isinstance(name, str) else None
  if fmt is None or getattr(fmt, capability) is None:
    names = ' or '.join(f'"{n}"' for n in formats(capability))
    raise ValueError(f'format must be {names}, got {name!r}')
  return fmt


def _for_path(path: Path, capability: Capability) -> Format | None:
  for fmt in _FORMATS.values():
    if getattr(fmt, capability) is not None and fmt.claims(path):
      return fmt
  return None


def _unknown(path: Path, capability: Capability) -> CheckpointError:
  kinds = ', '.join(_FORMATS[n].description for n in formats(capability))
  return CheckpointError(f'{path}: unknown checkpoint format; expected {kinds}')


def load_float(path: PathLike) -> PyTree:
  """Reads a float parameter tree: an Orbax directory, flax msgpack or safetensors.

  The format follows the path: a directory is an Orbax checkpoint, ``*.msgpack`` a
  ``flax.serialization`` file, ``*.safetensors`` a safetensors file. A flat
  safetensors file (Hugging Face, PyTorch) becomes nested dicts by splitting names
  on ``.``; its arrays keep their layout (a PyTorch Linear weight stays
  ``(out, in)``). Non-float arrays (``position_ids``) come back untouched.

  Args:
    path: the checkpoint's file or directory.

  Returns:
    The tree of arrays.

  Raises:
    CheckpointError: the path is missing, of an unknown format, unreadable, or
      already quantized.
  """
  path = Path(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file or directory')
  fmt = _for_path(path, 'read_float')
  if fmt is None or fmt.read_float is None:
    raise _unknown(path, 'read_float')
  tree = fmt.read_float(path)
  if contains_qarray(tree):
    raise CheckpointError(f'{path}: already quantized (it holds QArray leaves)')
  return _arrays_only(tree, path)


def _arrays_only(tree: PyTree, where: Path) -> PyTree:
  """``tree`` with Python numbers as 0-d arrays; CheckpointError for other leaves.

  A parameter tree holds arrays: a string (which msgpack and Orbax can store)
  could be neither quantized nor saved, so it is refused here, by its path.
  """

  def one(path: KeyPath, x: Any) -> Any:
    if is_array(x):
      return x
    if isinstance(x, (bool, int, float, complex)):
      return np.asarray(x)
    raise CheckpointError(
      f'{where}: {path_str(path)} is a {type(x).__name__} ({x!r:.40}), not an array;'
      ' pqjax reads trees of arrays'
    )

  return jax.tree_util.tree_map_with_path(one, tree)


def load(path: PathLike, target: PyTree = None) -> PyTree:
  """Loads a pqjax checkpoint: a safetensors file, a folder of safetensors shards or
  an Orbax directory.

  Args:
    path: the checkpoint's file or directory.
    target: a tree like the saved one (arrays or ``jax.ShapeDtypeStruct`` leaves,
      e.g. ``jax.eval_shape`` of the quantization with shardings): each tensor is
      placed with its leaf's sharding, straight from the file.

  Returns:
    The saved tree, bit for bit.

  Raises:
    CheckpointError: the checkpoint is missing, truncated, corrupted or foreign.
  """
  path = Path(path)
  fmt = _for_path(path, 'load')
  # Anything else is read as safetensors, whose reader says what is wrong with it.
  loader = fmt.load if fmt is not None else _FORMATS['safetensors'].load
  assert loader is not None
  return loader(path) if target is None else loader(path, target)


def save(
  path: PathLike, tree: PyTree, *, format: str | None = None, overwrite: bool = False
) -> None:
  """Saves a (quantized) tree in a format named, or chosen by the path.

  Args:
    path: where to write; ``*.safetensors`` is a safetensors file, anything else an
      Orbax directory unless ``format`` says otherwise.
    tree: the tree to save.
    format: ``"safetensors"`` or ``"orbax"``; default from ``path``.
    overwrite: replace what is at ``path``.
  """
  fmt = save_format(path, format)
  assert fmt.save is not None
  fmt.save(path, tree, overwrite=overwrite)


def save_format(path: PathLike, format: str | None) -> Format:
  """The format :func:`save` writes ``path`` in; ValueError for a bad pair.

  A ``*.safetensors`` name is read back as one file whatever is there, so a folder
  format under it would write a checkpoint that nothing loads.
  """
  path = Path(path)
  if format is None:
    return _for_path(path, 'save') or _FORMATS['orbax']
  fmt = _by_name(format, 'save')
  file = _FORMATS['safetensors']
  if fmt is not file and file.claims(path):
    raise ValueError(
      f'{path}: a {path.suffix} name is read as {file.description}, but'
      f' format={fmt.name!r} writes a folder; name it without that suffix'
    )
  return fmt


register(
  Format(
    name='safetensors',
    claims=safetensors.claims,
    save=safetensors.save,
    load=safetensors.load,
    read_float=safetensors.read_float,
    description='a .safetensors file',
  )
)
register(
  Format(
    name='shards',
    claims=shards.claims,
    save=shards.save,
    load=shards.load,
    read_float=shards.read_float,
    description='a folder of safetensors shards with model.safetensors.index.json',
  )
)
register(
  Format(
    name='orbax',
    claims=orbax.claims,
    save=orbax.save,
    load=orbax.load,
    read_float=orbax.read_float,
    description='an Orbax directory',
  )
)
register(
  Format(
    name='msgpack',
    claims=msgpack.claims,
    read_float=msgpack.read_float,
    description='a .msgpack file (flax.serialization)',
  )
)
