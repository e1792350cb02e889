"""``quantize``: data-free power quantization of a parameter pytree, in named stages.

select -> group -> statistics -> search -> encode -> assemble:

1. select the leaves to quantize (the filter);
2. group them by scale-block shape and sharding, so each group is one batched pass;
3. one pass over each group's weights gives block scales and binned statistics;
4. the exponent and clip ratio of every layer are searched at once on the statistics
   (then exactly, for small layers);
5. one more pass per group encodes and packs the codes;
6. the codes, scales, exponents and tables are assembled into :class:`QArray` leaves.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pqjax._src import budget, encoding, sharding
from pqjax._src.core import grid, qarray
from pqjax._src.core.blocks import Blocks, Granularity, blocks_for
from pqjax._src.core.grid import Grid
from pqjax._src.core.leaves import Filter, default_filter, is_float_array, path_str
from pqjax._src.core.qarray import QArray
from pqjax._src.options import (
  Clip,
  ExponentMode,
  Importance,
  LayerAxes,
  OutputAxis,
  QuantizeOptions,
  ask,
  leaf_layer_axes,
  leaf_output_axis,
)
from pqjax._src.search import fit, stats
from pqjax._src.search.config import Plan, SearchConfig

PROGRESS_MIN_WEIGHTS = 50_000_000

# Float16 keeps 11 significant bits, plenty for a scale, over its normal range.
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


class Leaf(NamedTuple):
  """A selected leaf: its position among the flattened leaves, its path and value.

  Its first ``layer_axes`` axes index stacked layers, each quantized on its own.
  ``value`` has the output features last; ``transposed`` says the tree holds it
  with its last two axes swapped (PyTorch's ``(out, in)``).
  """

  position: int
  path: str
  value: Any
  layer_axes: int = 0
  transposed: bool = False
  # Where a leaf replicated on several devices is put back (its value is one copy).
  replicated: NamedSharding | None = None

  @property
  def shape(self) -> tuple[int, ...]:
    """The leaf's shape in the tree."""
    shape = tuple(self.value.shape)
    return (*shape[:-2], shape[-1], shape[-2]) if self.transposed else shape

  @property
  def layers(self) -> tuple[int, ...]:
    """The stacked-layer axes, ``()`` for a single matrix."""
    return tuple(self.value.shape[: self.layer_axes])

  @property
  def layer_count(self) -> int:
    """How many ``(K, N)`` layers the leaf holds."""
    return math.prod(self.layers)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    """The shape of one layer."""
    return tuple(self.value.shape[self.layer_axes :])


@dataclasses.dataclass(frozen=True)
class Group:
  """Leaves quantized together: the same scale blocks, sharding and width."""

  blocks: Blocks
  layout: sharding.Layout | None
  leaves: tuple[Leaf, ...]
  # The code width; 0 until a bit budget has chosen it.
  bits: int = 0

  @property
  def values(self) -> tuple[Any, ...]:
    return tuple(leaf.value for leaf in self.leaves)

  @property
  def layer_count(self) -> int:
    """Layers in the group: a stacked leaf counts each of its layers."""
    return sum(leaf.layer_count for leaf in self.leaves)

  @property
  def layers(self) -> tuple[tuple[int, ...], ...]:
    """Each leaf's stacked-layer axes, in order."""
    return tuple(leaf.layers for leaf in self.leaves)

  @property
  def weights(self) -> int:
    return self.blocks.k * self.blocks.n * self.layer_count

  def owner(self, layer: int) -> tuple[Leaf, tuple[int, ...]]:
    """The leaf holding the group's ``layer``-th layer, and its index in the leaf."""
    for leaf in self.leaves:
      if layer < leaf.layer_count:
        return leaf, tuple(int(i) for i in np.unravel_index(layer, leaf.layers))
      layer -= leaf.layer_count
    raise IndexError(layer)


class GroupStats(NamedTuple):
  """One pass over a group: finiteness ``(L,)``, absmax ``(L, nk, 1, ncol)``, stats.

  ``L`` counts layers: every layer of a stacked leaf, in order.
  """

  finite: jax.Array
  absmax: jax.Array
  stats: jax.Array


class Encoded(NamedTuple):
  """A group's packed codes and scales per leaf, and how its scales are stored.

  Each leaf's arrays have its stacked-layer axes first: ``scales`` the float32
  values, ``steps`` and ``columns`` the uint8 form (:class:`encoding.Encoding`).
  ``storage`` is per layer, the same for every layer of a leaf.
  """

  arrays: encoding.Encoding
  storage: np.ndarray


# --- 1. select ----------------------------------------------------------------------


def _check_concrete(name: str, leaf: Any) -> None:
  """TypeError unless ``leaf`` holds values: quantize reads them on the host."""
  if isinstance(leaf, jax.ShapeDtypeStruct):
    raise TypeError(
      f'{name}: a jax.ShapeDtypeStruct has a shape and dtype but no values;'
      ' quantize needs concrete arrays'
    )
  if isinstance(leaf, jax.core.Tracer):
    raise TypeError(
      f'{name}: got a traced value ({type(leaf).__name__}): quantize runs eagerly on'
      ' concrete arrays, so call it outside jax.jit, vmap, grad and eval_shape and'
      ' pass its result to the transformed function'
    )


def _selected(filter_fn: Filter | None, name: str, leaf: Any) -> bool:
  """Whether ``leaf`` is picked: by the filter, checked, or by the default.

  A :class:`QArray` is picked unless a filter leaves it out, so that quantizing a
  quantized tree is refused rather than quantizing its scales.
  """
  if filter_fn is None:
    return isinstance(leaf, QArray) or default_filter(name, leaf)
  got = ask('the filter', filter_fn, name, leaf)
  # An array's truth is ambiguous or silently elementwise: only a bool is an answer.
  if not isinstance(got, (bool, np.bool_)):
    raise TypeError(
      f'{name}: the filter must return a bool, got {type(got).__name__} {got!r:.40}'
    )
  return bool(got)


def select(flat: Sequence[tuple[Any, Any]], options: QuantizeOptions) -> list[Leaf]:
  """The leaves to quantize, in tree order, with their layer axes.

  TypeError for a non-float forced in or a filter answering other than a bool;
  ValueError for a QArray picked, a filter that raises, or layer axes that do not
  fit. Leaves with no elements hold no weights: they stay as they are.
  """
  chosen = []
  for i, (path, leaf) in enumerate(flat):
    name = path_str(path)
    if not _selected(options.filter, name, leaf):
      continue
    if isinstance(leaf, QArray):
      raise ValueError(
        f'{name}: already quantized (a QArray); quantize the float parameters, or'
        ' pass a filter that leaves the quantized leaves out'
      )
    if not is_float_array(leaf):
      kind = getattr(leaf, 'dtype', type(leaf).__name__)
      raise TypeError(f'{name}: only floating arrays can be quantized, got {kind}')
    if 0 in tuple(leaf.shape):
      continue
    _check_concrete(name, leaf)
    layer_axes = leaf_layer_axes(options.layer_axes, name, leaf)
    replicated = _replicated(leaf)
    if replicated is not None:
      # Quantized as one device's copy: computed over the whole mesh, programs
      # reduced in another order (exponent 0.79255 against 0.79267 on 8 devices).
      leaf = leaf.addressable_data(0)
    if leaf_output_axis(options.output_axis, name, leaf, layer_axes) == -2:
      # The copy (a view for NumPy leaves and streamed tensors) lays out what is
      # quantized; the output keeps the leaf's own shape, marked transposed.
      chosen.append(Leaf(i, name, leaf.swapaxes(-1, -2), layer_axes, True, replicated))
    else:
      chosen.append(Leaf(i, name, leaf, layer_axes, replicated=replicated))
  return chosen


def _replicated(leaf: Any) -> NamedSharding | None:
  """A replicated sharding for a leaf held whole by each of several devices."""
  s = getattr(leaf, 'sharding', None)
  if isinstance(s, NamedSharding) and s.is_fully_replicated and s.num_devices > 1:
    return NamedSharding(s.mesh, P())
  return None


# --- 2. group -----------------------------------------------------------------------


def group(leaves: Sequence[Leaf], options: QuantizeOptions) -> list[Group]:
  """Leaves batched by block shape and by sharding, in order of first appearance.

  The layers of a stacked leaf join the group of their block shape, as separate
  leaves of that shape would. Under a bit budget the groups have no width yet, and
  a sharded leaf is checked at each width when the widths are chosen.
  """
  budget = options.bits_per_weight is not None
  groups: dict[tuple[Blocks, sharding.Layout | None], list[Leaf]] = {}
  for leaf in leaves:
    b = blocks_for(leaf.layer_shape, options.granularity)
    layout = sharding.layout_of(leaf.path, leaf.value, leaf.layer_axes)
    if layout is not None and not budget:
      sharding.check(leaf.path, layout, b, options.width, options.clip_mode == 'block')
    groups.setdefault((b, layout), []).append(leaf)
  bits = 0 if budget else options.width
  return [Group(b, layout, tuple(m), bits) for (b, layout), m in groups.items()]


# --- 3. statistics ------------------------------------------------------------------


def statistics(
  groups: Sequence[Group], config: SearchConfig, bar: Any
) -> list[GroupStats]:
  """Block scales and binned statistics of every group; ValueError on NaN or Inf."""
  out = []
  for g in groups:
    if g.layout is None:
      s = stats.group_stats(g.values, bins=config.bins, **dataclasses.asdict(g.blocks))
    else:
      s = sharding.group_stats(
        g.values, layout=g.layout, bins=config.bins, **dataclasses.asdict(g.blocks)
      )
    out.append(GroupStats(*s))
    _advance(bar, out[-1], g.weights)
  check_finite(groups, out)
  return out


def check_finite(groups: Sequence[Group], group_stats: Sequence[GroupStats]) -> None:
  """ValueError naming the first leaf (and layer) that holds NaN or Inf."""
  for g, s in zip(groups, group_stats):
    bad = np.flatnonzero(~np.asarray(s.finite))
    if bad.size:
      leaf, index = g.owner(int(bad[0]))
      where = f' (layer {index if len(index) > 1 else index[0]})' if index else ''
      raise ValueError(f'{leaf.path}: leaf of shape {leaf.shape} holds NaN or Inf{where}')


def binary_exponents(group_stats: Sequence[GroupStats]) -> jax.Array:
  """Each layer's scale exponent ``(L,)``, groups in order (see ``stats.normalise``)."""
  return jnp.asarray(
    np.concatenate(
      [
        stats.layer_binary_exponent(np.asarray(sharding.to_host(s.absmax)), np)
        for s in group_stats
      ]
    )
  )


# --- 3b. widths, under a bit budget -------------------------------------------------


class Widths(NamedTuple):
  """A bit budget's choice: the groups split by width, their stats and scale dtypes,
  and where the estimate found each layer's least error at its width ``(L,)``."""

  groups: list[Group]
  stats: list[GroupStats]
  storage: list[np.ndarray]
  alphas: jax.Array
  clips: jax.Array


def _budget_storage(g: Group, s: GroupStats, options: QuantizeOptions) -> np.ndarray:
  """How ``g`` stores its scales whatever clip ratio the search finds (costs need it)."""
  if options.clip_mode == 'fixed':
    ratio = np.full((g.layer_count,), options.clip_ratio)
    return scale_storage(g, s, ratio, ratio, options)
  low = np.full((g.layer_count,), options.search_config.clip_lo)
  return scale_storage(g, s, low, np.ones((g.layer_count,)), options)


def _importance(leaf: Leaf, options: QuantizeOptions) -> float:
  """The leaf's importance: the option's, checked, or the default."""
  if options.importance is None:
    return budget.default_importance(leaf.path, leaf.value, leaf.layer_count)
  # The leaf as the tree holds it, as the other per-leaf functions see it.
  value = leaf.value.swapaxes(-1, -2) if leaf.transposed else leaf.value
  got = ask('the importance function', options.importance, leaf.path, value)
  try:
    value = float(got)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f'{leaf.path}: importance must be a finite number >= 0, got {got!r}')
  return value


