"""Atomic writes: a checkpoint appears whole at its path, or not at all.

Writes go to a temporary path in the destination's folder and are moved into place
in one step. Without ``overwrite`` that step fails if anything is at the destination,
even something that appeared while writing: a file is hard-linked to its final name
(``link`` never replaces), a directory is renamed onto an empty directory the writer
has just created there (``mkdir`` is the claim: of several writers racing to one
path, exactly one wins). A failed write leaves nothing behind.
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


def _exists(dest: Path) -> FileExistsError:
  return FileExistsError(f'{dest} exists; pass overwrite=True to replace it')


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


def _place_file(src: Path, dest: Path) -> None:
  """Gives the file ``src`` the name ``dest``; FileExistsError if ``dest`` exists."""
  try:
    os.link(src, dest)
  except FileExistsError:
    raise _exists(dest) from None
  except OSError:
    # No hard links on this file system: claim the name with an exclusive create,
    # then move the file over the claim.
    try:
      os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
      raise _exists(dest) from None
    os.replace(src, dest)


def _place_dir(src: Path, dest: Path) -> None:
  """Renames the directory ``src`` to ``dest``; FileExistsError if ``dest`` exists."""
  if os.name == 'nt':  # Windows' rename never replaces
    try:
      os.rename(src, dest)
    except FileExistsError:
      raise _exists(dest) from None
    return
  # POSIX rename replaces an empty directory: create it first, so that the name is
  # claimed atomically, then rename onto it.
  try:
    os.mkdir(dest)
  except FileExistsError:
    raise _exists(dest) from None
  try:
    os.rename(src, dest)
  except BaseException:
    # Only the empty claim is removed; anything put inside meanwhile stays.
    try:
      os.rmdir(dest)
    except OSError:
      pass
    raise


def replaceable(dest: Path, is_checkpoint: Callable[[Path], bool]) -> bool:
  """Whether ``overwrite`` may remove ``dest``: a file, an empty folder, a checkpoint."""
  if not dest.is_dir() or dest.is_symlink():
    return True
  return not any(dest.iterdir()) or is_checkpoint(dest)


def atomic_write(
  dest: PathLike,
  write: Callable[[Path], None],
  overwrite: bool = False,
  is_checkpoint: Callable[[Path], bool] = lambda path: False,
) -> None:
  """Calls ``write(tmp)`` for a temporary path next to ``dest``, then moves it there.

  On any failure the temporary path is removed and ``dest`` is left as it was.
  Without ``overwrite``, FileExistsError if ``dest`` exists, before writing or when
  moving into place. With it, ``dest`` is replaced if it is a file, an empty folder
  or a folder that ``is_checkpoint`` accepts; any other folder is left alone.
  """
  dest = Path(dest)
  if os.path.lexists(dest):
    if not overwrite:
      raise _exists(dest)
    if not replaceable(dest, is_checkpoint):
      raise FileExistsError(
        f'{dest} is a folder that is not a pqjax checkpoint; not replacing it'
      )
  parent = dest.parent if str(dest.parent) else Path('.')
  if not parent.is_dir():
    raise FileNotFoundError(f'{parent} is not a directory (writing {dest})')
  # A private folder in the same file system makes the final rename atomic.
  work = Path(tempfile.mkdtemp(dir=parent, prefix=f'.{dest.name}.', suffix='.tmp'))
  try:
    tmp = work / dest.name
    write(tmp)
    if overwrite:
      _replace(tmp, dest, work / 'replaced')
    elif tmp.is_dir():
      _place_dir(tmp, dest)
    else:
      _place_file(tmp, dest)
  finally:
    shutil.rmtree(work, ignore_errors=True)
