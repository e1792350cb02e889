"""Leaves of a pytree: what is an array, how a path is named, the default selection."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax.numpy as jnp

# A pytree in JAX's sense: dicts, lists, tuples, None and registered nodes (a QArray,
# an ``nnx.State``) around leaves of any type. Its structure is the caller's, so it
# types as Any; the alias says which values are trees.
PyTree = Any
# A leaf's path as ``jax.tree_util.tree_flatten_with_path`` gives it: dict keys,
# sequence indices and attribute names (``DictKey``, ``SequenceKey``, ``GetAttrKey``).
KeyPath = tuple[Hashable, ...]

# ``filter(path, leaf) -> bool``: whether to quantize a leaf (``path``: ``a/b/0/kernel``).
Filter = Callable[[str, Any], bool]


def is_array(x: object) -> bool:
  """Whether ``x`` is array-like: a JAX or NumPy array, a tracer or a shape struct."""
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def key_name(key: Hashable) -> str:
  """One path entry as text: a dict key, a sequence index or an attribute name."""
  for attr in ('key', 'idx', 'name'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: KeyPath) -> str:
  """A leaf's path as ``a/b/0/kernel``; the root leaf is ``<root>``."""
  return '/'.join(key_name(k) for k in path) or '<root>'


def is_float_array(x: Any) -> bool:
  return is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def default_filter(path: str, leaf: Any) -> bool:
  """Floating leaves with two or more axes: kernels, conv kernels, embeddings."""
  del path
  return is_float_array(leaf) and leaf.ndim >= 2