def _feasible(g: Group, leaf: Leaf, widths: Sequence[int], block: bool) -> list[bool]:
  """Which widths a sharded leaf's layout can hold; ValueError if none."""
  if g.layout is None:
    return [True] * len(widths)
  ok, errors = [], []
  for b in widths:
    try:
      sharding.check(leaf.path, g.layout, g.blocks, b, block)
      ok.append(True)
    except ValueError as e:
      ok.append(False)
      errors.append(e)
  if not any(ok):
    raise errors[0]
  return ok


class WidthTable(NamedTuple):
  """What a bit budget chooses from: per selected leaf (in group order), the bytes
  and the estimated damage at each candidate width, and the byte budget."""

  leaves: list[Leaf]
  costs: list[np.ndarray]
  damages: list[np.ndarray]
  limit: int
  storage: list[np.ndarray]
  # The estimate's exponents and clip ratios at each width, ``(widths, L)``.
  points: tuple[jax.Array, jax.Array]


def width_table(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> WidthTable:
  """Each leaf's cost and damage at each width; ValueError for a budget out of reach.

  Costs are the bytes :class:`QArray` stores (``inf`` where a sharded leaf's layout
  cannot hold the width); a leaf's damage is its importance times the sum of its
  layers' estimated relative errors.
  """
  widths = options.widths
  storage = [_budget_storage(g, s, options) for g, s in zip(groups, group_stats)]
  block = options.clip_mode == 'block'
  leaves, costs = [], []
  for g, kinds in zip(groups, storage):
    starts = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
    for leaf, first in zip(g.leaves, starts):
      scale_dtype = qarray.SCALE_DTYPES[kinds[first] if leaf.layer_count else 0]
      cost = [
        qarray.stored_nbytes(
          tuple(leaf.value.shape),
          leaf.layer_axes,
          b,
          grid.num_levels(b, options.grid),
          g.blocks.nk,
          g.blocks.ncol,
          scale_dtype,
        )
        if fits
        else math.inf
        for b, fits in zip(widths, _feasible(g, leaf, widths, block))
      ]
      leaves.append(leaf)
      costs.append(np.array(cost, np.float64))
  limit = _limit(costs, leaves, options)
  binned = jnp.concatenate([sharding.to_host(s.stats) for s in group_stats])
  errors, *points = fit.width_errors(
    binned,
    *starting_point(binned.shape[0], options),
    binary_exponents(group_stats),
    widths=widths,
    grid=options.grid,
    plan=plan_of(options),
    config=options.search_config,
  )
  norms = stats.layer_norms(np.asarray(binned))
  errors = np.asarray(errors, np.float64)
  relative = np.where(norms > 0, errors / np.where(norms > 0, norms, 1.0), 0.0)
  ends = np.cumsum([leaf.layer_count for leaf in leaves])
  damages = [
    _importance(leaf, options) * relative[:, end - leaf.layer_count : end].sum(axis=1)
    for leaf, end in zip(leaves, ends)
  ]
  return WidthTable(leaves, costs, damages, limit, storage, (points[0], points[1]))


def choose_widths(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> Widths:
  """Each leaf's width under the budget, and the groups split by width.

  ValueError where the budget is outside what the range of widths can store.
  """
  if not groups:
    none = jnp.zeros((0,), jnp.float32)
    return Widths([], [], [], none, none)
  table = width_table(groups, group_stats, options)
  chosen = budget.allocate(table.costs, table.damages, table.limit)
  bits_of = {id(leaf): options.widths[c] for leaf, c in zip(table.leaves, chosen)}
  # Each layer's estimate at its leaf's width, in the layers' order.
  per_layer = np.repeat(chosen, [leaf.layer_count for leaf in table.leaves])
  return _split(groups, group_stats, table.storage, bits_of, table.points, per_layer)


def _limit(costs: list[np.ndarray], leaves: list[Leaf], options: QuantizeOptions) -> int:
  """The budget in bytes; ValueError if the widths cannot store it."""
  weights = sum(math.prod(leaf.value.shape) for leaf in leaves)
  bpw = options.bits_per_weight
  assert bpw is not None
  if not costs:
    return 0
  lo, hi = budget.reachable(costs)
  if not weights:
    return hi
  limit = budget.budget_bytes(bpw, weights)
  if limit < lo or Fraction(bpw) * weights > 8 * hi:
    low, high = options.widths[0], options.widths[-1]
    raise ValueError(
      f'bits_per_weight={bpw} is out of reach: widths {low}..{high} store'
      f' {math.ceil(8e4 * lo / weights) / 1e4:.4f} to'
      f' {math.floor(8e4 * hi / weights) / 1e4:.4f} bits per weight for these'
      f' {weights:,} weights (codes, scales, exponents and tables)'
    )
  return limit


def _split(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  storage: Sequence[np.ndarray],
  bits_of: dict[int, int],
  points: tuple[jax.Array, jax.Array],
  chosen: np.ndarray,
) -> Widths:
  """Each group cut into one group per width, widths ascending, with its layers.

  ``points`` are the estimate's exponents and clip ratios ``(widths, L)``, and
  ``chosen`` each layer's width index.
  """
  out: list[list[Any]] = [[], [], []]
  order = []
  first = 0
  for g, s, kinds in zip(groups, group_stats, storage):
    # The small arrays are cut on the host: a gather on the device for each piece
    # costs more to dispatch than these copies.
    host: list[Any] = [np.asarray(sharding.to_host(x)) for x in s]
    starts = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
    for b in sorted({bits_of[id(leaf)] for leaf in g.leaves}):
      mine = [i for i, leaf in enumerate(g.leaves) if bits_of[id(leaf)] == b]
      index = np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i in mine] + [np.zeros(0, int)]
      ).astype(np.int32)
      out[0].append(
        dataclasses.replace(g, leaves=tuple(g.leaves[i] for i in mine), bits=b)
      )
      whole = index.size == g.layer_count
      out[1].append(s if whole else GroupStats(*(x[index] for x in host)))
      out[2].append(kinds[index])
      order.append(first + index)
    first += g.layer_count
  layers = np.concatenate(order + [np.zeros(0, np.int32)])
  alphas, clips = (np.asarray(x)[chosen[layers], layers] for x in points)
  return Widths(out[0], out[1], out[2], jnp.asarray(alphas), jnp.asarray(clips))


