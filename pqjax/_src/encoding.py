"""Encoding: each layer's packed codes and stored block scales, from its fit.

Jitted per leaf, batched over the stacked layers of a leaf. The stored scales do not
depend on the width (unless each block picks its clip ratio), so they have a program
of their own, and the codes one per leaf shape and width: the programs do not depend
on which other leaves share a width, and the first bit budget on a tree compiles the
codes at every width a later budget may give a leaf (:func:`compile_widths`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core import operator, packing
from pqjax._src.core.blocks import block_view
from pqjax._src.core.grid import steps as steps_of
from pqjax._src.search.config import SearchConfig
from pqjax._src.search.objective import exact_inputs
from pqjax._src.search.stats import stack


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
  """The settings every encoding program of a group's layers is compiled for.

  Attributes:
    k: rows of a layer's ``(K, N)`` view.
    n: columns of that view.
    nk: blocks along K.
    bits: the code width.
    grid: the grid of levels.
    block_clip: whether each block picks its own clip ratio.
    config: the search settings (the block clip's candidates).
  """

  k: int
  n: int
  nk: int
  bits: int
  grid: str
  block_clip: bool
  config: SearchConfig

  def codes(self) -> EncodeSpec:
    """What the codes alone depend on: a program of them serves every search
    setting."""
    return dataclasses.replace(self, block_clip=False, config=SearchConfig())


def identity(x: jax.Array) -> jax.Array:
  """A column's largest scale where a device holds all its rows."""
  return x


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
  spec: EncodeSpec,
  column_max: Callable[[jax.Array], jax.Array] = identity,
) -> tuple[jax.Array, ...]:
  """One layer's packed codes and its scales: float32 values ``(nk, ncol)``, and
  their uint8 steps ``(nk, ncol)`` and column scale ``(1, ncol)``.

  ``storage`` indexes ``SCALE_DTYPES``: the codes are chosen against the scales as
  stored. ``column_max`` completes a column's largest scale across devices.
  """
  if spec.block_clip:
    xs = operator.divide(block_view(w, spec.nk), absmax)
    clip = _block_clip(xs, absmax, alpha, clip, spec.bits, spec.grid, spec.config)
  scale, steps, column = stored_scales(absmax, clip, storage, column_max)
  codes = block_codes(w, scale, alpha, spec=spec)
  return codes, scale[:, 0, :], steps[:, 0, :], column[:, 0, :]


