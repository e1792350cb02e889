"""``quantize``: data-free power quantization of a parameter pytree."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax import power, search, sharding, tree
from pqjax.qarray import QArray

Exponent = str | float


def check_bits(bits: Any) -> int:
  if (isinstance(bits, bool) or not isinstance(bits, (int, np.integer))
      or not power.MIN_BITS <= bits <= power.MAX_BITS):
    raise ValueError(
        f'bits must be an integer in {power.MIN_BITS}..{power.MAX_BITS}, got {bits!r}')
  return int(bits)


def check_exponent(exponent: Any) -> Exponent:
  if exponent in ('layer', 'global'):
    return exponent
  if (isinstance(exponent, (int, float, np.integer, np.floating))
      and not isinstance(exponent, bool) and math.isfinite(exponent) and exponent > 0):
    return float(exponent)
  raise ValueError(
      f'exponent must be "layer", "global" or a positive float, got {exponent!r}')


def _select(flat: Sequence[tuple[Any, Any]], filter: tree.Filter | None
            ) -> list[tuple[int, str, Any]]:
  chosen = []
  for i, (path, leaf) in enumerate(flat):
    name = tree.path_str(path)
    if filter is None:
      if not tree.default_filter(name, leaf):
        continue
    elif not filter(name, leaf):
      continue
    elif not tree.is_float_array(leaf):
      kind = getattr(leaf, 'dtype', type(leaf).__name__)
      raise TypeError(f'{name}: only floating arrays can be quantized, got {kind}')
    chosen.append((i, name, leaf))
  return chosen


PROGRESS_MIN_WEIGHTS = 50_000_000


def _progress_bar(total: int, progress: bool | None) -> Any:
  if progress is None:
    progress = total >= 2 * PROGRESS_MIN_WEIGHTS and sys.stderr.isatty()
  if not progress:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc='pqjax.quantize', unit='w', unit_scale=True,
              leave=False)


def _advance(bar: Any, result: Any, weights: int) -> None:
  # Dispatch is asynchronous: wait for the group so the bar shows work done.
  if bar is not None:
    jax.block_until_ready(result)
    bar.update(weights)


def check_clip(clip: Any) -> tuple[str, float]:
  """``(mode, ratio)``: mode ``"layer"``, ``"block"`` or ``"fixed"``."""
  if clip is True or clip == 'layer':
    return 'layer', 1.0
  if clip == 'block':
    return 'block', 1.0
  if clip is False or clip is None:
    return 'fixed', 1.0
  if (isinstance(clip, (int, float, np.integer, np.floating))
      and not isinstance(clip, bool) and math.isfinite(clip) and 0 < clip <= 1):
    return 'fixed', float(clip)
  raise ValueError(
      f'clip must be True, False, "layer", "block" or a ratio in (0, 1], got {clip!r}')


ScaleDtype = Any


def check_scale_dtype(scale_dtype: ScaleDtype) -> np.dtype | None:
  """``None`` (automatic), float32 or float16."""
  if scale_dtype is None or (isinstance(scale_dtype, str) and scale_dtype == 'auto'):
    return None
  try:
    dt = np.dtype(scale_dtype)
  except TypeError:
    dt = None
  if dt not in (np.dtype(np.float32), np.dtype(np.float16)):
    raise ValueError(
        f'scale_dtype must be "auto", float32 or float16, got {scale_dtype!r}')
  return dt


# Float16 keeps 11 significant bits, plenty for a scale, over its normal range.
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


def _fp16_fits(absmax: np.ndarray, low: float) -> bool:
  """Whether every nonzero scale, down to ``low`` times the absmax, is a normal fp16."""
  nonzero = absmax[absmax > 0]
  return nonzero.size == 0 or (nonzero.min() * low >= FP16_TINY
                               and nonzero.max() <= FP16_MAX)


def _refine(alphas: jax.Array, clips: jax.Array, leaves: list[tuple[Any, ...]],
            blocks: list[tree.Blocks], plan: search.Plan, bits: int, grid: str,
            config: search.SearchConfig) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of the small layers (all of them, if the exponent is shared)."""
  sizes = [b.k * b.n for b in blocks]
  if plan.shared:
    small = list(range(len(blocks))) if search.needs_refine(
        sum(s * len(g) for s, g in zip(sizes, leaves)), config) else []
  else:
    small = [i for i, s in enumerate(sizes) if search.needs_refine(s, config)]
  if not small:
    return alphas, clips
  offsets = np.cumsum([0] + [len(g) for g in leaves])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in small])
  a, c = search.refine_layers(
      tuple(leaves[i] for i in small), alphas[index], clips[index],
      views=tuple(dataclasses.astuple(blocks[i]) for i in small), bits=bits, grid=grid,
      plan=plan, config=config)
  return alphas.at[index].set(a), clips.at[index].set(c)


