"""``quantize``: data-free power quantization of a parameter pytree, in named stages.

select -> group -> statistics -> search -> encode -> assemble:

1. select the leaves to quantize (the filter);
2. group them by scale-block shape and sharding, so each group is one batched pass;
3. one pass over each group's weights gives block scales and binned statistics;
4. the exponent and clip ratio of every layer are searched at once on the statistics
   (then exactly, for small layers);
5. one more pass per group encodes and packs the codes;
6. the codes, scales, exponents and tables are assembled into :class:`QArray` leaves.

Under a bit budget each leaf's width is chosen after the statistics, before the
search (:mod:`pqjax._src.widths`). The stages' types are in
:mod:`pqjax._src.stages`, how scales are stored in :mod:`pqjax._src.scale_storage`.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pqjax._src import encoding, sharding
from pqjax._src.core import grid, qarray
from pqjax._src.core.blocks import Blocks, Granularity, blocks_for
from pqjax._src.core.grid import Grid
from pqjax._src.core.leaves import (
  Filter,
  KeyPath,
  PyTree,
  default_filter,
  is_float_array,
  path_str,
)
from pqjax._src.core.qarray import QArray
from pqjax._src.options import (
  Clip,
  ExponentMode,
  Importance,
  LayerAxes,
  OutputAxis,
  QuantizeOptions,
  ScaleDtype,
  ask,
  leaf_layer_axes,
  leaf_output_axis,
)
from pqjax._src.scale_storage import FLOAT16, FLOAT32, UINT8, scale_storage
from pqjax._src.search import fit, stats
from pqjax._src.search.config import Plan, SearchConfig
from pqjax._src.stages import (
  Encoded,
  Group,
  GroupStats,
  Leaf,
  LeafValue,
  binary_exponents,
  plan_of,
  starting_point,
)
from pqjax._src.widths import choose_widths

if TYPE_CHECKING:
  from tqdm import tqdm

PROGRESS_MIN_WEIGHTS = 50_000_000

# --- 1. select ----------------------------------------------------------------------


def _check_concrete(name: str, leaf: object) -> None:
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


def _selected(filter_fn: Filter | None, name: str, leaf: object) -> bool:
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


def select(flat: Sequence[tuple[KeyPath, Any]], options: QuantizeOptions) -> list[Leaf]:
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


def _replicated(leaf: object) -> NamedSharding | None:
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
  groups: Sequence[Group], config: SearchConfig, bar: tqdm | None
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


# --- 4. search ----------------------------------------------------------------------


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
  if not plan.shared and (warm or len(widths) == 1):
    alphas, clips = _search_each_layer(groups, binned, alphas, clips, plan, options, warm)
  elif len(widths) == 1 and start is None:
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
      groups, binned, alphas, clips, exponents, widths, plan, options
    )
  return _refine(alphas, clips, groups, plan, options)


def _search_each_layer(
  groups: Sequence[Group],
  binned: Sequence[jax.Array],
  alphas: jax.Array,
  clips: jax.Array,
  plan: Plan,
  options: QuantizeOptions,
  warm: bool,
) -> tuple[jax.Array, jax.Array]:
  """Each layer searched at its width (not a shared exponent), by programs of that
  width alone, which any tree with the same settings reuses.

  From the estimate's points (``warm``, a bit budget), the programs of every width
  of the budget's range are compiled the first time: another budget on the same
  tree compiles no search.
  """
  config = options.search_config
  if warm:
    fit.compile_all(
      fit.compilations(
        options.widths, config.bins, grid=options.grid, plan=plan, config=config
      )
    )
  a, c = fit.search_each_width(
    np.concatenate([np.asarray(s, np.float32) for s in binned]),
    np.asarray(alphas, np.float32),
    np.asarray(clips, np.float32),
    np.repeat([g.bits for g in groups], [g.layer_count for g in groups]),
    grid=options.grid,
    plan=plan,
    config=config,
    warm=warm,
  )
  return jax.device_put(a), jax.device_put(c)


def _search_widths(
  groups: Sequence[Group],
  binned: Sequence[jax.Array],
  alphas: jax.Array,
  clips: jax.Array,
  exponents: jax.Array,
  widths: Sequence[int],
  plan: Plan,
  options: QuantizeOptions,
) -> tuple[jax.Array, jax.Array]:
  """The search of layers at several widths in one program: a shared exponent
  minimises the error of all widths at once."""
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
  offsets = np.cumsum([0] + [g.layer_count for g in groups])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in small])
  merged = _refined_groups([groups[i] for i in small])
  host = np.array(alphas, np.float32), np.array(clips, np.float32)
  a, c = fit.refine_layers(
    tuple(r.values for r in merged),
    jax.device_put(host[0][index]),
    jax.device_put(host[1][index]),
    jax.device_put(
      fit.layer_steps(np.concatenate([r.bits for r in merged]), options.grid)
    ),
    jax.device_put(np.concatenate([r.order for r in merged])),
    views=tuple(r.view for r in merged),
    grid=options.grid,
    plan=plan,
    config=config,
  )
  host[0][index], host[1][index] = np.asarray(a), np.asarray(c)
  return jax.device_put(host[0]), jax.device_put(host[1])


class _Refined(NamedTuple):
  """Refined leaves of one block shape and sharding, in tree order: their values,
  the view ``(K, N, nk, ncol)``, and each layer's width and place ``(L,)`` among
  the layers the refinement is given."""

  values: tuple[LeafValue, ...]
  view: tuple[int, int, int, int]
  bits: np.ndarray
  order: np.ndarray


def _refined_groups(groups: Sequence[Group]) -> list[_Refined]:
  """The layers of ``groups`` as the tree groups them, whatever their widths.

  A bit budget splits a group by width; joined again, the refinement's program is
  the same for every budget on the tree.
  """
  joined: dict[tuple[Blocks, sharding.Layout | None], list[tuple[Leaf, int, int]]] = {}
  first = 0  # the leaf's first layer among the groups' layers
  for g in groups:
    for leaf in g.leaves:
      joined.setdefault((g.blocks, g.layout), []).append((leaf, g.bits, first))
      first += leaf.layer_count
  out = []
  for (blocks, layout), members in sorted(
    joined.items(), key=lambda kv: min(leaf.position for leaf, _, _ in kv[1])
  ):
    members.sort(key=lambda m: m[0].position)
    values = tuple(leaf.value for leaf, _, _ in members)
    # A small sharded layer is gathered, on one device.
    if layout is not None:
      values = sharding.to_host(values)
    counts = [leaf.layer_count for leaf, _, _ in members]
    bits = np.repeat([b for _, b, _ in members], counts)
    order = np.concatenate(
      [np.arange(f, f + count) for (_, _, f), count in zip(members, counts)]
    ).astype(np.int32)
    out.append(_Refined(values, dataclasses.astuple(blocks), bits, order))
  return out


# --- 5. encode ----------------------------------------------------------------------


def encode_spec(g: Group, options: QuantizeOptions) -> encoding.EncodeSpec:
  """The settings of a group's encoding programs."""
  b = g.blocks
  return encoding.EncodeSpec(
    k=b.k,
    n=b.n,
    nk=b.nk,
    bits=g.bits,
    grid=options.grid,
    block_clip=options.clip_mode == 'block',
    config=options.search_config,
  )


