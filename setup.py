"""Builds pqjax's native CPU kernels (pqjax/_src/runtime/native) as an optional
extension, against the installed jaxlib's XLA FFI headers.

Without a C++ compiler, or without jax at build time, pqjax installs without them and
runs on its XLA paths.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = 'pqjax/_src/runtime/native'
SOURCES = ['ffi.cc', 'portable.cc', 'avx2.cc', 'avx512.cc']


def _jax_headers() -> tuple[str, str] | None:
  """(XLA FFI include folder, jaxlib version) of the jax this build sees."""
  try:
    import jax

    return jax.ffi.include_dir(), importlib.metadata.version('jaxlib')
  except Exception as e:  # no jax: pqjax installs without native kernels
    print(f'pqjax: not building native kernels ({e})', file=sys.stderr)
    return None


class BuildNative(build_ext):
  """Compiles the sources side by side (each instruction set is a long compile)."""

  def build_extension(self, ext: Extension) -> None:
    compile_one = super().build_extension
    if ext.name.endswith('_kernels') and len(ext.sources) > 1 and os.cpu_count() != 1:
      objects = self._compile_parallel(ext)
      ext.extra_objects = [*ext.extra_objects, *objects]
      sources, ext.sources = ext.sources, []
      try:
        return compile_one(ext)
      finally:
        ext.sources = sources
    return compile_one(ext)

  def _compile_parallel(self, ext: Extension) -> list[str]:
    macros = list(ext.define_macros) + [(u,) for u in ext.undef_macros]
    build = lambda src: self.compiler.compile(
      [src],
      output_dir=self.build_temp,
      macros=macros,
      include_dirs=ext.include_dirs,
      extra_postargs=ext.extra_compile_args,
      depends=ext.depends,
    )
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
      return [obj for objs in pool.map(build, ext.sources) for obj in objs]


def _extensions() -> list[Extension]:
  found = _jax_headers()
  if found is None or os.environ.get('PQJAX_NATIVE_BUILD', '1') == '0':
    return []
  include, jaxlib = found
  return [
    Extension(
      'pqjax._src.runtime.native._kernels',
      sources=[f'{NATIVE}/{s}' for s in SOURCES],
      depends=[f'{NATIVE}/kernel.h', f'{NATIVE}/driver.h'],
      include_dirs=[include, NATIVE],
      define_macros=[('PQJAX_JAXLIB_VERSION', f'"{jaxlib}"')],
      extra_compile_args=['-std=c++17', '-O3', '-fvisibility=hidden'],
      language='c++',
      optional=True,
    )
  ]


setup(ext_modules=_extensions(), cmdclass={'build_ext': BuildNative})
