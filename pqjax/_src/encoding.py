"""Encoding: each layer's packed codes and stored block scales, from its fit.

Jitted per layer shape and batched over the layers of that shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pqjax._src.core import operator, packing
from pqjax._src.core.blocks import block_view
from pqjax._src.core.grid import steps as steps_of
from pqjax._src.search.config import SearchConfig
from pqjax._src.search.objective import exact_inputs
from pqjax._src.search.stats import stack


def _block_clip(
  xs: jax.Array,
  absmax: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  bits: int,
  grid: str,
  config: SearchConfig,
) -> jax.Array:
  """Each block's clip ratio: the best of a few candidates around the layer's."""
  cands = jnp.concatenate(
    [
      clip[None],
      jnp.linspace(
        jnp.maximum(clip - config.block_clip_width, config.clip_lo),
        jnp.minimum(clip + config.block_clip_width, 1.0),
        config.block_clips,
      ),
    ]
  )
  x, log_x, d = exact_inputs(xs, bits, grid)

  def block_errors(c):
    xhat = operator.reconstruct(x, log_x, d, alpha, c, grid)
    e = jnp.sum(jnp.square(x - xhat), axis=1, keepdims=True)
    return e if absmax.shape[2] > 1 else jnp.sum(e, axis=2, keepdims=True)

  errs = jax.lax.map(block_errors, cands)
  return cands[jnp.argmin(errs, axis=0)]


def encode_block(
  w: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  absmax: jax.Array,
  storage: jax.Array,
  *,
  nk: int,
  bits: int,
  grid: str,
  block_clip: bool,
  config: SearchConfig,
  column_max: Callable[[jax.Array], jax.Array] = lambda x: x,
) -> tuple[jax.Array, ...]:
  """One layer's packed codes and its scales: float32 values ``(nk, ncol)``, and
  their uint8 steps ``(nk, ncol)`` and column scale ``(1, ncol)``.

  ``storage`` indexes ``SCALE_DTYPES``: the codes are chosen against the scales as
  stored. ``column_max`` completes a column's largest scale across devices.
  """
  w3 = block_view(w, nk)
  if block_clip:
    xs = operator.divide(w3, absmax)
    clip = _block_clip(xs, absmax, alpha, clip, bits, grid, config)
  scale = absmax * clip
  column = column_max(jnp.max(scale, axis=0, keepdims=True))
  steps = packing.coded_scales(scale, column)
  # In the order of SCALE_DTYPES: float32, float16, uint8.
  stored = [scale, scale.astype(jnp.float16).astype(jnp.float32)]
  stored.append(packing.scale_values(steps, column))
  # Encode against the scale as stored, so the codes fit the rounded scale.
  scale = jnp.stack(stored)[storage.astype(jnp.int32)]
  q = operator.encode(w3, scale, alpha, bits, grid).reshape(-1, w.shape[1])[: w.shape[0]]
  codes = packing.pack(q, bits, steps_of(bits, grid)[0])
  return codes, scale[:, 0, :], steps[:, 0, :], column[:, 0, :]


class Encoding(NamedTuple):
  """A group's arrays, one per leaf: packed codes, the scales' float32 values as
  stored, and their uint8 form (steps and column scale), which only leaves that
  store uint8 scales keep."""

  codes: list[jax.Array]
  scales: list[jax.Array]
  steps: list[jax.Array]
  columns: list[jax.Array]


def split_layers(x: jax.Array, layers: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  """``(L, ...)`` per-layer results cut per leaf, each ``(*layers[i], ...)``."""
  out, start = [], 0
  for shape in layers:
    count = math.prod(shape)
    out.append(x[start : start + count].reshape(*shape, *x.shape[1:]))
    start += count
  return out


@functools.partial(
  jax.jit,
  static_argnames=('k', 'n', 'nk', 'layers', 'bits', 'grid', 'block_clip', 'config'),
)
def encode_layers(
  leaves: Sequence[jax.Array],
  alpha: jax.Array,
  clip: jax.Array,
  absmax: jax.Array,
  storage: jax.Array,
  *,
  k: int,
  n: int,
  nk: int,
  layers: tuple[tuple[int, ...], ...],
  bits: int,
  grid: str,
  block_clip: bool,
  config: SearchConfig,
) -> Encoding:
  """Each leaf's packed codes and scales, as separate buffers.

  ``layers[i]`` are leaf ``i``'s stacked-layer axes: its codes are
  ``(*layers[i], packed_rows, N)`` and its scales ``(*layers[i], nk, ncol)``. The
  ``L`` layers of all leaves, in order, are encoded in one batch. ``absmax`` is
  :func:`group_stats`' ``(L, nk, 1, ncol)``, so that pass is not repeated;
  ``storage`` ``(L,)`` says how each layer stores its scales (an index of
  ``SCALE_DTYPES``).
  """
  fn = functools.partial(
    encode_block,
    nk=nk,
    bits=bits,
    grid=grid,
    block_clip=block_clip,
    config=config,
  )
  out = jax.vmap(fn)(stack(leaves, k, n), alpha, clip, absmax, storage)
  return Encoding(*(split_layers(x, layers) for x in out))
