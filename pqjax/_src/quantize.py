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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src import encoding, sharding
from pqjax._src.core import grid
from pqjax._src.core.blocks import Blocks, blocks_for
from pqjax._src.core.leaves import default_filter, is_float_array, path_str
from pqjax._src.core.qarray import QArray
from pqjax._src.options import QuantizeOptions, leaf_layer_axes
from pqjax._src.search import fit, stats
from pqjax._src.search.config import Plan, SearchConfig

PROGRESS_MIN_WEIGHTS = 50_000_000

# Float16 keeps 11 significant bits, plenty for a scale, over its normal range.
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


class Leaf(NamedTuple):
  """A selected leaf: its position among the flattened leaves, its path and value.

  Its first ``layer_axes`` axes index stacked layers, each quantized on its own.
  """

  position: int
  path: str
  value: Any
  layer_axes: int = 0

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
  """Leaves quantized together: the same scale blocks and the same sharding."""

  blocks: Blocks
  layout: sharding.Layout | None
  leaves: tuple[Leaf, ...]

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
  """A group's packed codes and stored scales, per leaf; ``half``: float16 scales.

  Each leaf's codes and scales have its stacked-layer axes first; ``half`` is per
  layer, the same for every layer of a leaf.
  """

  codes: list[jax.Array]
  scales: list[jax.Array]
  half: np.ndarray


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


def select(flat: Sequence[tuple[Any, Any]], options: QuantizeOptions) -> list[Leaf]:
  """The leaves to quantize, in tree order, with their layer axes.

  TypeError for a non-float forced in; ValueError for layer axes that do not fit.
  Leaves with no elements hold no weights: they stay as they are.
  """
  chosen = []
  for i, (path, leaf) in enumerate(flat):
    name = path_str(path)
    if options.filter is None:
      if not default_filter(name, leaf):
        continue
    elif not options.filter(name, leaf):
      continue
    elif not is_float_array(leaf):
      kind = getattr(leaf, 'dtype', type(leaf).__name__)
      raise TypeError(f'{name}: only floating arrays can be quantized, got {kind}')
    if 0 in tuple(leaf.shape):
      continue
    _check_concrete(name, leaf)
    chosen.append(Leaf(i, name, leaf, leaf_layer_axes(options.layer_axes, name, leaf)))
  return chosen


# --- 2. group -----------------------------------------------------------------------


def group(leaves: Sequence[Leaf], options: QuantizeOptions) -> list[Group]:
  """Leaves batched by block shape and by sharding, in order of first appearance.

  The layers of a stacked leaf join the group of their block shape, as separate
  leaves of that shape would.
  """
  groups: dict[tuple[Blocks, sharding.Layout | None], list[Leaf]] = {}
  for leaf in leaves:
    b = blocks_for(leaf.layer_shape, options.granularity)
    layout = sharding.layout_of(leaf.path, leaf.value, leaf.layer_axes)
    if layout is not None:
      sharding.check(leaf.path, layout, b, options.bits, options.clip_mode == 'block')
    groups.setdefault((b, layout), []).append(leaf)
  return [Group(b, layout, tuple(m)) for (b, layout), m in groups.items()]


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
  for g, s in zip(groups, out):
    bad = np.flatnonzero(~np.asarray(s.finite))
    if bad.size:
      leaf, index = g.owner(int(bad[0]))
      where = f' (layer {index if len(index) > 1 else index[0]})' if index else ''
      raise ValueError(
        f'{leaf.path}: leaf of shape {tuple(leaf.value.shape)} holds NaN or Inf{where}'
      )
  return out


# --- 4. search ----------------------------------------------------------------------


def plan_of(options: QuantizeOptions) -> Plan:
  return Plan(
    search_alpha=options.exponent in ('layer', 'global'),
    search_clip=options.clip_mode != 'fixed',
    shared=options.exponent == 'global',
  )


