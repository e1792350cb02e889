"""Encoding: each layer's packed codes and stored block scales, from its fit.

Jitted per layer shape and batched over the layers of that shape.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pqjax._src.core import operator, packing
from pqjax._src.core.blocks import block_view
from pqjax._src.core.grid import steps
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
  fp16: jax.Array,
  *,
  nk: int,
  bits: int,
  grid: str,
  block_clip: bool,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  w3 = block_view(w, nk)
  if block_clip:
    xs = operator.divide(w3, absmax)
    clip = _block_clip(xs, absmax, alpha, clip, bits, grid, config)
  scale = absmax * clip
  # Encode against the scale as stored, so the codes fit the rounded scale.
  scale = jnp.where(fp16, scale.astype(jnp.float16).astype(jnp.float32), scale)
  q = operator.encode(w3, scale, alpha, bits, grid).reshape(-1, w.shape[1])[: w.shape[0]]
  return packing.pack(q, bits, steps(bits, grid)[0]), scale[:, 0, :]


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
  fp16: jax.Array,
  *,
  k: int,
  n: int,
  nk: int,
  layers: tuple[tuple[int, ...], ...],
  bits: int,
  grid: str,
  block_clip: bool,
  config: SearchConfig,
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Each leaf's packed codes and float32 scales, as separate buffers.

  ``layers[i]`` are leaf ``i``'s stacked-layer axes: its codes are
  ``(*layers[i], packed_rows, N)`` and its scales ``(*layers[i], nk, ncol)``. The
  ``L`` layers of all leaves, in order, are encoded in one batch. ``absmax`` is
  :func:`group_stats`' ``(L, nk, 1, ncol)``, so that pass is not repeated; ``fp16``
  ``(L,)`` marks the layers whose scales are rounded to float16.
  """
  fn = functools.partial(
    encode_block, nk=nk, bits=bits, grid=grid, block_clip=block_clip, config=config
  )
  codes, scales = jax.vmap(fn)(stack(leaves, k, n), alpha, clip, absmax, fp16)
  return split_layers(codes, layers), split_layers(scales, layers)