# --- 4. search ----------------------------------------------------------------------


def plan_of(options: QuantizeOptions) -> Plan:
  return Plan(
    search_alpha=options.exponent in ('layer', 'global'),
    search_clip=options.clip_mode != 'fixed',
    shared=options.exponent == 'global',
  )


def starting_point(n: int, options: QuantizeOptions) -> tuple[jax.Array, jax.Array]:
  """Exponents and clip ratios ``(n,)`` before the search: the fixed ones, or 1."""
  fixed = options.exponent if isinstance(options.exponent, float) else 1.0
  return (
    jnp.full((n,), fixed, jnp.float32),
    jnp.full((n,), options.clip_ratio, jnp.float32),
  )


def search(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  options: QuantizeOptions,
  start: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Exponent and clip ratio of every layer, ``(L,)`` each, groups in order.

  ``start``: each layer's estimate under a bit budget, which the search refines
  (unless the exponent is shared: one exponent for all widths needs the full one).
  """
  n = sum(g.layer_count for g in groups)
  config = options.search_config
  plan = plan_of(options)
  alphas, clips = starting_point(n, options)
  if not n or not (plan.search_alpha or plan.search_clip):
    return alphas, clips
  # The search runs on one device, from the statistics of every shard: its result
  # is the same as for unsharded leaves, bit for bit.
  binned = [sharding.to_host(s.stats) for s in group_stats]
  exponents = binary_exponents(group_stats)
  widths = sorted({g.bits for g in groups})
  warm = start is not None and not plan.shared
  if warm:
    assert start is not None
    alphas, clips = start
  if len(widths) == 1 and start is None:
    alphas, clips = fit.search_stats(
      jnp.concatenate(binned),
      alphas,
      clips,
      exponents,
      bits=widths[0],
      grid=options.grid,
      plan=plan,
      config=config,
    )
  else:
    alphas, clips = _search_widths(
      groups, binned, alphas, clips, exponents, widths, plan, options, warm
    )
  return _refine(alphas, clips, groups, plan, options)


def _search_widths(
  groups: Sequence[Group],
  binned: Sequence[jax.Array],
  alphas: jax.Array,
  clips: jax.Array,
  exponents: jax.Array,
  widths: Sequence[int],
  plan: Plan,
  options: QuantizeOptions,
  warm: bool,
) -> tuple[jax.Array, jax.Array]:
  """The search of layers at several widths (a bit budget): one program for all."""
  offsets = np.cumsum([0] + [g.layer_count for g in groups])
  index = [
    np.concatenate(
      [np.arange(offsets[i], offsets[i + 1]) for i, g in enumerate(groups) if g.bits == b]
    )
    for b in widths
  ]
  order = np.concatenate(index)
  a, c = fit.search_widths(
    tuple(
      jnp.concatenate([s for s, g in zip(binned, groups) if g.bits == b]) for b in widths
    ),
    alphas[order],
    clips[order],
    exponents[order],
    widths=tuple(widths),
    grid=options.grid,
    plan=plan,
    config=options.search_config,
    warm=warm,
  )
  return alphas.at[order].set(a), clips.at[order].set(c)


def _refine(
  alphas: jax.Array,
  clips: jax.Array,
  groups: Sequence[Group],
  plan: Plan,
  options: QuantizeOptions,
) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of the small layers (all of them, if the exponent is shared)."""
  config = options.search_config
  sizes = [g.blocks.k * g.blocks.n for g in groups]
  if plan.shared:
    total = sum(g.weights for g in groups)
    small = list(range(len(groups))) if fit.needs_refine(total, config) else []
  else:
    small = [i for i, s in enumerate(sizes) if fit.needs_refine(s, config)]
  if not small:
    return alphas, clips
  widths = tuple(groups[i].bits for i in small)
  # A small sharded layer is gathered, on one device.
  values = [
    sharding.to_host(groups[i].values)
    if groups[i].layout is not None
    else groups[i].values
    for i in small
  ]
  offsets = np.cumsum([0] + [g.layer_count for g in groups])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in small])
  a, c = fit.refine_layers(
    tuple(values),
    alphas[index],
    clips[index],
    views=tuple(dataclasses.astuple(groups[i].blocks) for i in small),
    bits=widths[0] if len(set(widths)) == 1 else widths,
    grid=options.grid,
    plan=plan,
    config=config,
  )
  return alphas.at[index].set(a), clips.at[index].set(c)


