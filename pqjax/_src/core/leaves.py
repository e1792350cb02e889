"""Leaves of a pytree: what is an array, how a path is named, the default selection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# ``filter(path, leaf) -> bool``: whether to quantize a leaf (``path``: ``a/b/0/kernel``).
Filter = Callable[[str, Any], bool]


def is_array(x: object) -> bool:
  """Whether ``x`` is array-like: a JAX or NumPy array, a tracer or a shape struct."""
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def key_name(key: Any) -> str:
  """One path entry as text: a dict key, a sequence index or an attribute name."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  """A leaf's path as ``a/b/0/kernel``; the root leaf is ``<root>``."""
  return '/'.join(key_name(k) for k in path) or '<root>'


def is_float_array(x: Any) -> bool:
  return is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def default_filter(path: str, leaf: Any) -> bool:
  """Floating leaves with two or more axes: kernels, conv kernels, embeddings."""
  del path
  return is_float_array(leaf) and leaf.ndim >= 2
