"""How a group's block scales are stored: float32, float16, or uint8 steps under a
float32 column scale (an index of ``qarray.SCALE_DTYPES`` per layer)."""

from __future__ import annotations

import jax
import numpy as np

from pqjax._src import sharding
from pqjax._src.core import qarray
from pqjax._src.options import QuantizeOptions
from pqjax._src.stages import Group, GroupStats

# Groups of this many blocks a column or more store uint8 scales by default: with
# the float32 column scale, ``nk + 4`` bytes a column instead of ``2 nk`` as float16,
# and the same error (benchmarks/scales.py).
CODED_MIN_BLOCKS = 5
FLOAT32, FLOAT16, UINT8 = (
  qarray.SCALE_DTYPES.index(np.dtype(t)) for t in (np.float32, np.float16, np.uint8)
)

# Float16 keeps 11 significant bits, plenty for a scale, over its normal range.
FP16_TINY = float(np.finfo(np.float16).tiny)
FP16_MAX = float(np.finfo(np.float16).max)


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