# --- 5. encode ----------------------------------------------------------------------


# Groups of this many blocks a column or more store uint8 scales by default: with
# the float32 column scale, ``nk + 4`` bytes a column instead of ``2 nk`` as float16,
# and the same error (benchmarks/scales.py).
CODED_MIN_BLOCKS = 5
FLOAT32, FLOAT16, UINT8 = (
  qarray.SCALE_DTYPES.index(np.dtype(t)) for t in (np.float32, np.float16, np.uint8)
)


def _fits(absmax: np.ndarray, lo: float, hi: float, kind: int) -> bool:
  """Whether a layer's scales, ``absmax`` times a ratio in ``[lo, hi]``, are stored
  as ``kind`` without leaving its normal range: float16's is narrow, the others
  have float32's."""
  nonzero = absmax[absmax > 0]
  if not nonzero.size or kind != FLOAT16:
    return True
  return nonzero.min() * lo >= FP16_TINY and nonzero.max() * hi <= FP16_MAX


def scale_storage(
  g: Group,
  s: GroupStats,
  lo: np.ndarray | jax.Array,
  hi: np.ndarray | jax.Array,
  options: QuantizeOptions,
) -> np.ndarray:
  """How each layer of ``g`` stores its scales ``(L,)``, an index of SCALE_DTYPES.

  ``lo`` and ``hi`` bound each layer's clip ratio ``(L,)``. ``"auto"`` takes uint8
  for groups of ``CODED_MIN_BLOCKS`` or more, float16 for other groups and
  float32 for the rest, each only where every layer of a leaf fits, the next
  otherwise. ValueError where a storage asked for does not fit.
  """
  asked = options.stored_scale_dtype
  if asked is not None:
    order = [qarray.SCALE_DTYPES.index(asked)]
  elif isinstance(options.granularity, str):
    order = [FLOAT32]
  else:
    order = [UINT8, FLOAT16] if g.blocks.nk >= CODED_MIN_BLOCKS else [FLOAT16]
  low = options.search_config.clip_lo if options.clip_mode == 'block' else 1.0
  host = np.asarray(sharding.to_host(s.absmax)).reshape(g.layer_count, -1)
  lo, hi = np.asarray(lo, np.float32) * low, np.asarray(hi, np.float32)
  out = np.full(g.layer_count, FLOAT32, np.int8)
  starts = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
  for leaf, first, last in zip(g.leaves, starts[:-1], starts[1:]):
    for kind in order:
      fits = [_fits(host[i], lo[i], hi[i], kind) for i in range(first, last)]
      if all(fits):
        out[first:last] = kind
        break
      if asked is not None:
        name = qarray.SCALE_DTYPES[kind].name
        raise ValueError(
          f'{leaf.path}: block scales fall outside the {name} range; use'
          ' scale_dtype=float32'
        )
  return out


