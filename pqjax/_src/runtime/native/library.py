"""The native CPU kernel library: found, checked and registered with XLA once.

The library (``_kernels``, C++ built from this folder's sources when pqjax is
installed, against the installed jaxlib's XLA FFI headers) holds one XLA FFI handler,
``pqjax_matmul``, and kernels for several instruction sets. Which one runs is chosen
here: the best the CPU has, or the one named by the environment variable
``PQJAX_NATIVE_LEVEL`` (``avx512``, ``avx2`` or ``portable``).

Where the library is missing, was built for another jaxlib, or cannot load, pqjax
runs on its XLA paths and says why once, with a warning.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import warnings
from typing import Literal

import jax

# The instruction-set levels, in the library's numbering.
Level = Literal['portable', 'avx2', 'avx512']
LEVELS: tuple[Level, ...] = ('portable', 'avx2', 'avx512')
LEVEL_VARIABLE = 'PQJAX_NATIVE_LEVEL'
# Set to 0 to run without the library (the XLA paths), as if it were not built.
ENABLE_VARIABLE = 'PQJAX_NATIVE'
TARGET = 'pqjax_matmul'
_MODULE = 'pqjax._src.runtime.native._kernels'


@dataclasses.dataclass(frozen=True)
class NativeStatus:
  """What the library can do in this process.

  Attributes:
    loaded: whether the handler is registered with XLA.
    reason: why not, when it is not.
    levels: the levels this CPU runs, best last.
    level: the level products use (the best, or the one the environment names).
    path: the library file.
  """

  loaded: bool
  reason: str = ''
  levels: tuple[Level, ...] = ()
  level: Level | None = None
  path: str = ''


def _installed_jaxlib() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return getattr(jax.lib, '__version__', 'unknown')


def _find() -> str | None:
  spec = importlib.util.find_spec(_MODULE)
  return spec.origin if spec is not None else None


def choose_level(levels: tuple[Level, ...]) -> tuple[Level | None, str]:
  """The level to run among ``levels`` (best last): the best, or the one the
  environment names; None and the reason where it names one that cannot run."""
  forced = os.environ.get(LEVEL_VARIABLE)
  if not forced:
    return levels[-1], ''
  for level in levels:
    if forced == level:
      return level, ''
  if forced not in LEVELS:
    return None, f'{LEVEL_VARIABLE}={forced!r} is not one of {LEVELS}'
  return None, f'{LEVEL_VARIABLE}={forced}: this CPU runs only {levels}'


def _load() -> NativeStatus:
  if os.environ.get(ENABLE_VARIABLE, '1') == '0':
    return NativeStatus(False, f'disabled by {ENABLE_VARIABLE}=0')
  path = _find()
  if path is None:
    return NativeStatus(
      False,
      'the native library is not built (no C++ compiler at install?); reinstall'
      ' pqjax with a compiler to build it',
    )
  try:
    lib = ctypes.CDLL(path)
    lib.pqjax_native_jaxlib.restype = ctypes.c_char_p
    built = lib.pqjax_native_jaxlib().decode()
    mask = int(lib.pqjax_native_levels())
  except (OSError, AttributeError) as e:
    return NativeStatus(
      False, f'the native library at {path} cannot load: {e}', path=path
    )
  installed = _installed_jaxlib()
  if built != installed:
    return NativeStatus(
      False,
      f'the native library was built against jaxlib {built}, but jaxlib {installed}'
      ' is installed; reinstall pqjax to rebuild it',
      path=path,
    )
  levels = tuple(name for i, name in enumerate(LEVELS) if mask & (1 << i))
  level, reason = choose_level(levels)
  if level is None:
    return NativeStatus(False, reason, path=path)
  try:
    jax.ffi.register_ffi_target(
      TARGET, jax.ffi.pycapsule(lib.pqjax_matmul), platform='cpu'
    )
  except Exception as e:  # XLA refuses the handler: keep the XLA paths
    return NativeStatus(False, f'XLA did not register the native handler: {e}', path=path)
  return NativeStatus(True, levels=levels, level=level, path=path)


@functools.cache
def status() -> NativeStatus:
  """Whether pqjax's native CPU kernels run in this process, and which.

  The library is loaded on the first call; where it cannot be used, the reason is
  given once as a ``RuntimeWarning`` (products then run on the XLA paths).

  Returns:
    A :class:`NativeStatus`.
  """
  result = _load()
  if not result.loaded and not result.reason.startswith('disabled'):
    warnings.warn(
      f'pqjax runs products on its XLA paths: {result.reason}',
      RuntimeWarning,
      stacklevel=2,
    )
  return result


def available() -> bool:
  """Whether native products can run here (the library loaded, on a CPU backend)."""
  return status().loaded


def level_index(level: Level) -> int:
  return LEVELS.index(level)