def stored_scales(
  absmax: jax.Array,
  clip: jax.Array,
  storage: jax.Array,
  column_max: Callable[[jax.Array], jax.Array] = identity,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One layer's block scales as stored ``(nk, 1, ncol)`` (float32 values), their
  uint8 steps, and the column scale ``(1, 1, ncol)`` the steps count in.

  ``clip`` is the layer's clip ratio, or each block's.
  """
  scale = absmax * clip
  column = column_max(jnp.max(scale, axis=0, keepdims=True))
  steps = packing.coded_scales(scale, column)
  # In the order of SCALE_DTYPES: float32, float16, uint8.
  stored = [scale, scale.astype(jnp.float16).astype(jnp.float32)]
  stored.append(packing.scale_values(steps, column))
  return jnp.stack(stored)[storage.astype(jnp.int32)], steps, column


def block_codes(
  w: jax.Array, scale: jax.Array, alpha: jax.Array, *, spec: EncodeSpec
) -> jax.Array:
  """One layer's packed codes, chosen against its scales as stored (so that the
  codes fit the rounded scales)."""
  bits, grid = spec.bits, spec.grid
  q = operator.encode(block_view(w, spec.nk), scale, alpha, bits, grid)
  q = q.reshape(-1, w.shape[1])[: w.shape[0]]
  return packing.pack(q, bits, steps_of(bits, grid)[0])


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


@functools.partial(jax.jit, static_argnames=('spec', 'layers'))
def encode_leaf(
  w: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  absmax: jax.Array,
  storage: jax.Array,
  *,
  spec: EncodeSpec,
  layers: tuple[int, ...],
) -> tuple[jax.Array, ...]:
  """One leaf's packed codes ``(*layers, packed_rows, N)``, and its scales: float32
  values and uint8 steps ``(*layers, nk, ncol)``, column scales ``(*layers, 1, ncol)``.

  ``alpha``, ``clip`` and ``storage`` are per layer ``(L,)``, ``absmax`` is
  ``(L, nk, 1, ncol)``. One program for all: what a block clip, which depends on
  the width, needs.
  """
  fn = functools.partial(encode_block, spec=spec)
  out = jax.vmap(fn)(stack((w,), spec.k, spec.n), alpha, clip, absmax, storage)
  return tuple(split_layers(x, (layers,))[0] for x in out)


@functools.partial(jax.jit, static_argnames=('layers',))
def leaf_scales(
  absmax: jax.Array, clip: jax.Array, storage: jax.Array, *, layers: tuple[int, ...]
) -> tuple[jax.Array, ...]:
  """:func:`stored_scales` of each layer of a leaf: the scales ``(L, nk, 1, ncol)``
  the codes are chosen against, then as :func:`encode_leaf` returns them."""
  scale, steps, column = jax.vmap(stored_scales)(absmax, clip, storage)
  return (
    scale,
    *(split_layers(x[:, :, 0, :], (layers,))[0] for x in (scale, steps, column)),
  )


@functools.partial(jax.jit, static_argnames=('spec', 'layers'))
def leaf_codes(
  w: jax.Array,
  scale: jax.Array,
  alpha: jax.Array,
  *,
  spec: EncodeSpec,
  layers: tuple[int, ...],
) -> jax.Array:
  """:func:`block_codes` of each layer of a leaf: ``(*layers, packed_rows, N)``."""
  fn = functools.partial(block_codes, spec=spec)
  ws = stack((w,), spec.k, spec.n)
  return split_layers(jax.vmap(fn)(ws, scale, alpha), (layers,))[0]


def compilations(
  w: jax.Array,
  *,
  spec: EncodeSpec,
  ncol: int,
  layers: tuple[int, ...],
  widths: Sequence[int],
) -> list[tuple[Hashable, Callable[[], object]]]:
  """The compilations of the encoding of a leaf like ``w`` at each of ``widths``
  (``spec.bits`` is not read).

  Under a bit budget the first call compiles every width a later budget may give
  the leaf (see :func:`fit.compile_all`). ``w`` itself is not read: it stands for
  its shape, dtype and placement.
  """
  count = math.prod(layers)
  one = jax.ShapeDtypeStruct((count,), jnp.float32)
  absmax = jax.ShapeDtypeStruct((count, spec.nk, 1, ncol), jnp.float32)
  storage = jax.ShapeDtypeStruct((count,), jnp.int8)

  def at(bits: int) -> object:
    at_width = dataclasses.replace(spec, bits=bits)
    if spec.block_clip:
      fn = encode_leaf.lower(w, one, one, absmax, storage, spec=at_width, layers=layers)
    else:
      fn = leaf_codes.lower(w, absmax, one, spec=at_width.codes(), layers=layers)
    return fn.compile()

  # The program depends on the leaf's type and placement, and the settings.
  committed = isinstance(w, jax.Array) and w.committed
  like = (w.shape, np.dtype(w.dtype), committed and w.sharding)
  key = spec if spec.block_clip else spec.codes()
  settings = (dataclasses.replace(key, bits=0), ncol, layers)
  return [
    (('encode', like, settings, int(b)), functools.partial(at, int(b))) for b in widths
  ]


def encode_layers(
  leaves: Sequence[jax.Array],
  alpha: np.ndarray | jax.Array,
  clip: np.ndarray | jax.Array,
  absmax: np.ndarray | jax.Array,
  storage: np.ndarray | jax.Array,
  *,
  spec: EncodeSpec,
  layers: tuple[tuple[int, ...], ...],
) -> Encoding:
  """Each leaf's packed codes and scales, as separate buffers.

  Args:
    leaves: the leaves of one block shape, each ``(*layers[i], ...)`` with ``K * N``
      weights a layer.
    alpha: every layer's exponent ``(L,)``, the leaves' layers in order.
    clip: every layer's clip ratio ``(L,)``.
    absmax: every layer's block absmax ``(L, nk, 1, ncol)`` (from the statistics
      pass, so it is not repeated).
    storage: how each layer stores its scales ``(L,)``, an index of
      ``SCALE_DTYPES``.
    spec: the layers' shape as ``(K, N)`` views, and the encoding's settings.
    layers: each leaf's stacked-layer axes.

  Returns:
    Per leaf: codes ``(*layers[i], packed_rows, N)`` and scales
    ``(*layers[i], nk, ncol)``, each leaf encoded by a program of its shape and
    width.
  """
  # Per-layer inputs are cut on the host: a slice on the device would be one more
  # program for each leaf's place in the group.
  host = [np.asarray(x) for x in (alpha, clip, absmax, storage)]
  out: list[list[jax.Array]] = [[], [], [], []]
  start = 0
  for w, shape in zip(leaves, layers):
    stop = start + math.prod(shape)
    alpha_, clip_, absmax_, storage_ = jax.device_put(tuple(x[start:stop] for x in host))
    if spec.block_clip:
      arrays = encode_leaf(w, alpha_, clip_, absmax_, storage_, spec=spec, layers=shape)
    else:
      scale, *scales = leaf_scales(absmax_, clip_, storage_, layers=shape)
      codes = leaf_codes(w, scale, alpha_, spec=spec.codes(), layers=shape)
      arrays = (codes, *scales)
    for lst, x in zip(out, arrays):
      lst.append(x)
    start = stop
  return Encoding(*out)