def encode(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  alphas: jax.Array,
  clips: jax.Array,
  options: QuantizeOptions,
  bar: Any,
  storage: Sequence[np.ndarray] | None = None,
) -> list[Encoded]:
  """Each group's packed codes and stored scales.

  ``storage`` is each group's scale storage where chosen already (a bit budget
  counts them before the search).
  """
  out = []
  offset = 0
  for i, (g, s) in enumerate(zip(groups, group_stats)):
    n = g.layer_count
    a, c = alphas[offset : offset + n], clips[offset : offset + n]
    offset += n
    kinds = scale_storage(g, s, c, c, options) if storage is None else storage[i]
    kwargs = dict(
      k=g.blocks.k,
      n=g.blocks.n,
      nk=g.blocks.nk,
      layers=g.layers,
      bits=g.bits,
      grid=options.grid,
      block_clip=options.clip_mode == 'block',
      config=options.search_config,
    )
    if g.layout is None:
      e = encoding.encode_layers(g.values, a, c, s.absmax, jnp.asarray(kinds), **kwargs)
    else:
      e = sharding.encode_layers(
        g.values, a, c, s.absmax, jnp.asarray(kinds), layout=g.layout, **kwargs
      )
    _advance(bar, e.codes, g.weights)
    out.append(Encoded(e, kinds))
  return out