def encode(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  alphas: jax.Array,
  clips: jax.Array,
  options: QuantizeOptions,
  bar: tqdm | None,
  storage: Sequence[np.ndarray] | None = None,
) -> list[Encoded]:
  """Each group's packed codes and stored scales.

  ``storage`` is each group's scale storage where chosen already (a bit budget
  counts them before the search).
  """
  if options.bits_per_weight is not None:
    _compile_encodings(groups, options)
  out = []
  offset = 0
  # Cut on the host: a slice on the device compiles a program for each place.
  host_alphas, host_clips = np.asarray(alphas), np.asarray(clips)
  for i, (g, s) in enumerate(zip(groups, group_stats)):
    n = g.layer_count
    a, c = host_alphas[offset : offset + n], host_clips[offset : offset + n]
    offset += n
    kinds = scale_storage(g, s, c, c, options) if storage is None else storage[i]
    spec = encode_spec(g, options)
    if g.layout is None:
      e = encoding.encode_layers(
        g.values, a, c, s.absmax, kinds, spec=spec, layers=g.layers
      )
    else:
      a_, c_, kinds_ = jax.device_put((a, c, kinds))
      e = sharding.encode_layers(
        g.values, a_, c_, s.absmax, kinds_, spec=spec, layout=g.layout, layers=g.layers
      )
    _advance(bar, e.codes, g.weights)
    out.append(Encoded(e, kinds))
  return out


