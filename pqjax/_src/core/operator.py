"""The power quantization operator: encoding to codes, decoding, and its error.

Every function here works on a 3-D block view ``(nk, G, ncol)`` of a 2-D ``(K, N)``
weight: ``nk`` blocks of ``G`` consecutive rows along K, and ``ncol`` columns that are
either 1 (one scale shared by all columns) or N (one scale per column). The block
scales have shape ``(nk, 1, ncol)``. See :mod:`grid` for the levels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pqjax._src.core.grid import (
  level_magnitude,
  qmax,
  steps,
  thresholds,
  zero_code,
)

# XLA:CPU divides by multiplying with the reciprocal, and flushes a subnormal
# reciprocal to zero: scales above 2 ** 126 would zero their block. Both sides are
# scaled down by a power of two first, which is exact.
_BIG = 2.0**64


def divide(w: jax.Array, scale: jax.Array) -> jax.Array:
  """``w / scale`` in float32; a zero scale gives zeros, never NaN."""
  w = w.astype(jnp.float32)
  big = scale > _BIG
  w = jnp.where(big, w * (1 / _BIG), w)
  scale = jnp.where(big, scale * (1 / _BIG), jnp.where(scale > 0, scale, 1.0))
  return w / scale


def magnitude_code(
  x: jax.Array, alpha: jax.Array | float, d: jax.Array | int, grid: str
) -> jax.Array:
  """Code magnitude in [0, d] of normalised magnitudes ``x`` (int32).

  The symmetric grid rounds in the power domain, ``round(d x ** a)``, as the paper
  does. The full grid takes the nearest level in the weight domain, which is what
  the reconstruction error measures.
  """
  y = d * jnp.power(x, alpha)
  if grid != 'full':
    return jnp.clip(jnp.round(y), 0, d).astype(jnp.int32)
  k = jnp.clip(jnp.floor(y), 0, d - 1).astype(jnp.int32)
  lo = level_magnitude(k, alpha, d)
  hi = level_magnitude(k + 1, alpha, d)
  return k + (x + x >= lo + hi).astype(jnp.int32)


def encode_magnitude(x: jax.Array, alpha: jax.Array | float, bits: int) -> jax.Array:
  """Code magnitudes ``round(qmax * x ** alpha)`` for normalised ``x`` in [0, 1]."""
  return magnitude_code(x, alpha, qmax(bits), 'symmetric')


def decode_magnitude(
  k: jax.Array, alpha: jax.Array | float, bits: int, offset: float = 0.0
) -> jax.Array:
  """Normalised magnitudes ``((k + offset) / qmax) ** (1 / alpha)`` of codes ``k``.

  ``offset=-0.5`` gives the rounding threshold below code ``k``.
  """
  qm = qmax(bits)
  return jnp.power((k.astype(jnp.float32) + offset) / qm, 1.0 / alpha)


# Up to this many bits, codes are found by comparing x with the thresholds between
# levels: even 127 compares a weight cost less than the three pows of the formula
# (XLA:CPU, 1536 x 384: 1.4 against 8.5 ms at 6 bits, 2.7 against 8.0 at 7; at 8
# bits about the same). They agree with the formula except within float32 rounding
# of a threshold, where the formula itself is a tie.
THRESHOLD_BITS = 7


def encode(
  w3: jax.Array, scale: jax.Array, alpha: jax.Array, bits: int, grid: str = 'symmetric'
) -> jax.Array:
  """Signed codes (int32) of a block view ``w3``: ``[-d_neg, d_pos]``.

  ``scale`` is the block scale the levels are multiplied by: the block's absmax, or
  less when clipping, in which case magnitudes beyond it take the largest level.
  """
  x = divide(w3, scale)
  if bits <= THRESHOLD_BITS:
    t = thresholds(alpha, bits, grid)
    u = jnp.zeros(x.shape, jnp.int32)
    for j in range(t.shape[0]):
      u = u + (x >= t[j]).astype(jnp.int32)
    return u - steps(bits, grid)[0]
  d_neg, d_pos = steps(bits, grid)
  neg = x < 0
  d = jnp.where(neg, d_neg, d_pos) if d_neg != d_pos else d_pos
  k = magnitude_code(jnp.minimum(jnp.abs(x), 1.0), alpha, d, grid)
  return jnp.where(neg, -k, k)


def decode(q: jax.Array, scale: jax.Array, table: jax.Array) -> jax.Array:
  """Float32 block view from signed codes: one table lookup and one multiply."""
  return take(table, q + zero_code(table.shape[0])) * scale


def take(
  table: jax.Array, index: jax.Array, axis: int = 0, *, mode: str | None = None
) -> jax.Array:
  """``jnp.take(table, index, axis, mode=mode)``, with its sharding given on an
  Explicit mesh.

  A lookup in a table by sharded codes (or in a sharded table by replicated rows)
  has no sharding JAX infers where the mesh's axes are Explicit
  (``jax.make_mesh``'s default): it raises ``ShardingTypeError`` unless told that
  the result is sharded as the index, then as the table's other axes.
  """
  mesh = explicit_mesh(index, table)
  if mesh is None and mode is None:
    return jnp.take(table, index, axis=axis)
  t = jnp.moveaxis(table, axis, 0)
  sharding = None
  if mesh is not None:
    by_index = spec(index)
    used = {a for e in by_index for a in axis_names(e)}
    rest = [None if used & set(axis_names(e)) else e for e in spec(t)[1:]]
    sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(*by_index, *rest)
    )
  # jnp.take has no mode="promise_in_bounds"; .at[].get has both.
  out = t.at[index].get(mode=mode, out_sharding=sharding)
  return jnp.moveaxis(
    out, tuple(range(index.ndim, index.ndim + axis)), tuple(range(axis))
  )


def explicit_mesh(*arrays: jax.Array) -> jax.sharding.AbstractMesh | None:
  """The mesh of the first array typed with Explicit mesh axes, if any: there JAX
  asks for the shardings it cannot infer."""
  for x in arrays:
    mesh = getattr(jax.typeof(x).sharding, 'mesh', None)
    if mesh is not None and jax.sharding.AxisType.Explicit in mesh.axis_types:
      return mesh
  return None


# One entry of a partition spec: the mesh axes an array axis is split over.
SpecEntry = str | tuple[str, ...] | None


def spec(x: jax.Array) -> tuple[SpecEntry, ...]:
  """The partition spec of ``x``'s type, one entry an axis."""
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (x.ndim - len(spec))


def axis_names(entry: SpecEntry) -> tuple[str, ...]:
  """The mesh axes of one partition spec entry: None, a name or a tuple of names."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def reconstruct(
  x: jax.Array,
  log_x: jax.Array,
  d: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  grid: str,
) -> jax.Array:
  """Decoded normalised magnitudes of ``x = |w| / absmax`` (search form).

  ``log_x`` is ``log(x)``, computed once by the caller (the search evaluates this
  many times, and ``exp(a log x)`` costs half of ``pow(x, a)``); ``d`` is the code
  range of each weight's side of the grid. The levels are ``clip`` times the
  grid's: magnitudes above ``clip`` take the largest.
  """
  y = d * jnp.exp(alpha * (log_x - jnp.log(clip)))
  level = lambda k: clip * jnp.exp(jnp.log(k / d) / alpha)
  if grid == 'full':
    k = jnp.clip(jnp.floor(y), 0, d - 1)
    lo, hi = level(k), level(k + 1)
    return jnp.where(x + x >= lo + hi, hi, lo)
  return level(jnp.clip(jnp.round(y), 0, d))


def block_error(
  x: jax.Array,
  log_x: jax.Array,
  d: jax.Array,
  scale: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  grid: str,
) -> jax.Array:
  """``||w - w_hat||^2`` of one layer from :func:`reconstruct`'s inputs and absmax."""
  xhat = reconstruct(x, log_x, d, alpha, clip, grid)
  per_block = jnp.sum(jnp.square(x - xhat), axis=1, keepdims=True)
  return jnp.sum(per_block * jnp.square(scale))