def flushed(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], encoded: Sequence[Encoded]
) -> list[str]:
  """Leaves with nonzero blocks that decode to zeros, each with how many blocks.

  XLA treats float32 subnormals (below 1.2e-38) as zeros, so a block whose weights
  are all subnormal, or whose scale becomes one, can only decode to zeros.
  """
  out = []
  for g, s, e in zip(groups, group_stats, encoded):
    absmax = np.asarray(sharding.to_host(s.absmax)).reshape(g.layer_count, -1)
    first = 0  # the leaf's first layer in the group
    for j, leaf in enumerate(g.leaves):
      layers = absmax[first : first + leaf.layer_count].reshape(-1)
      first += leaf.layer_count
      scale = np.asarray(sharding.to_host(e.arrays.scales[j])).reshape(-1)
      lost = int(np.sum((layers > 0) & (scale == 0)))
      if lost:
        out.append(f'{leaf.path} ({lost} of {scale.size} blocks)')
  return out


# --- 6. assemble --------------------------------------------------------------------


def leaf_qarray(
  leaf: Leaf,
  bits: int,
  arrays: tuple[Any, Any, Any, Any],
  kind: int,
  alpha: np.ndarray,
  options: QuantizeOptions,
  where: Any = None,
) -> QArray:
  """The :class:`QArray` of one encoded leaf.

  ``arrays``: its codes, float32 scale values, uint8 steps and column scales (the
  last two kept only for uint8 storage); ``kind`` its scale storage; ``alpha`` its
  exponents in the shape of its layer axes; ``where`` a sharding for the exponents
  and tables of a sharded leaf.
  """
  codes, scale, steps, columns = arrays
  levels = grid.num_levels(bits, options.grid)
  column = None
  if kind == FLOAT16:
    scale = scale.astype(jnp.float16)
  elif kind == UINT8:
    scale, column = steps, columns
  table = np.zeros((leaf.layer_count, levels), np.float32)
  for i, a in enumerate(np.asarray(alpha).reshape(-1)):
    table[i] = grid.decode_table(float(a), bits, options.grid)
  return QArray(
    codes=codes,
    scale=scale,
    column_scale=column,
    alpha=sharding.place(jnp.asarray(alpha), where),
    table=sharding.place(jnp.asarray(table.reshape(*leaf.layers, levels)), where),
    bits=bits,
    shape=leaf.shape,
    dtype=np.dtype(leaf.value.dtype),
    layer_axes=leaf.layer_axes,
    transposed=leaf.transposed,
  )