def _compile_encodings(groups: Sequence[Group], options: QuantizeOptions) -> None:
  """Compiles each leaf's encoding at every width of a bit budget's range.

  Another budget on the tree then compiles nothing: the programs depend on a leaf's
  shape and width only. Sharded leaves are left to compile as they come.
  """
  jobs = []
  seen = set()
  for g in groups:
    if g.layout is not None:
      continue
    for leaf in g.leaves:
      key = (g.blocks, leaf.layers, leaf.value.shape, np.dtype(leaf.value.dtype))
      if key in seen:
        continue
      seen.add(key)
      jobs += encoding.compilations(
        leaf.value,
        spec=encode_spec(g, options),
        ncol=g.blocks.ncol,
        layers=leaf.layers,
        widths=options.widths,
      )
  fit.compile_all(jobs)


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
  arrays: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
  kind: int,
  alpha: np.ndarray,
  options: QuantizeOptions,
  where: NamedSharding | None = None,
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
  flat: Sequence[tuple[KeyPath, Any]],
  treedef: jax.tree_util.PyTreeDef,
  groups: Sequence[Group],
  encoded: Sequence[Encoded],
  alphas: jax.Array,
  options: QuantizeOptions,
) -> tuple[PyTree, PyTree]:
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


def _progress_bar(total: int, progress: bool | None) -> tqdm | None:
  if progress is None:
    progress = total >= 2 * PROGRESS_MIN_WEIGHTS and sys.stderr.isatty()
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc='pqjax.quantize', unit='w', unit_scale=True, leave=False)


def _advance(bar: tqdm | None, result: PyTree, weights: int) -> None:
  # Dispatch is asynchronous: wait for the group so the bar shows work done.
  if bar is not None:
    jax.block_until_ready(result)
    bar.update(weights)


# --- the public function ------------------------------------------------------------


def quantize(
  params: PyTree,
  bits: int | tuple[int, int] | None = None,
  *,
  bits_per_weight: float | None = None,
  importance: Importance | None = None,
  granularity: Granularity = 'channel',
  exponent: ExponentMode | float = 'layer',
  grid: Grid = 'full',
  clip: Clip = True,
  scale_dtype: ScaleDtype = 'auto',
  filter: Filter | None = None,
  search_config: SearchConfig | None = None,
  progress: bool | None = None,
  layer_axes: LayerAxes = 0,
  output_axis: OutputAxis = -1,
) -> tuple[PyTree, PyTree]:
  """Quantizes the selected leaves of ``params`` with the power map.

  Args:
    params: any pytree of arrays (Flax variables, ``nnx.State``, plain dicts...).
    bits: code width, 2 to 8 (default 4); with ``bits_per_weight``, the range of
      widths.
    bits_per_weight: how to quantize, like every option below: each is documented
      once, as the attribute of :class:`QuantizeOptions` of that name (a
      ``QuantizeOptions`` is built from them and checks them all before any work
      is done).
    importance: as :class:`QuantizeOptions`.
    granularity: as :class:`QuantizeOptions`.
    exponent: as :class:`QuantizeOptions`.
    grid: as :class:`QuantizeOptions`.
    clip: as :class:`QuantizeOptions`.
    scale_dtype: as :class:`QuantizeOptions`.
    filter: as :class:`QuantizeOptions`.
    search_config: as :class:`QuantizeOptions`.
    progress: as :class:`QuantizeOptions`.
    layer_axes: as :class:`QuantizeOptions`.
    output_axis: as :class:`QuantizeOptions`.

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