def search(
  groups: Sequence[Group], group_stats: Sequence[GroupStats], options: QuantizeOptions
) -> tuple[jax.Array, jax.Array]:
  """Exponent and clip ratio of every layer, ``(L,)`` each, groups in order."""
  n = sum(g.layer_count for g in groups)
  config = options.search_config
  plan = plan_of(options)
  fixed = options.exponent if isinstance(options.exponent, float) else 1.0
  alphas = jnp.full((n,), fixed, jnp.float32)
  clips = jnp.full((n,), options.clip_ratio, jnp.float32)
  if not n or not (plan.search_alpha or plan.search_clip):
    return alphas, clips
  # The search runs on one device, from the statistics of every shard: its result
  # is the same as for unsharded leaves, bit for bit.
  exponents = np.concatenate(
    [stats.layer_exponent(np.asarray(sharding.gather(s.absmax)), np) for s in group_stats]
  )
  alphas, clips = fit.search_stats(
    jnp.concatenate([sharding.gather(s.stats) for s in group_stats]),
    alphas,
    clips,
    exponents,
    bits=options.bits,
    grid=options.grid,
    plan=plan,
    config=config,
  )
  return _refine(alphas, clips, groups, plan, options)


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
  # A small sharded layer is gathered, on one device.
  values = [
    sharding.gather(groups[i].values)
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
    bits=options.bits,
    grid=options.grid,
    plan=plan,
    config=config,
  )
  return alphas.at[index].set(a), clips.at[index].set(c)


# --- 5. encode ----------------------------------------------------------------------


def _fp16_fits(absmax: np.ndarray, low: float) -> bool:
  """Whether every nonzero scale, down to ``low`` times the absmax, is a normal fp16."""
  nonzero = absmax[absmax > 0]
  return nonzero.size == 0 or (
    nonzero.min() * low >= FP16_TINY and nonzero.max() <= FP16_MAX
  )


def half_scales(
  g: Group, s: GroupStats, clips: jax.Array, options: QuantizeOptions
) -> np.ndarray:
  """Which layers of ``g`` store float16 scales ``(L,)``; ValueError if asked, unfit.

  A stacked leaf has one scale dtype: float16 only if every one of its layers fits.
  """
  asked = options.stored_scale_dtype
  if asked is None and isinstance(options.granularity, str):
    return np.zeros(g.layer_count, bool)
  low = options.search_config.clip_lo if options.clip_mode == 'block' else 1.0
  host = np.asarray(s.absmax).reshape(g.layer_count, -1) * np.asarray(clips)[:, None]
  half = np.array([_fp16_fits(x, low) for x in host], bool)
  if asked == np.dtype(np.float16) and not half.all():
    path = g.owner(int(np.argmin(half)))[0].path
    raise ValueError(
      f'{path}: block scales fall outside the float16 range; use scale_dtype=float32'
    )
  if asked == np.dtype(np.float32):
    half[:] = False
  offsets = np.cumsum([0] + [leaf.layer_count for leaf in g.leaves])
  for lo, hi in zip(offsets[:-1], offsets[1:]):
    half[lo:hi] = half[lo:hi].all()
  return half


def encode(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  alphas: jax.Array,
  clips: jax.Array,
  options: QuantizeOptions,
  bar: Any,
) -> list[Encoded]:
  """Each group's packed codes and stored scales."""
  out = []
  offset = 0
  for g, s in zip(groups, group_stats):
    n = g.layer_count
    a, c = alphas[offset : offset + n], clips[offset : offset + n]
    offset += n
    half = half_scales(g, s, c, options)
    kwargs = dict(
      k=g.blocks.k,
      n=g.blocks.n,
      nk=g.blocks.nk,
      layers=g.layers,
      bits=options.bits,
      grid=options.grid,
      block_clip=options.clip_mode == 'block',
      config=options.search_config,
    )
    if g.layout is None:
      codes, scales = encoding.encode_layers(
        g.values, a, c, s.absmax, jnp.asarray(half), **kwargs
      )
    else:
      codes, scales = sharding.encode_layers(
        g.values, a, c, s.absmax, jnp.asarray(half), layout=g.layout, **kwargs
      )
    _advance(bar, codes, g.weights)
    out.append(Encoded(codes, scales, half))
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
    absmax = np.asarray(sharding.gather(s.absmax)).reshape(g.layer_count, -1)
    first = 0  # the leaf's first layer in the group
    for j, leaf in enumerate(g.leaves):
      layers = absmax[first : first + leaf.layer_count].reshape(-1)
      first += leaf.layer_count
      scale = np.asarray(sharding.gather(e.scales[j])).reshape(-1)
      lost = int(np.sum((layers > 0) & (scale == 0)))
      if lost:
        out.append(f'{leaf.path} ({lost} of {scale.size} blocks)')
  return out