def assemble(
  flat: Sequence[tuple[Any, Any]],
  treedef: Any,
  groups: Sequence[Group],
  encoded: Sequence[Encoded],
  alphas: jax.Array,
  options: QuantizeOptions,
) -> tuple[Any, Any]:
  """``(params_q, alphas)`` trees: each selected leaf replaced by its QArray."""
  # Exponents and tables of sharded leaves are replicated on their mesh.
  placement = sharding.common_sharding([g.layout for g in groups])
  host_alphas = np.asarray(alphas, np.float32)
  out = [leaf for _, leaf in flat]
  alpha_out: list[float | np.ndarray | None] = [None] * len(flat)
  offset = 0
  for g, e in zip(groups, encoded):
    first = 0  # the leaf's first layer in the group
    for j, leaf in enumerate(g.leaves):
      alpha = host_alphas[offset : offset + leaf.layer_count].reshape(leaf.layers)
      kind = e.storage[first] if leaf.layer_count else FLOAT32
      arrays = (
        e.arrays.codes[j],
        e.arrays.scales[j],
        e.arrays.steps[j],
        e.arrays.columns[j],
      )
      where = None if g.layout is None else placement
      q = leaf_qarray(leaf, g.bits, arrays, kind, alpha, options, where)
      out[leaf.position] = (
        q if leaf.replicated is None else jax.device_put(q, leaf.replicated)
      )
      alpha_out[leaf.position] = alpha if leaf.layer_axes else float(alpha)
      offset += leaf.layer_count
      first += leaf.layer_count
  return (
    jax.tree_util.tree_unflatten(treedef, out),
    jax.tree_util.tree_unflatten(treedef, alpha_out),
  )