def quantize(params: Any, bits: int = 4, *, granularity: tree.Granularity = 'channel',
             exponent: Exponent = 'layer', grid: str = 'full', clip: Any = True,
             scale_dtype: ScaleDtype = 'auto', filter: tree.Filter | None = None,
             search_config: search.SearchConfig | None = None,
             progress: bool | None = None) -> tuple[Any, Any]:
  """Quantizes the selected leaves of ``params`` with the power map.

  Args:
    params: any pytree of arrays (Flax variables, ``nnx.State``, plain dicts...).
    bits: code width, 2 to 8.
    granularity: ``"channel"`` (one scale per output feature, the last axis),
      ``"tensor"`` (one scale per leaf) or an int ``G`` (one scale per ``G``
      consecutive rows of one column; when ``G`` does not divide K the last block
      of each column is shorter).
    exponent: ``"layer"`` (searched per leaf), ``"global"`` (one exponent for the
      whole tree, minimising the summed error) or a fixed float (``1.0`` with
      ``grid="symmetric"`` and ``clip=False`` is uniform round-to-nearest).
    grid: ``"full"`` (all ``2 ** bits`` codes: levels ``(k / d) ** (1 / a)`` on
      each side, one more on the negative side, each weight taking its nearest
      level) or ``"symmetric"`` (the paper's ``2 ** bits - 1`` levels, rounding
      in the power domain).
    clip: the block scale is ``c`` times the block's absmax. ``True`` (or
      ``"layer"``): one ratio per leaf, searched jointly with the exponent;
      ``"block"``: then each block picks the best of a few ratios around it;
      ``False``: ``c = 1``, the paper's absmax scale; a float: that ratio.
    scale_dtype: storage of the block scales: ``"auto"`` (float16 for groups,
      whose scales cost ``16 / G`` bits a weight, where every scale is a normal
      float16; float32 otherwise), ``float32`` or ``float16``.
    filter: ``filter(path, leaf) -> bool`` picks the leaves to quantize; ``path`` is
      the ``/``-joined key path. Default: floating leaves with ndim >= 2.
    search_config: ranges and resolution of the search (default
      :class:`SearchConfig`: exponents in [0.05, 2.0], clip ratios in [0.3, 1]).
    progress: show a tqdm progress bar on stderr. Default: for trees of 50M weights
      or more, when stderr is a terminal.

  Returns:
    ``(params_q, alphas)``: ``params`` with each selected leaf replaced by a
    :class:`QArray`, and a tree of the same structure holding each quantized leaf's
    exponent (a float) and None elsewhere.
  """
  bits = check_bits(bits)
  grid = power.check_grid(grid)
  clip_mode, clip_ratio = check_clip(clip)
  fp16 = check_scale_dtype(scale_dtype)
  search_config = search_config or search.SearchConfig()
  tree.check_granularity(granularity)
  exponent = check_exponent(exponent)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  chosen = _select(flat, filter)

  # Leaves are batched by block shape and by sharding: a batch is stacked shard by
  # shard.
  groups: dict[tuple[tree.Blocks, sharding.Layout | None],
               list[tuple[int, str, Any]]] = {}
  for i, name, leaf in chosen:
    b = tree.blocks_for(tuple(leaf.shape), granularity)
    layout = sharding.layout_of(name, leaf)
    if layout is not None:
      sharding.check(name, layout, b, bits, clip_mode == 'block')
    groups.setdefault((b, layout), []).append((i, name, leaf))

  members = list(groups.values())
  blocks = [b for b, _ in groups]
  layouts = [layout for _, layout in groups]
  # Exponents and tables of sharded leaves are replicated on their mesh.
  placement = sharding.common_sharding(layouts)
  leaves = [tuple(leaf for _, _, leaf in m) for m in members]
  weights = [b.k * b.n * len(m) for b, m in zip(blocks, members)]
  bar = _progress_bar(2 * sum(weights), progress)
  stats = []
  for g, b, layout, w in zip(leaves, blocks, layouts, weights):
    if layout is None:
      stats.append(search.group_stats(g, bins=search_config.bins,
                                      **dataclasses.asdict(b)))
    else:
      stats.append(sharding.group_stats(g, layout=layout, bins=search_config.bins,
                                        **dataclasses.asdict(b)))
    _advance(bar, stats[-1], w)
  for (finite, _, _), m in zip(stats, members):
    for ok, (_, name, leaf) in zip(np.asarray(finite), m):
      if not ok:
        raise ValueError(f'{name}: leaf of shape {tuple(leaf.shape)} holds NaN or Inf')

  sizes = [len(m) for m in members]
  n = sum(sizes)
  plan = search.Plan(search_alpha=exponent in ('layer', 'global'),
                     search_clip=clip_mode != 'fixed', shared=exponent == 'global')
  alphas = jnp.full((n,), 1.0 if isinstance(exponent, str) else exponent, jnp.float32)
  clips = jnp.full((n,), clip_ratio, jnp.float32)
  if n and (plan.search_alpha or plan.search_clip):
    # The search runs on one device, from the statistics of every shard: its
    # result is the same as for unsharded leaves, bit for bit.
    alphas, clips = search.search_stats(
        jnp.concatenate([sharding.gather(s) for _, _, s in stats]), alphas, clips,
        bits=bits, grid=grid, plan=plan, config=search_config)
    # So is the exact refinement of layers under refine_below weights: such a layer
    # is gathered, on one device.
    small = [sharding.gather(g) if layout is not None
             and b.k * b.n < search_config.refine_below else g
             for g, b, layout in zip(leaves, blocks, layouts)]
    alphas, clips = _refine(alphas, clips, small, blocks, plan, bits, grid,
                            search_config)

  offsets = np.cumsum([0] + sizes)
  host_alphas = np.asarray(alphas)
  low = search_config.clip_lo if clip_mode == 'block' else 1.0
  out = [leaf for _, leaf in flat]
  alpha_out: list[float | None] = [None] * len(flat)
  for g, b, layout, m, o, (_, absmax, _), w in zip(leaves, blocks, layouts, members,
                                                  offsets, stats, weights):
    if fp16 is None and isinstance(granularity, str):
      half = np.zeros(len(m), bool)
    else:
      ratio = np.asarray(clips[o:o + len(m)])[:, None]
      host = np.asarray(absmax).reshape(len(m), -1) * ratio
      half = np.array([_fp16_fits(x, low) for x in host])
      if fp16 == np.dtype(np.float16) and not half.all():
        name = m[int(np.argmin(half))][1]
        raise ValueError(f'{name}: block scales fall outside the float16 range;'
                         ' use scale_dtype=float32')
      if fp16 == np.dtype(np.float32):
        half[:] = False
    options = dict(k=b.k, n=b.n, nk=b.nk, bits=bits, grid=grid,
                   block_clip=clip_mode == 'block', config=search_config)
    a, c = alphas[o:o + len(m)], clips[o:o + len(m)]
    if layout is None:
      codes, scales = search.encode_layers(g, a, c, absmax, jnp.asarray(half), **options)
    else:
      codes, scales = sharding.encode_layers(g, a, c, absmax, jnp.asarray(half),
                                             layout=layout, **options)
    _advance(bar, codes, w)
    where = None if layout is None else placement
    for j, (i, _, leaf) in enumerate(m):
      alpha = host_alphas[o + j]
      scale = scales[j].astype(jnp.float16) if half[j] else scales[j]
      out[i] = QArray(codes=codes[j], scale=scale,
                      alpha=sharding.place(jnp.float32(alpha), where),
                      table=sharding.place(
                          jnp.asarray(power.decode_table(alpha, bits, grid)), where),
                      bits=bits, shape=tuple(leaf.shape), dtype=np.dtype(leaf.dtype))
      alpha_out[i] = float(alpha)
  if bar is not None:
    bar.close()
  return (jax.tree_util.tree_unflatten(treedef, out),
          jax.tree_util.tree_unflatten(treedef, alpha_out))
