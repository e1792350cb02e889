"""``quantize``: data-free power quantization of a parameter pytree."""

from __future__ import annotations

import math
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


def _check_finite(name: str, leaf: Any) -> None:
  if not bool(jnp.all(jnp.isfinite(leaf))):
    raise ValueError(f'{name}: leaf of shape {tuple(leaf.shape)} holds NaN or Inf')


def quantize(params: Any, bits: int = 4, *, granularity: tree.Granularity = 'channel',
             exponent: Exponent = 'layer', filter: tree.Filter | None = None,
             search_config: search.SearchConfig | None = None,
             ) -> tuple[Any, Any]:
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
    _check_finite(name, leaf)
    groups.setdefault(blocks, []).append((i, name, leaf))

  stacks = {b: jnp.stack([jnp.asarray(leaf, jnp.float32).reshape(b.k, b.n)
                          for _, _, leaf in members])
            for b, members in groups.items()}

  if exponent == 'layer':
    alphas = {b: search.search_layers(s, nk=b.nk, ncol=b.ncol, bits=bits,
                                      config=search_config)
              for b, s in stacks.items()}
  else:
    if exponent == 'global':
      value = (search.search_global(
          tuple(stacks.values()), blocks=tuple((b.nk, b.ncol) for b in stacks),
          bits=bits, config=search_config) if stacks else jnp.float32(1))
    else:
      value = jnp.float32(exponent)
    alphas = {b: jnp.full((s.shape[0],), value, jnp.float32) for b, s in stacks.items()}

  out = [leaf for _, leaf in flat]
  alpha_out: list[float | None] = [None] * len(flat)
  for b, members in groups.items():
    codes, scales = search.encode_layers(stacks[b], alphas[b], nk=b.nk, ncol=b.ncol,
                                         bits=bits)
    host_alphas = np.asarray(alphas[b])
    for j, (i, _, leaf) in enumerate(members):
      alpha = host_alphas[j]
      out[i] = QArray(codes=codes[j], scale=scales[j], alpha=jnp.float32(alpha),
                      table=jnp.asarray(power.decode_table(alpha, bits)), bits=bits,
                      shape=tuple(leaf.shape), dtype=np.dtype(leaf.dtype))
      alpha_out[i] = float(alpha)
  return (jax.tree_util.tree_unflatten(treedef, out),
          jax.tree_util.tree_unflatten(treedef, alpha_out))