# --- progress -----------------------------------------------------------------------


def _progress_bar(total: int, progress: bool | None) -> Any:
  if progress is None:
    progress = total >= 2 * PROGRESS_MIN_WEIGHTS and sys.stderr.isatty()
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc='pqjax.quantize', unit='w', unit_scale=True, leave=False)


def _advance(bar: Any, result: Any, weights: int) -> None:
  # Dispatch is asynchronous: wait for the group so the bar shows work done.
  if bar is not None:
    jax.block_until_ready(result)
    bar.update(weights)


# --- the public function ------------------------------------------------------------


def quantize(
  params: Any,
  bits: int | tuple[int, int] | None = None,
  *,
  bits_per_weight: float | None = None,
  importance: Importance | None = None,
  granularity: Granularity = 'channel',
  exponent: ExponentMode | float = 'layer',
  grid: Grid = 'full',
  clip: Clip = True,
  scale_dtype: Any = 'auto',
  filter: Filter | None = None,
  search_config: SearchConfig | None = None,
  progress: bool | None = None,
  layer_axes: LayerAxes = 0,
  output_axis: OutputAxis = -1,
) -> tuple[Any, Any]:
  """Quantizes the selected leaves of ``params`` with the power map.

  Args:
    params: any pytree of arrays (Flax variables, ``nnx.State``, plain dicts...).
    bits: code width, 2 to 8 (default 4); with ``bits_per_weight``, the range of
      widths.
    bits_per_weight, importance, granularity, exponent, grid, clip, scale_dtype,
      filter, search_config, progress, layer_axes, output_axis: how to quantize,
      each documented once, as the attribute of :class:`QuantizeOptions` of that
      name (a ``QuantizeOptions`` is built from them and checks them all before
      any work is done).

  Returns:
    ``(params_q, alphas)``: ``params`` with each selected leaf replaced by a
    :class:`QArray`, and a tree of the same structure holding each quantized leaf's
    exponent (a float, or a float32 array of shape ``leaf.shape[:layer_axes]`` for
    a leaf with layer axes) and None elsewhere. Leaves with no elements (a 0 in
    their shape) hold no weights and stay as they are.

  Raises:
    ValueError: an option is invalid, a selected leaf holds NaN or Inf, or its
      layer axes leave fewer than 2 axes per layer.
    TypeError: the filter forces a non-float leaf in, an option has a wrong type,
      or a selected leaf has no values: a ``jax.ShapeDtypeStruct``, or a tracer
      (quantize runs eagerly, not under ``jax.jit``, ``vmap``, ``grad`` or
      ``eval_shape``).
  """
  opts = QuantizeOptions(
    bits=bits,
    bits_per_weight=bits_per_weight,
    importance=importance,
    granularity=granularity,
    exponent=exponent,
    grid=grid,
    clip=clip,
    scale_dtype=scale_dtype,
    filter=filter,
    search_config=search_config,  # type: ignore[arg-type]  # None: the default
    progress=progress,
    layer_axes=layer_axes,
    output_axis=output_axis,
  )
  # QArrays are leaves here, so the filter sees them whole (and select refuses them).
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=qarray.is_qarray)
  groups = group(select(flat, opts), opts)
  # Every program runs in 32 bits whatever jax_enable_x64 says, so results do not
  # depend on it.
  with jax.enable_x64(False):
    bar = _progress_bar(2 * sum(g.weights for g in groups), opts.progress)
    group_stats = statistics(groups, opts.search_config, bar)
    storage = start = None
    if opts.bits_per_weight is not None:
      groups, group_stats, storage, *points = choose_widths(groups, group_stats, opts)
      start = (points[0], points[1])
    alphas, clips = search(groups, group_stats, opts, start)
    encoded = encode(groups, group_stats, alphas, clips, opts, bar, storage)
    if bar is not None:
      bar.close()
    zeros = flushed(groups, group_stats, encoded)
    result = assemble(flat, treedef, groups, encoded, alphas, opts)
  if zeros:
    warnings.warn(
      "pqjax.quantize: blocks of weights all below float32's smallest normal number"
      ' (1.2e-38), which XLA treats as zero, decode to zeros: ' + ', '.join(zeros),
      stacklevel=2,
    )
  return result
