"""Scale blocks: how a leaf is viewed as a ``(K, N)`` matrix and cut into blocks.

Every selected leaf is viewed as 2-D ``(K, N)`` with N its last axis (Flax puts
output features last). A block is ``ceil(K / nk)`` consecutive rows of one column
(``ncol = N``) or of all columns (``ncol = 1``); the last block may be shorter.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

# "channel": one scale per column; "tensor": one per leaf; an int G: one per G
# consecutive rows of one column.
Granularity = Literal['tensor', 'channel'] | int


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """The 2-D ``(K, N)`` view of a leaf: N is the last axis, K the rest."""
  if not shape:
    return 1, 1
  return math.prod(shape[:-1]), shape[-1]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Blocks:
  """How one leaf is cut into scale blocks: ``nk`` row blocks by ``ncol`` columns."""

  k: int
  n: int
  nk: int
  ncol: int


def check_granularity(granularity: object) -> Granularity:
  if isinstance(granularity, bool) or not (
    granularity in ('tensor', 'channel')
    or (isinstance(granularity, (int, np.integer)) and granularity >= 1)
  ):
    raise ValueError(
      f'granularity must be "tensor", "channel" or a positive int group size,'
      f' got {granularity!r}'
    )
  return granularity if isinstance(granularity, str) else int(granularity)


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


def block_view(w: jax.Array, nk: int) -> jax.Array:
  """Views a 2-D ``(K, N)`` array as ``(nk, ceil(K / nk), N)`` blocks of rows.

  When ``nk`` does not divide K, the last block is padded with zeros, which every
  grid decodes exactly and which therefore add no error.
  """
  k, n = w.shape
  rows = -(-k // nk)
  if rows * nk != k:
    w = jnp.pad(w, ((0, rows * nk - k), (0, 0)))
  return w.reshape(nk, rows, n)


def block_absmax(w3: jax.Array, ncol: int) -> jax.Array:
  """Absolute maximum of each block, shape ``(nk, 1, ncol)``, in float32.

  Taken on the bit patterns, whose integer order is the order of non-negative
  floats (NaN above Inf): XLA compares subnormal floats as zeros, and a block of
  subnormal weights must keep a nonzero maximum to be told from an all-zero one.
  """
  a = jax.lax.bitcast_convert_type(jnp.abs(w3.astype(jnp.float32)), jnp.int32)
  m = jnp.max(a, axis=1, keepdims=True)
  if ncol == 1:
    m = jnp.max(m, axis=2, keepdims=True)
  return jax.lax.bitcast_convert_type(m, jnp.float32)
