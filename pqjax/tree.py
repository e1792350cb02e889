"""Leaf selection, paths, and grouping of leaves for batched search."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from pqjax.qarray import is_array, matrix_shape

Filter = Callable[[str, Any], bool]


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocks:
  """How one leaf is cut into scale blocks: ``nk`` row blocks by ``ncol`` columns."""

  k: int
  n: int
  nk: int
  ncol: int


Granularity = str | int


def check_granularity(granularity: Granularity) -> None:
  if isinstance(granularity, bool) or not (
      granularity in ('tensor', 'channel')
      or (isinstance(granularity, (int, np.integer)) and granularity >= 1)):
    raise ValueError(
        f'granularity must be "tensor", "channel" or a positive int group size,'
        f' got {granularity!r}')


def blocks_for(shape: tuple[int, ...], granularity: Granularity) -> Blocks:
  """Scale blocks of a leaf of ``shape`` under ``granularity``."""
  k, n = matrix_shape(shape)
  if granularity == 'tensor':
    return Blocks(k=k, n=n, nk=1, ncol=1)
  if granularity == 'channel':
    return Blocks(k=k, n=n, nk=1, ncol=n)
  # A group that does not divide K leaves a shorter last block: ceil(K / G) blocks
  # of ceil(K / nk) <= G rows, the same number of scales, spread as evenly.
  return Blocks(k=k, n=n, nk=-(-k // int(granularity)), ncol=n)