# --- 6. assemble --------------------------------------------------------------------


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
  levels = grid.num_levels(options.bits, options.grid)
  for g, e in zip(groups, encoded):
    where = None if g.layout is None else placement
    first = 0  # the leaf's first layer in the group
    for j, leaf in enumerate(g.leaves):
      alpha = host_alphas[offset : offset + leaf.layer_count].reshape(leaf.layers)
      half = leaf.layer_count > 0 and e.half[first]
      scale = e.scales[j].astype(jnp.float16) if half else e.scales[j]
      table = np.zeros((leaf.layer_count, levels), np.float32)
      for i, a in enumerate(alpha.reshape(-1)):
        table[i] = grid.decode_table(float(a), options.bits, options.grid)
      table = table.reshape(*leaf.layers, levels)
      out[leaf.position] = QArray(
        codes=e.codes[j],
        scale=scale,
        alpha=sharding.place(jnp.asarray(alpha), where),
        table=sharding.place(jnp.asarray(table), where),
        bits=options.bits,
        shape=tuple(leaf.value.shape),
        dtype=np.dtype(leaf.value.dtype),
        layer_axes=leaf.layer_axes,
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


def quantize(params: Any, bits: int = 4, **options: Any) -> tuple[Any, Any]:
  """Quantizes the selected leaves of ``params`` with the power map.

  Args:
    params: any pytree of arrays (Flax variables, ``nnx.State``, plain dicts...).
    bits: code width, 2 to 8.
    **options: the fields of :class:`QuantizeOptions`:

      - ``granularity``: ``"channel"`` (one scale per output feature, the last
        axis), ``"tensor"`` (one scale per leaf) or an int ``G`` (one scale per
        ``G`` consecutive rows of one column; when ``G`` does not divide K the last
        block of each column is shorter).
      - ``exponent``: ``"layer"`` (searched per leaf), ``"global"`` (one exponent
        for the whole tree, minimising the summed error) or a fixed float (``1.0``
        with ``grid="symmetric"`` and ``clip=False`` is uniform round-to-nearest).
      - ``grid``: ``"full"`` (all ``2 ** bits`` codes: levels ``(k / d) ** (1 / a)``
        on each side, one more on the negative side, each weight taking its
        nearest level) or ``"symmetric"`` (the paper's ``2 ** bits - 1`` levels,
        rounding in the power domain).
      - ``clip``: the block scale is ``c`` times the block's absmax. ``True`` (or
        ``"layer"``): one ratio per leaf, searched jointly with the exponent;
        ``"block"``: then each block picks the best of a few ratios around it;
        ``False``: ``c = 1``, the paper's absmax scale; a float: that ratio.
      - ``scale_dtype``: storage of the block scales: ``"auto"`` (float16 for
        groups, whose scales cost ``16 / G`` bits a weight, where every scale is a
        normal float16; float32 otherwise), ``float32`` or ``float16``.
      - ``filter``: ``filter(path, leaf) -> bool`` picks the leaves to quantize;
        ``path`` is the ``/``-joined key path. Default: floating leaves with
        ndim >= 2.
      - ``search_config``: a :class:`SearchConfig` (exponents in [0.05, 2.0], clip
        ratios in [0.3, 1] by default).
      - ``progress``: a tqdm progress bar on stderr. Default: for trees of 50M
        weights or more, when stderr is a terminal.
      - ``layer_axes``: how many leading axes of a leaf index stacked layers
        (``nn.scan``, ``nnx.scan``, vmapped layers): an int for every selected
        leaf, or a function ``(path, leaf) -> int``. Each layer gets its own
        exponent, clip ratio and scales, exactly as if the layers were separate
        leaves; the leaf stays one :class:`QArray`. Default 0: a leaf is one layer.

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
  opts = QuantizeOptions(bits=bits, **options)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  groups = group(select(flat, opts), opts)
  # Every program runs in 32 bits whatever jax_enable_x64 says, so results do not
  # depend on it.
  with jax.enable_x64(False):
    bar = _progress_bar(2 * sum(g.weights for g in groups), opts.progress)
    group_stats = statistics(groups, opts.search_config, bar)
    alphas, clips = search(groups, group_stats, opts)
    encoded = encode(groups, group_stats, alphas, clips, opts, bar)
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
