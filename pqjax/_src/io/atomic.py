"""Atomic writes: a checkpoint appears whole at its path, or not at all.

Writes go to a temporary path in the destination's folder and are renamed into
place, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pqjax._src.io.treespec import PathLike


def fsync(path: Path) -> None:
  with open(path, 'rb') as f:
    os.fsync(f.fileno())


def _replace(src: Path, dest: Path, trash: Path) -> None:
  """Moves ``src`` to ``dest``, replacing what is there (file or directory)."""
  if src.is_file() and (dest.is_file() or not os.path.lexists(dest)):
    os.replace(src, dest)
    return
  moved = os.path.lexists(dest)
  if moved:
    os.rename(dest, trash)
  try:
    os.rename(src, dest)
  except BaseException:
    if moved:
      os.rename(trash, dest)
    raise


def atomic_write(
  dest: PathLike, write: Callable[[Path], None], overwrite: bool = False
) -> None:
  """Calls ``write(tmp)`` for a temporary path next to ``dest``, then renames it.

  On any failure the temporary path is removed and ``dest`` is left as it was.
  """
  dest = Path(dest)
  if os.path.lexists(dest) and not overwrite:
    raise FileExistsError(f'{dest} exists; pass overwrite=True to replace it')
  parent = dest.parent if str(dest.parent) else Path('.')
  if not parent.is_dir():
    raise FileNotFoundError(f'{parent} is not a directory (writing {dest})')
  # A private folder in the same file system makes the final rename atomic.
  work = Path(tempfile.mkdtemp(dir=parent, prefix=f'.{dest.name}.', suffix='.tmp'))
  try:
    tmp = work / dest.name
    write(tmp)
    _replace(tmp, dest, work / 'replaced')
  finally:
    shutil.rmtree(work, ignore_errors=True)
