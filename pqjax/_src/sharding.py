"""Quantizing leaves sharded over a device mesh, shard by shard.

A leaf sharded with a :class:`jax.sharding.NamedSharding` is read on its ``(K, N)``
view: its last axis is N, the rest is K. A leaf with stacked layers is read as
layers of that view, and its layer axes may be sharded too: layers are independent,
so a device holding whole layers quantizes them alone. Each device works on the
block it holds, inside :func:`jax.shard_map`, and never receives another device's
weights:

- statistics: each device bins its block tile by tile (:mod:`pqjax.tiles`); block
  scales that span devices are reduced with ``pmax``; the per-tile histograms are
  then redistributed over the bins (an all-to-all of histograms, not weights) and
  added in tile order, and the summed histograms are replicated for the search;
- encoding: each device encodes and packs its own block, so codes keep the weight's
  sharding on both axes and scales keep it wherever they have the axis.

Codes are packed along K, so a shard of K must hold whole packing units (2 codes at
4 bits, 4 at 2 bits, 8 at 3 bits) and, with groups, whole groups.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pqjax._src import encoding
from pqjax._src.core import operator, packing
from pqjax._src.core.blocks import Blocks, block_absmax, block_view
from pqjax._src.search import stats, tiles

Axes = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """A leaf's sharding: the mesh axes that split each layer axis, K and N."""

  mesh: Mesh | AbstractMesh
  spec: P
  kaxes: Axes
  naxes: Axes
  # One entry per stacked-layer axis: the mesh axes that split it.
  laxes: tuple[Axes, ...] = ()

  @property
  def kx(self) -> int:
    """Shards of K."""
    return math.prod(self.mesh.shape[a] for a in self.kaxes)

  @property
  def nx(self) -> int:
    """Shards of N."""
    return math.prod(self.mesh.shape[a] for a in self.naxes)

  def view(self, k_axis: bool, n_axis: bool) -> P:
    """Spec of a ``(K-like, N-like)`` pair of axes, sharded where asked."""
    return P(
      _entry(self.kaxes) if k_axis else None, _entry(self.naxes) if n_axis else None
    )

  def per_layer(self, *rest: Any) -> P:
    """Spec of an array with the leaf's layer axes (sharded as they are), then rest."""
    return P(*(_entry(a) for a in self.laxes), *rest)


def _entry(axes: Axes) -> str | Axes | None:
  return None if not axes else axes[0] if len(axes) == 1 else axes


def layout_of(name: str, leaf: Any, layer_axes: int = 0) -> Layout | None:
  """The layout of a sharded leaf; None where one device holds all of it.

  Its first ``layer_axes`` axes index layers: any of them may be sharded, in whole
  layers; in each layer, the rules for K and N apply.
  """
  sharding = getattr(leaf, 'sharding', None)
  if not isinstance(leaf, jax.Array) or sharding is None or sharding.is_fully_replicated:
    return None
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
      f'{name}: sharded leaves must use a NamedSharding, got {type(sharding).__name__}'
    )
  shape = tuple(leaf.shape)
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  every = [operator.axis_names(e) for e in spec]
  laxes, axes, view = every[:layer_axes], every[layer_axes:], shape[layer_axes:]
  leading = [i for i, a in enumerate(axes[:-1]) if a]
  # A shard of the flattened K is contiguous only if it is cut along the outermost
  # axis that is longer than 1.
  if len(leading) > 1 or (leading and any(d > 1 for d in view[: leading[0]])):
    layers = f' after its {layer_axes} layer axes' if layer_axes else ''
    raise ValueError(
      f'{name}: sharding {sharding.spec} of shape {shape} does not cut K (all axes'
      f' but the last{layers}) into contiguous blocks; shard only the first axis'
      ' longer than 1, and the last'
    )
  return Layout(
    mesh=sharding.mesh,
    spec=P(*spec),
    kaxes=axes[leading[0]] if leading else (),
    naxes=axes[-1] if axes else (),
    laxes=tuple(laxes),
  )


