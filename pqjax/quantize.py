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

from pqjax import power, search, tree
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


def _refine(alphas: jax.Array, leaves: list[tuple[Any, ...]],
            blocks: list[tree.Blocks], shared: bool, bits: int,
            config: search.SearchConfig) -> jax.Array:
  """Exact refinement of the exponents of the small layers (all, if ``shared``)."""
  sizes = [b.k * b.n for b in blocks]
  if shared:
    small = list(range(len(blocks))) if search.needs_refine(
        sum(s * len(g) for s, g in zip(sizes, leaves)), config) else []
  else:
    small = [i for i, s in enumerate(sizes) if search.needs_refine(s, config)]
  if not small:
    return alphas
  offsets = np.cumsum([0] + [len(g) for g in leaves])
  index = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in small])
  refined = search.refine_layers(
      tuple(leaves[i] for i in small), alphas[index],
      views=tuple(dataclasses.astuple(blocks[i]) for i in small), bits=bits,
      config=config, shared=shared)
  return alphas.at[index].set(refined)


def quantize(params: Any, bits: int = 4, *, granularity: tree.Granularity = 'channel',
             exponent: Exponent = 'layer', filter: tree.Filter | None = None,
             search_config: search.SearchConfig | None = None,
             progress: bool | None = None) -> tuple[Any, Any]:
  """Quantizes the selected leaves of ``params`` with the power map.

  Args:
    params: any pytree of arrays (Flax variables, ``nnx.State``, plain dicts...).
    bits: code width, 2 to 8.
    granularity: ``"channel"`` (one scale per output feature, the last axis),
      ``"tensor"`` (one scale per leaf) or an int ``G`` (one scale per ``G``
      consecutive rows of one column).
    exponent: ``"layer"`` (searched per leaf), ``"global"`` (one exponent for the
      whole tree, minimising the summed error) or a fixed float (``1.0`` is uniform
      round-to-nearest).
    filter: ``filter(path, leaf) -> bool`` picks the leaves to quantize; ``path`` is
      the ``/``-joined key path. Default: floating leaves with ndim >= 2.
    search_config: range and resolution of the exponent search (default
      :class:`SearchConfig`: exponents in [0.05, 2.0]).
    progress: show a tqdm progress bar on stderr. Default: for trees of 50M weights
      or more, when stderr is a terminal.

  Returns:
    ``(params_q, alphas)``: ``params`` with each selected leaf replaced by a
    :class:`QArray`, and a tree of the same structure holding each quantized leaf's
    exponent (a float) and None elsewhere.
  """
  bits = check_bits(bits)
  search_config = search_config or search.SearchConfig()
  tree.check_granularity(granularity)
  exponent = check_exponent(exponent)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  chosen = _select(flat, filter)

  groups: dict[tree.Blocks, list[tuple[int, str, Any]]] = {}
  for i, name, leaf in chosen:
    blocks = tree.blocks_for(name, tuple(leaf.shape), granularity)
    groups.setdefault(blocks, []).append((i, name, leaf))

  members = list(groups.values())
  leaves = [tuple(leaf for _, _, leaf in m) for m in members]
  weights = [b.k * b.n * len(m) for b, m in zip(groups, members)]
  bar = _progress_bar(2 * sum(weights), progress)
  stats = []
  for g, b, w in zip(leaves, groups, weights):
    stats.append(search.group_stats(g, bins=search_config.bins, **dataclasses.asdict(b)))
    _advance(bar, stats[-1], w)
  for (finite, _, _), m in zip(stats, members):
    for ok, (_, name, leaf) in zip(np.asarray(finite), m):
      if not ok:
        raise ValueError(f'{name}: leaf of shape {tuple(leaf.shape)} holds NaN or Inf')

  sizes = [len(m) for m in members]
  if not groups:
    alphas = jnp.zeros((0,), jnp.float32)
  elif exponent in ('layer', 'global'):
    shared = exponent == 'global'
    alphas = search.search_stats(jnp.concatenate([s for _, _, s in stats]), bits=bits,
                                 config=search_config, shared=shared)
    alphas = _refine(alphas, leaves, list(groups), shared, bits, search_config)
  else:
    alphas = jnp.full((sum(sizes),), exponent, jnp.float32)

  offsets = np.cumsum([0] + sizes)
  host_alphas = np.asarray(alphas)
  out = [leaf for _, leaf in flat]
  alpha_out: list[float | None] = [None] * len(flat)
  for g, b, m, o, (_, scale, _), w in zip(leaves, groups, members, offsets, stats,
                                         weights):
    codes, scales = search.encode_layers(g, alphas[o:o + len(m)], scale, bits=bits, k=b.k,
                                         n=b.n, nk=b.nk)
    _advance(bar, codes, w)
    for j, (i, _, leaf) in enumerate(m):
      alpha = host_alphas[o + j]
      out[i] = QArray(codes=codes[j], scale=scales[j], alpha=jnp.float32(alpha),
                      table=jnp.asarray(power.decode_table(alpha, bits)), bits=bits,
                      shape=tuple(leaf.shape), dtype=np.dtype(leaf.dtype))
      alpha_out[i] = float(alpha)
  if bar is not None:
    bar.close()
  return (jax.tree_util.tree_unflatten(treedef, out),
          jax.tree_util.tree_unflatten(treedef, alpha_out))