def check(name: str, layout: Layout, blocks: Blocks, bits: int, block_clip: bool) -> None:
  """Raises if ``layout`` cuts packing units, groups, or blocks that need a whole view."""
  k, nk = blocks.k, blocks.nk
  rows = -(-k // nk)
  if layout.kx > 1:
    kl = k // layout.kx
    unit = packing.codes_per_unit(bits)[0]
    if kl % unit:
      raise ValueError(
        f'{name}: at {bits} bits codes are packed {unit} rows to a unit along K, and'
        f' each of the {layout.kx} shards of K holds {kl} rows; shard K into'
        f' multiples of {unit} rows, or shard only the last axis'
      )
    if nk > 1 and (nk * rows != k or kl % rows):
      raise ValueError(
        f'{name}: groups of {rows} rows do not tile the {kl} rows of each of the'
        f' {layout.kx} shards of K; use a group size that divides {kl}'
      )
  split = (nk == 1 and layout.kx > 1) or (blocks.ncol == 1 and layout.nx > 1)
  if block_clip and split:
    raise ValueError(
      f'{name}: clip="block" needs each scale block on one device, but its blocks'
      ' span shards; use clip=True, or groups that fit in a shard'
    )


def _local(leaves: Sequence[jax.Array], k: int, n: int) -> jax.Array:
  """The local blocks of a group's leaves as float32 ``(L, k, n)``, as ``stats.stack``."""
  return jnp.concatenate([w.astype(jnp.float32).reshape(-1, k, n) for w in leaves])


def _layers(leaves: Sequence[Any], layout: Layout) -> tuple[tuple[int, ...], ...]:
  """The (global or local) stacked-layer axes of each leaf."""
  return tuple(tuple(w.shape[: len(layout.laxes)]) for w in leaves)


def _joined(parts: Sequence[jax.Array], layout: Layout) -> jax.Array:
  """Per-leaf results ``(*layers, ...)`` as one ``(L, ...)`` array, leaves in order."""
  la = len(layout.laxes)
  return jnp.concatenate([x.reshape(-1, *x.shape[la:]) for x in parts])


def _tiles_per_shard(t: int, shards: int, size: int) -> int:
  # Whole canonical tiles per shard give one-device sums; else tiles of the shard.
  return t // shards if t % shards == 0 else tiles.counts(size, 1)[0]


def _scale_spec(layout: Layout, nk: int, ncol: int) -> P:
  """Spec of one leaf's ``(*layers, nk, 1, ncol)`` block scales."""
  v = layout.view(nk > 1, ncol > 1)
  return layout.per_layer(v[0], None, v[1])


def _replicated(layout: Layout) -> NamedSharding:
  return NamedSharding(layout.mesh, P())


@functools.partial(jax.jit, static_argnames=('layout', 'k', 'n', 'nk', 'ncol', 'bins'))
def group_stats(
  leaves: Sequence[jax.Array],
  *,
  layout: Layout,
  k: int,
  n: int,
  nk: int,
  ncol: int,
  bins: int = stats.BINS,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """:func:`stats.group_stats` of sharded leaves, bit for bit; replicated results."""
  kx, nx = layout.kx, layout.nx
  kl, nl = k // kx, n // nx
  rows = -(-k // nk)
  tk, tn = tiles.counts(nk * rows, n)
  tkl, tnl = _tiles_per_shard(tk, kx, nk * rows // kx), _tiles_per_shard(tn, nx, nl)
  every = layout.kaxes + layout.naxes

  def local(*ws: jax.Array) -> tuple[tuple[jax.Array, ...], ...]:
    w3 = jax.vmap(functools.partial(block_view, nk=nk // kx if nk > 1 else 1))(
      _local(ws, kl, nl)
    )
    m = jax.vmap(functools.partial(block_absmax, ncol=ncol))(w3)
    bad = jnp.sum(~jnp.isfinite(m), axis=(1, 2, 3))
    if nk == 1 and layout.kaxes:
      m = _pmax_bits(m, layout.kaxes)
    if ncol == 1 and layout.naxes:
      m = _pmax_bits(m, layout.naxes)
    xs = operator.divide(w3, m)  # as stats.prepare
    # As stats.group_stats: blocks weighed by their scales over the layer's largest.
    largest = block_absmax(m.reshape(m.shape[0], -1, 1), 1).reshape(-1)
    if every:
      largest = _pmax_bits(largest, every)
    weight = stats.normalise(m, stats.binary_exponent(largest))
    if every:
      bad = jax.lax.psum(bad, every)
      sums = stats.tile_stats(xs, weight, tkl, tnl, bins, fold=False)
      sums = sums.reshape(xs.shape[0], 1, tkl, tnl, *sums.shape[2:])
      binned = _reduce(sums, every, kx, nx)
    else:
      # Only layers are sharded: each device holds whole layers, as one device does.
      binned = stats.tile_stats(xs, weight, tk, tn, bins, fold=True)
    shapes = _layers(ws, layout)
    return tuple(tuple(encoding.split_layers(x, shapes)) for x in (bad, m, binned))

  per_leaf = lambda spec: tuple(spec for _ in leaves)
  bad, m, binned = (
    _joined(parts, layout)
    for parts in jax.shard_map(
      local,
      mesh=layout.mesh,
      in_specs=per_leaf(layout.spec),
      out_specs=(
        per_leaf(layout.per_layer()),
        per_leaf(_scale_spec(layout, nk, ncol)),
        per_leaf(layout.per_layer()),
      ),
      # The gathered sums are the same on every device, which the check cannot see.
      check_vma=False,
    )(*leaves)
  )
  bad, m, binned = (
    jax.lax.with_sharding_constraint(x, _replicated(layout)) for x in (bad, m, binned)
  )
  return bad == 0, m, binned


def _pmax_bits(x: jax.Array, axes: Axes) -> jax.Array:
  """``pmax`` of non-negative floats by their bit patterns, as :func:`block_absmax`
  takes a maximum: XLA compares subnormals as zeros, and a block of subnormal
  weights sharded over K lost its nonzero maximum (no warning that it decodes to
  zeros)."""
  bits = jax.lax.pmax(jax.lax.bitcast_convert_type(x, jnp.int32), axes)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _reduce(sums: jax.Array, every: Axes, kx: int, nx: int) -> jax.Array:
  """Adds the tile sums ``(L, 1, tkl, tnl, 2, bins, 2)`` of all devices in tile order.

  An all-to-all hands each device every tile's share of some bins, which it adds
  in tile order; the sums are then gathered: each device sends and receives about
  its own histograms, never weights.
  """
  devices, bins = kx * nx, sums.shape[5]
  if bins % devices == 0:
    sums = jax.lax.all_to_all(sums, every, 5, 1, tiled=True)
  else:
    sums = jax.lax.all_gather(sums, every, axis=1, tiled=True)
  n_layers, _, tkl, tnl, *rest = sums.shape
  # Devices come in mesh order, K's axes first: tile (i, j) of device (a, b) is
  # tile (a tkl + i, b tnl + j) of the layer.
  sums = sums.reshape(n_layers, kx, nx, tkl, tnl, *rest).transpose(0, 1, 3, 2, 4, 5, 6, 7)
  total = tiles.fold(sums.reshape(n_layers, kx * tkl * nx * tnl, *rest))
  if bins % devices == 0:
    total = jax.lax.all_gather(total, every, axis=2, tiled=True)
  return total


@functools.partial(jax.jit, static_argnames=('spec', 'layout', 'layers'))
def encode_layers(
  leaves: Sequence[jax.Array],
  alpha: jax.Array,
  clip: jax.Array,
  absmax: jax.Array,
  storage: jax.Array,
  *,
  spec: encoding.EncodeSpec,
  layout: Layout,
  layers: tuple[tuple[int, ...], ...],
) -> encoding.Encoding:
  """:func:`encoding.encode_layers` of sharded leaves: codes and scales stay sharded.

  Each leaf's per-layer inputs are cut out and sharded like its layer axes, so a
  device encodes its own layers' blocks.
  """
  nk, ncol = spec.nk, absmax.shape[3]
  kl, nl = spec.k // layout.kx, spec.n // layout.nx
  # The unsharded encoding, on this device's blocks.
  on_device = functools.partial(
    encoding.encode_block,
    spec=dataclasses.replace(spec, k=kl, n=nl, nk=nk // layout.kx if nk > 1 else 1),
    # A column's largest scale spans the shards of K.
    column_max=functools.partial(jax.lax.pmax, axis_name=layout.kaxes)
    if nk > 1 and layout.kaxes
    else encoding.identity,
  )

  def local(ws, alpha, clip, absmax, storage):
    shapes = _layers(ws, layout)
    flat = [_joined(x, layout) for x in (alpha, clip, absmax, storage)]
    out = jax.vmap(on_device)(_local(ws, kl, nl), *flat)
    return tuple(tuple(encoding.split_layers(x, shapes)) for x in out)

  cut = lambda x: tuple(encoding.split_layers(x, layers))
  per_leaf = lambda spec: tuple(spec for _ in leaves)
  v = layout.view(True, True)
  s = layout.view(nk > 1, ncol > 1)
  scales = per_leaf(layout.per_layer(*s))
  in_specs = (
    per_leaf(layout.spec),
    per_leaf(layout.per_layer()),
    per_leaf(layout.per_layer()),
    per_leaf(_scale_spec(layout, nk, ncol)),
    per_leaf(layout.per_layer()),
  )
  args = (tuple(leaves), cut(alpha), cut(clip), cut(absmax), cut(storage))
  out = jax.shard_map(
    local,
    mesh=layout.mesh,
    in_specs=in_specs,
    out_specs=(
      per_leaf(layout.per_layer(*v)),
      scales,
      scales,
      # One column scale per column, sharded as the columns.
      per_leaf(layout.per_layer(None, s[1])),
    ),
  )(*_placed(layout.mesh, in_specs, args))
  return encoding.Encoding(*(list(x) for x in out))


def _placed(mesh: Mesh | AbstractMesh, specs: Any, args: Any) -> Any:
  """``args`` sharded as ``specs`` say, where the mesh's axes are Explicit.

  shard_map takes such arrays only as they are sharded (the per-layer exponents of
  a stack split over its layer axis are made replicated); on an Auto mesh it
  reshards them itself.
  """
  if jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return args
  return jax.tree.map(
    lambda spec, x: jax.sharding.reshard(x, NamedSharding(mesh, spec)),
    specs,
    args,
    is_leaf=lambda x: isinstance(x, P),
  )


# --- placement of the small arrays -------------------------------------------------


def common_sharding(layouts: Sequence[Layout | None]) -> NamedSharding | None:
  """Replicated placement on the mesh of the sharded leaves; None if there are none."""
  meshes = {layout.mesh for layout in layouts if layout is not None}
  if not meshes:
    return None
  devices = {tuple(m.devices.flat) for m in meshes}
  if len(devices) > 1:
    raise ValueError(
      'sharded leaves must share one set of devices; got meshes'
      f' {sorted(str(m) for m in meshes)}'
    )
  return NamedSharding(next(iter(meshes)), P())


def to_host(x: Any) -> Any:
  """Multi-device arrays of ``x`` as host arrays, whole; others as they are.

  Only small arrays are gathered: histograms, and layers small enough for the
  exact refinement.
  """

  def one(a: Any) -> Any:
    if not isinstance(a, jax.Array) or len(a.sharding.device_set) == 1:
      return a
    if a.is_fully_addressable or a.is_fully_replicated:
      return np.asarray(a)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  return jax.tree_util.tree_map(one, x)


def place(x: Any, sharding: NamedSharding | None) -> Any:
  """``x`` replicated on ``sharding``'s mesh (unchanged without one)."""
  if sharding is None:
    return x
  return jax.tree_util.tree_map(lambda a: jax.device_put(a, sharding), x)
