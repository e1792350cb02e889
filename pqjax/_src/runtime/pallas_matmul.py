"""``x @ W`` on GPU with ``W`` decoded from packed power-domain codes inside the tiles.

A Pallas kernel for the Triton backend. It reads the packed codes of a quantized weight
(the format of ``QArray``), decodes each tile in registers and multiplies it, so the
float weight is never written to memory: a one-row product reads 0.5 bytes a weight at
4 bits instead of 2 for bfloat16.

The format. A weight viewed as ``(K, N)`` is stored as ``codes`` of shape
``(packed_rows(K, bits), N)``, packed along K in units of ``U`` codes in ``B`` bytes:

======  ======  =====================================================================
bits    U, B    content of a unit (codes ``j = 0 .. U-1`` are rows ``U*i + j``)
======  ======  =====================================================================
2, 4    8/b, 1  uint8; code ``j`` at bits ``[j*b, (j+1)*b)``: an unsigned table index
3, 5-7  8, b    ``b`` uint8 rows, a little-endian bit stream; code ``j`` at bit ``b*j``
8       1, 1    int8 signed code ``q``; the table index is ``q + len(table) // 2``
======  ======  =====================================================================

``table`` (float32) holds the level of each index (``2**b`` entries for the full grid,
``2**b - 1`` for the symmetric one) and ``scale`` is ``(nk, ncol)``: ``nk`` blocks of
``rows = ceil(K / nk)`` rows along K (the last one may be shorter) and ``ncol`` 1 or N.
``W[k, n] = table[index(k, n)] * scale[k // rows, n if ncol > 1 else 0]``.

How a tile is computed. Each program owns ``block_m`` rows of ``x`` and ``block_n``
columns of ``W`` and loops over K in tiles of ``block_k`` codes, ``block_k / U`` units.
Triton cannot interleave rows cheaply, so the codes are never put back in K order:
code ``j`` of every unit of a tile forms its own ``(block_k / U, block_n)`` sub-tile,
which multiplies the columns ``U*i + j`` of ``x`` (a strided load of ``x``, which is
small). A tile is thus ``U`` products of depth ``block_k / U``. Two bodies share this:

* ``dot`` (2 rows and more): ``acc = acc + dot(x_j, w_j)`` on the tensor cores, ``w_j``
  cast to ``x``'s dtype (bfloat16 / float16 products, float32 accumulation; float32
  ``x`` uses ``precision``, TF32 on GPU by default as XLA does, ``HIGHEST`` for IEEE).
  Triton folds each add into the MMA's accumulator (wgmma from 64 rows, mma.sync
  below) and pipelines the loads of codes and ``x`` (``num_stages``).
* ``gemv`` (one row): ``acc2 = acc2 + x_j[:, None] * w_j``, one FFMA a code into a 2-D
  accumulator reduced once at the end. A tensor-core product would pad the row to 16
  and convert every decoded tile into the MMA operand layout through shared memory.
  Triton pipelines only loads that feed a dot, so gemv loads the codes two tiles
  ahead by hand (``prefetch``; at 2 to 4 bits by default).

Small products (few rows) are bound by reading the codes. To keep enough loads in
flight, K is split over ``split_k`` programs (split-K) when rows and columns give too
few programs for the GPU; the float32 partial sums are added by XLA after the kernel
(one small fusion, ``split_k * M * N`` floats).

Scales. One block along K (``nk == 1``: per channel or per tensor) is applied to the
accumulator after the loop, ``block_m * block_n`` multiplies in all. Groups are applied
per tile when every tile lies in one group (``rows % block_k == 0``; the default
``block_k`` is lowered to the largest power of two dividing ``rows`` when that still
makes a tile of 16 units): one scale row per tile, on the partial product or the
tile, whichever is smaller. Otherwise (ragged groups, e.g. K = 200 in 4 groups of 50)
each code's scale is gathered (``k // rows``): correct for any layout, one more load
and multiply a code.

The lookup. ``lookup='gather'`` (default) indexes the table in global memory with the
code tile, ``table[idx]``: one load a code, whose 32 addresses in a warp fall in the
table's 64 bytes at 4 bits (one L1 line). ``lookup='select'`` (2 to 4 bits) keeps the
levels in registers and picks one with a binary tree of ``2**b - 1`` selects on the
code's bits, with no memory traffic. Counted in the sm_90 SASS of the loop bodies
(Triton 3.9 with XLA's TTIR passes), instructions a code:

===================================  ======  ======
4 bits, bfloat16 x                   gather  select
===================================  ======  ======
gemv, 1 row (prefetch; 6.8 without)  7.2     17.3
dot, 128 x 128 block (per 128 rows)  9.2     19.1
===================================  ======  ======

A gathered code costs two address instructions (64-bit pointers), the load, the
unpacking (byte extract, shift, mask: 2.5) and the FFMA. One row at 4 bits needs about
28 codes per SM and clock to keep up with an H100's HBM (3.35 TB/s, 132 SMs, 1.8 GHz)
from 128 lanes of issue: the gather's 7.2 allow about 18 (63%), the tree's 17.3 about
7, so the gather is the default; ``benchmarks/gpu.py`` times both. At 5 to 8 bits the
table (255 or 256 levels, 1 KB) spans 8 L1 lines, so a warp's gather may take several
L1 passes; a tree would need 255 selects, so these widths always gather.

Shapes and tiles (:func:`choose_tiling` picks them; explicit values are checked):

* ``block_m``: 1 for ``gemv``; a power of two >= 16 for ``dot`` (Triton's smallest
  ``tl.dot``). Rows beyond M are masked.
* ``block_n``: a power of two >= 16. Columns beyond N are masked (only when N is not a
  multiple of ``block_n``, so aligned shapes pay nothing).
* ``block_k``: a power of two that is a multiple of ``U``; for ``dot`` also
  ``block_k / U >= 16``. A ragged last tile along K (K not a multiple of ``block_k``)
  is peeled off the loop and masked: ``x`` reads zero past K, so the codes that pad
  the last unit contribute nothing.
* any M >= 1, N >= 1, K >= 1. Nothing is padded or copied: ragged edges are masked.

The call passes Triton compiler parameters, which is what selects the Triton backend
(JAX's default Pallas backend on GPU is Mosaic GPU). Every default tiling of the
shapes in ``benchmarks/gpu.py`` compiles for sm_90 without register spills.

On TPU this body does not apply: Mosaic TPU has no per-element gather from a table
in memory, no strided lane loads of ``x`` and no masked loads; a TPU kernel would keep
the K loop in the grid with a VMEM accumulator, unpack with shifts on int32 vregs, look
levels up with selects or a one-hot product on the MXU, and de-interleave ``x`` in XLA
first. Mosaic GPU (``plgpu.kernel``, warpgroup MMA with the decoded operand in
registers, as JAX's ``hopper_mixed_type_matmul_mgpu`` does for int8/int4) is the way
to large-row products on Hopper beyond what Triton reaches; this module targets Triton,
which lowers the same code for every NVIDIA GPU since Ampere (and ROCm, untested).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.typing import DTypeLike

from pqjax._src.core.grid import MAX_BITS, MIN_BITS
from pqjax._src.core.operator import explicit_mesh
from pqjax._src.core.packing import codes_per_unit, decode_packed, packed_rows

Method = Literal['auto', 'dot', 'gemv']
Lookup = Literal['gather', 'select']
ScaleMode = Literal['end', 'tile', 'element']
# A Pallas memory reference (a kernel argument, or a view of one).
Ref = Any

# Codes of up to this many bits may be looked up with a tree of selects.
SELECT_MAX_BITS = 4
# Triton's tl.dot needs every dimension to be at least 16.
DOT_MIN = 16
DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
# Streaming multiprocessors of an H100 SXM; split-K aims at a few programs each.
GPU_SMS = 132
TARGET_PROGRAMS = 4 * GPU_SMS


def _pow2(v: int) -> bool:
  return v >= 1 and v & (v - 1) == 0


def _next_pow2(v: int) -> int:
  return 1 << max(0, int(v) - 1).bit_length()


def _largest_pow2_divisor(v: int) -> int:
  return v & -v


def unsupported_reason(
  bits: int,
  *,
  table_size: int | None = None,
  dtype: Any = None,
  backend: str | None = None,
) -> str | None:
  """Why :func:`packed_matmul` cannot run a product, or None if it can.

  Args:
    bits: code width.
    table_size: length of the decoding table, if known.
    dtype: dtype of the activations ``x``, if known.
    backend: ``"gpu"``/``"cuda"``/``"rocm"`` compile the kernel; any other (default
      ``jax.default_backend()``) can only run it with ``interpret=True``.

  Returns:
    A sentence naming the reason, or None.
  """
  if (
    isinstance(bits, bool)
    or not isinstance(bits, (int, np.integer))
    or not (MIN_BITS <= bits <= MAX_BITS)
  ):
    return f'bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}'
  if table_size is not None and table_size not in (2**bits, 2**bits - 1):
    return f'a {bits}-bit table has {2**bits} or {2**bits - 1} entries, got {table_size}'
  if dtype is not None and np.dtype(dtype) not in DTYPES:
    return f'x must be float32, bfloat16 or float16, got {np.dtype(dtype).name}'
  backend = jax.default_backend() if backend is None else backend
  if backend not in ('gpu', 'cuda', 'rocm'):
    return (
      f'the kernel compiles for GPU only (Triton), not {backend}; use the XLA'
      ' path there (interpret=True runs the kernel anywhere, slowly, for tests)'
    )
  return None


def supported(
  bits: int,
  *,
  table_size: int | None = None,
  dtype: Any = None,
  backend: str | None = None,
) -> bool:
  """Whether :func:`packed_matmul` compiles for this product (see
  :func:`unsupported_reason`); callers fall back to decoding and ``jnp.dot``."""
  return (
    unsupported_reason(bits, table_size=table_size, dtype=dtype, backend=backend) is None
  )


# Codes along K decoded per loop step, by body and bit width (5 stands for 5 to 7).
# Sized from Triton's sm_90 output (registers, shared memory, spills): 64 units a
# tile for gemv and small products, 32 for 3 bits (8 sub-products a tile: 64 units
# spill or take 145 KB of shared memory), 32 units at 128 x 128 (64 at 8 bits).
# 5 to 7 bits (8 sub-products from 5 to 7 byte planes) take 16 units, the least a
# tensor-core product allows; not yet measured on a GPU.
_DEFAULT_BLOCK_K = {
  'gemv': {2: 256, 3: 256, 4: 128, 5: 128, 8: 64},
  'dot': {2: 256, 3: 256, 4: 128, 5: 128, 8: 64},
  'large': {2: 128, 3: 128, 4: 64, 5: 128, 8: 64},
}


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How one product is cut into programs.

  Attributes:
    method: ``"dot"`` (tensor cores) or ``"gemv"`` (one row a program, FMA units).
    block_m: rows of ``x`` a program owns (1 for ``gemv``).
    block_n: columns of ``W`` a program owns.
    block_k: codes along K decoded per loop step.
    split_k: programs that share the K range of one output block.
    num_warps: Triton warps a program.
    num_stages: Triton software-pipelining depth of the K loop.
    prefetch: gemv loads the codes two tiles ahead, by hand.
    scale_mode: ``"end"`` (one block along K), ``"tile"`` (one group a tile) or
      ``"element"`` (a scale gathered per code).
  """

  method: Literal['dot', 'gemv']
  block_m: int
  block_n: int
  block_k: int
  split_k: int
  num_warps: int
  num_stages: int
  prefetch: bool
  scale_mode: ScaleMode


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """How the kernel is tuned: each value left unset is chosen by :func:`choose_tiling`.

  Attributes:
    method: ``"auto"`` (``gemv`` for one row, ``dot`` otherwise), ``"dot"`` or
      ``"gemv"``.
    block_m, block_n, block_k, split_k, num_warps, num_stages, prefetch: the
      :class:`Tiling`'s values; ``None`` (default) chooses each.
    lookup: ``"gather"`` (index the table in memory) or ``"select"`` (a tree of
      selects on levels held in registers, 2 to 4 bits).
  """

  method: Method = 'auto'
  block_m: int | None = None
  block_n: int | None = None
  block_k: int | None = None
  split_k: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  prefetch: bool | None = None
  lookup: Lookup = 'gather'


def _check_block(name: str, v: int, low: int) -> None:
  if not isinstance(v, (int, np.integer)) or not _pow2(int(v)) or v < low:
    raise ValueError(f'{name} must be a power of two >= {low}, got {v!r}')


def choose_tiling(
  m: int,
  k: int,
  n: int,
  bits: int,
  *,
  nk: int = 1,
  config: KernelConfig = KernelConfig(),
) -> Tiling:
  """The tiling of an ``(m, k) @ (k, n)`` product at ``bits`` bits.

  Defaults, reasoned for an H100 (132 SMs) from the compiled code, to be checked with
  ``benchmarks/gpu.py``:

  * one row: ``gemv``, 64 columns, 64 units of K a step (32 at 3 bits, 16 at 5 to
    7), codes prefetched two tiles ahead at 2 to 4 bits;
  * up to 64 rows (bound by reading the codes): ``dot`` with ``block_m`` the rows
    rounded up to a power of two (>= 16), 64 columns (32 while that leaves fewer
    programs than SMs), 64 units a step (32 at 3 bits, 16 at 5 to 7);
  * more rows (bound by the tensor cores): 128 x 128 blocks, 32 units a step (64 at
    8 bits, 16 at 5 to 7), 8 warps.

  Up to 64 rows, K is split until there are about ``4 * 132`` programs, keeping at
  least two tiles a split and the float32 partial sums (written, then read back)
  under a quarter of the bytes of codes: no split at 64 rows and K = 4096.

  Args:
    m, k, n: the product's shape.
    bits: code width.
    nk: scale blocks along K; with ``nk > 1`` an unset ``block_k`` is lowered to
      divide the group rows when that still makes a valid tile.
    config: the method and the values chosen by hand (its ``lookup`` is not part
      of the tiling).

  Returns:
    The :class:`Tiling`.
  """
  u, _ = codes_per_unit(bits)
  method = config.method
  if method == 'auto':
    method = 'gemv' if m == 1 else 'dot'
  if method not in ('dot', 'gemv'):
    raise ValueError(f'method must be "auto", "dot" or "gemv", got {method!r}')
  dot = method == 'dot'
  min_units = DOT_MIN if dot else 1
  block_m = config.block_m
  if block_m is None:
    block_m = min(128, max(DOT_MIN, _next_pow2(m))) if dot else 1
  elif dot:
    _check_block('block_m', block_m, DOT_MIN)
  elif block_m != 1:
    raise ValueError(f'gemv computes one row a program: block_m must be 1, got {block_m}')
  large = dot and block_m >= 128
  m_blocks = -(-m // block_m)
  block_n = config.block_n
  if block_n is None:
    block_n = min(128 if large else 64, max(DOT_MIN, _next_pow2(n)))
    # Small products are bound by memory: every SM should get a program.
    while dot and not large and block_n > 32 and m_blocks * -(-n // block_n) < GPU_SMS:
      block_n //= 2
  _check_block('block_n', block_n, DOT_MIN)
  block_k = config.block_k
  explicit_k = block_k is not None
  if block_k is None:
    block_k = _DEFAULT_BLOCK_K['large' if large else method][
      min(bits, 5) if bits < 8 else 8
    ]
    # No deeper than K needs, but never below the smallest valid tile.
    block_k = max(min(block_k, _next_pow2(k)), min_units * u)
  _check_block('block_k', block_k, min_units * u)
  if block_k % u:
    raise ValueError(f'block_k must be a multiple of {u} at {bits} bits, got {block_k}')

  rows = -(-k // nk)
  if nk == 1:
    scale_mode: ScaleMode = 'end'
  else:
    if rows % block_k and not explicit_k:
      # Lowered only as far as a tile of 16 units: tinier tiles cost more in loop
      # overhead than gathering each code's scale.
      p = _largest_pow2_divisor(rows)
      if p % u == 0 and p // u >= DOT_MIN:
        block_k = min(block_k, p)
    scale_mode = 'element' if rows % block_k else 'tile'

  full_tiles = k // block_k
  split_k = config.split_k
  if split_k is None:
    blocks = m_blocks * -(-n // block_n)
    split_k = 1
    if m <= 64 and blocks < TARGET_PROGRAMS:
      # 2 * 4 * m * n * split bytes of partial sums <= k * n * bits / 8 / 4.
      traffic = k * bits // (256 * m)
      split_k = max(1, min(TARGET_PROGRAMS // blocks, full_tiles // 2, traffic))
  if not isinstance(split_k, (int, np.integer)) or split_k < 1:
    raise ValueError(f'split_k must be a positive integer, got {split_k!r}')
  # Each split gets at least one whole tile (the ragged tail goes to the last); no
  # split is left empty.
  split_k = int(max(1, min(split_k, full_tiles)))
  if split_k > 1:
    split_k = -(-full_tiles // -(-full_tiles // split_k))
  num_warps = config.num_warps
  if num_warps is None:
    num_warps = 8 if large and block_n >= 128 else 4
  num_stages = 3 if config.num_stages is None else config.num_stages
  prefetch = config.prefetch
  if prefetch is None:
    # At 8 bits the carried int8 tiles cost more instructions than they save
    # (sm_90 SASS: 10.1 instead of 5.5 a code); at 2 to 4 bits, 2 to 12% more. 5 to
    # 7 bits carry 5 to 7 byte planes a tile: left to Triton's pipelining.
    prefetch = not dot and bits <= 4
  elif prefetch and dot:
    raise ValueError('prefetch applies to gemv; dot loads are pipelined by Triton')
  return Tiling(
    method=method,
    block_m=int(block_m),
    block_n=int(block_n),
    block_k=int(block_k),
    split_k=split_k,
    num_warps=int(num_warps),
    num_stages=int(num_stages),
    prefetch=bool(prefetch),
    scale_mode=scale_mode,
  )


@dataclasses.dataclass(frozen=True)
class _Launch:
  """Everything static the kernel body needs."""

  tiling: Tiling
  bits: int
  m: int
  k: int
  n: int
  nk: int
  ncol: int
  table_size: int
  lookup: Lookup
  compute_dtype: np.dtype
  out_dtype: np.dtype
  precision: lax.Precision | None

  @property
  def units(self) -> int:
    """Units of K a tile holds."""
    return self.tiling.block_k // codes_per_unit(self.bits)[0]

  @property
  def group_rows(self) -> int:
    return -(-self.k // self.nk)

  @property
  def tiles_per_split(self) -> int:
    return -(-(self.k // self.tiling.block_k) // self.tiling.split_k)


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  if a is None:
    return b
  return a if b is None else a & b


def _load(ref: Ref, mask: jax.Array | None) -> jax.Array:
  """Loads a ref view; masked-off elements read 0."""
  if mask is None:
    return ref[...]
  return plgpu.load(ref, mask=mask, other=0)


def _lookup_fn(table_ref: Ref, p: _Launch) -> Callable[[jax.Array], jax.Array]:
  """Maps int32 table indices to float32 levels."""
  if p.lookup == 'gather':
    return lambda idx: table_ref[idx].astype(jnp.float32)
  # The levels live in registers. Index 2**b - 1 of the symmetric grid is unused;
  # it repeats the last level so that the tree is complete.
  levels = [
    table_ref[min(c, p.table_size - 1)].astype(jnp.float32) for c in range(2**p.bits)
  ]

  def select(idx: jax.Array) -> jax.Array:
    vals = levels
    for b in range(p.bits):
      bit = ((idx >> b) & 1) != 0 if b else (idx & 1) != 0
      vals = [jnp.where(bit, vals[2 * q + 1], vals[2 * q]) for q in range(len(vals) // 2)]
    return vals[0]

  return select


def _kernel(
  x_ref: Ref, codes_ref: Ref, scale_ref: Ref, table_ref: Ref, o_ref: Ref, *, p: _Launch
) -> None:
  t_ = p.tiling
  u, nbytes = codes_per_unit(p.bits)
  nu = p.units
  gemv = t_.method == 'gemv'
  signed = p.bits == 8
  # Units wider than an int32 word (5 to 7 bits) are read byte plane by byte plane.
  stream = u * p.bits > 32
  pid_m, pid_n, pid_s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  iota_u = jnp.arange(nu, dtype=jnp.int32)
  cols = jnp.arange(t_.block_n, dtype=jnp.int32)
  col_ok = (pid_n * t_.block_n + cols < p.n) if p.n % t_.block_n else None
  rows = jnp.arange(t_.block_m, dtype=jnp.int32)
  row_ok = (pid_m * t_.block_m + rows < p.m) if p.m % t_.block_m else None
  units_total = packed_rows(p.k, p.bits) // nbytes
  lookup = _lookup_fn(table_ref, p)
  col_mask = None if col_ok is None else col_ok[None, :]

  def load_units(t: jax.Array, tail: bool) -> tuple[jax.Array, ...]:
    """The tile's bytes as stored: one ``(nu, block_n)`` plane per byte of a unit."""
    unit_ok = (t * nu + iota_u < units_total)[:, None] if tail else None
    mask = _and(unit_ok, col_mask)
    if nbytes == 1:
      return (_load(codes_ref.at[pl.ds(t * nu, nu), :], mask),)
    planes = [((t * nu + iota_u) * nbytes + b)[:, None] for b in range(nbytes)]
    return tuple(_load(codes_ref.at[r, cols[None, :]], mask) for r in planes)

  def word_of(planes: tuple[jax.Array, ...]) -> Any:
    """The units as int32 words (sign-extended for int8 codes); wide units as planes."""
    if stream:
      return tuple(plane.astype(jnp.int32) for plane in planes)
    word: Any = None
    for b, plane in enumerate(planes):
      plane = plane.astype(jnp.int32)
      word = plane if word is None else word | (plane << (8 * b))
    return word

  def code_index(word: Any, j: int) -> jax.Array:
    if stream:
      lo, shift = divmod(p.bits * j, 8)
      both = word[lo] | (word[lo + 1] << 8) if shift + p.bits > 8 else word[lo]
      return (both >> shift) & (2**p.bits - 1) if shift else both & (2**p.bits - 1)
    if signed:
      return word + p.table_size // 2
    idx = word >> (p.bits * j) if j else word
    # The top code of an unsigned unit needs no mask.
    return idx if p.bits * (j + 1) == 8 * nbytes else idx & (2**p.bits - 1)

  def load_x_column(kcols: jax.Array, tail: bool) -> jax.Array:
    """gemv's x at columns ``kcols``, ``(nu, 1)`` float32 (a strided load)."""
    xs = _load(x_ref.at[0, kcols], kcols < p.k if tail else None)
    return xs.astype(jnp.float32)[:, None]

  def load_x_parts(t: jax.Array, tail: bool) -> list[jax.Array]:
    """The tile's x as ``U`` ``(block_m, nu)`` parts, part ``j`` the columns
    ``U*i + j``: one contiguous (vectorised) load, de-interleaved in registers by
    halves. Strided loads of each part cost 13.3 instead of 10.5 instructions a code
    at 64 rows, 11.0 instead of 9.2 at 128 x 128 (sm_90 SASS, 4 bits)."""
    kcols = t * t_.block_k + jnp.arange(t_.block_k, dtype=jnp.int32)
    k_ok = kcols < p.k if tail else None
    mask = _and(
      None if row_ok is None else row_ok[:, None], None if k_ok is None else k_ok[None, :]
    )
    xt = _load(x_ref.at[rows[:, None], kcols[None, :]], mask).astype(p.compute_dtype)
    # Column U*i + j sits at position j of unit i; halving on the lowest bit of j
    # first gives the parts in bit-reversed order of j.
    parts, order = [xt.reshape(t_.block_m, nu, u)], [0]
    for level in range(u.bit_length() - 1):
      half = u >> (level + 1)
      split = []
      for part in parts:
        split += list(jnp.unstack(part.reshape(t_.block_m, nu, half, 2), axis=-1))
      parts = split
      order = [o + (b << level) for o in order for b in (0, 1)]
    parts = [part.reshape(t_.block_m, nu) for part in parts]
    return [parts[order.index(j)] for j in range(u)]

  def scale_row(g: jax.Array) -> jax.Array:
    """Scales of group ``g`` for the block's columns: ``(1, block_n)`` or a scalar."""
    if p.ncol == 1:
      return scale_ref[g, 0].astype(jnp.float32)
    return _load(scale_ref.at[g, :], col_ok).astype(jnp.float32)[None, :]

  def element_scale(kcols: jax.Array) -> jax.Array:
    g = jnp.minimum(lax.div(kcols, p.group_rows), p.nk - 1)
    if p.ncol == 1:
      return scale_ref[g, 0].astype(jnp.float32)[:, None]
    return _load(scale_ref.at[g[:, None], cols[None, :]], col_mask).astype(jnp.float32)

  def tile(
    t: jax.Array, acc: jax.Array, tail: bool, planes: tuple[jax.Array, ...] | None = None
  ) -> jax.Array:
    word = word_of(load_units(t, tail) if planes is None else planes)
    tiled = t_.scale_mode == 'tile'
    s_tile: Any = scale_row(lax.div(t * t_.block_k, p.group_rows)) if tiled else None
    # Scale the partial product or the decoded tile, whichever has fewer elements.
    scale_w = s_tile is not None and not gemv and t_.block_m >= t_.block_k
    scale_part = s_tile is not None and not scale_w
    # Without a partial product to scale, every term goes straight into the
    # accumulator: Triton folds `acc + dot(a, b)` into the MMA's accumulator and
    # `acc + x * w` into one FFMA (a separate sum costs an add a code).
    part = jnp.zeros_like(acc) if scale_part else acc
    x_parts: Any = None if gemv else load_x_parts(t, tail)
    for j in range(u):
      kcols = t * t_.block_k + u * iota_u + j
      w = lookup(code_index(word, j))
      if t_.scale_mode == 'element':
        w = w * element_scale(kcols)
      elif scale_w:
        w = w * s_tile
      if gemv:
        part = part + load_x_column(kcols, tail) * w
      else:
        part = part + jnp.dot(
          x_parts[j],
          w.astype(p.compute_dtype),
          precision=p.precision,
          preferred_element_type=jnp.float32,
        )
    return acc + part * s_tile if scale_part else part

  shape = (nu, t_.block_n) if gemv else (t_.block_m, t_.block_n)
  acc = jnp.zeros(shape, jnp.float32)
  full = p.k // t_.block_k
  if t_.split_k == 1:
    lo: Any = 0
    hi: Any = full
  else:
    lo = pid_s * p.tiles_per_split
    hi = jnp.minimum(lo + p.tiles_per_split, full)
  if full and t_.prefetch:
    # Triton pipelines only the loads that feed a dot, so gemv prefetches by hand,
    # two tiles ahead: the compiler issues a carried load at the end of a step
    # (sm_90 SASS), so tile t + 2, loaded during step t, stays in flight through
    # step t + 1. The bytes are carried as loaded (4 codes a register at 8 bits).
    # Indices are clamped to the last whole tile, never past it.
    ahead = lambda t: load_units(jnp.minimum(t, full - 1), False)

    def body(t: jax.Array, carry: tuple) -> tuple:
      acc, planes, following = carry
      return tile(t, acc, False, planes), following, ahead(t + 2)

    acc = lax.fori_loop(lo, hi, body, (acc, ahead(lo), ahead(lo + 1)))[0]
  elif full:
    acc = lax.fori_loop(lo, hi, lambda t, a: tile(t, a, False), acc)
  if p.k % t_.block_k:
    tail = lambda a: tile(jnp.int32(full), a, True)
    if t_.split_k == 1:
      acc = tail(acc)
    else:
      acc = lax.cond(pid_s == t_.split_k - 1, tail, lambda a: a, acc)

  out = jnp.sum(acc, axis=0, keepdims=True) if gemv else acc
  if t_.scale_mode == 'end':
    out = out * scale_row(jnp.int32(0))
  out = out.astype(jnp.float32 if t_.split_k > 1 else p.out_dtype)
  mask = _and(None if row_ok is None or gemv else row_ok[:, None], col_mask)
  if mask is None:
    o_ref[...] = out
  else:
    plgpu.store(o_ref, out, mask=mask)


def _check(
  x: jax.Array, codes: jax.Array, scale: jax.Array, table: jax.Array, bits: int, k: int
) -> None:
  reason = unsupported_reason(
    bits,
    table_size=int(table.shape[0]) if table.ndim == 1 else None,
    dtype=x.dtype,
    backend='gpu',
  )
  if reason:
    raise ValueError(reason)
  if x.ndim != 2 or x.shape[1] != k:
    raise ValueError(f'x must be (M, K) with K = {k}, got shape {tuple(x.shape)}')
  if codes.ndim != 2 or codes.shape[0] != packed_rows(k, bits):
    raise ValueError(
      f'codes must be ({packed_rows(k, bits)}, N) for K = {k} at {bits}'
      f' bits, got shape {tuple(codes.shape)}'
    )
  want = np.dtype(np.uint8) if bits < 8 else np.dtype(np.int8)
  if np.dtype(codes.dtype) != want:
    raise ValueError(f'codes must be {want.name} at {bits} bits, got {codes.dtype}')
  if table.ndim != 1:
    raise ValueError(f'table must be 1-D, got shape {tuple(table.shape)}')
  n = codes.shape[1]
  if (
    scale.ndim != 2
    or scale.shape[1] not in (1, n)
    or not 1 <= scale.shape[0] <= max(k, 1)
    or -(-k // -(-k // scale.shape[0])) != scale.shape[0]
  ):
    raise ValueError(f'scale {tuple(scale.shape)} does not tile a ({k}, {n}) weight')


def packed_matmul(
  x: jax.Array,
  codes: jax.Array,
  scale: jax.Array,
  table: jax.Array,
  *,
  bits: int,
  k: int,
  config: KernelConfig = KernelConfig(),
  precision: lax.Precision | None = None,
  interpret: bool = False,
  out_dtype: DTypeLike | None = None,
) -> jax.Array:
  """``x @ W`` where ``W`` is decoded from packed codes inside the kernel's tiles.

  Args:
    x: activations ``(M, K)``, float32, bfloat16 or float16.
    codes: packed codes ``(packed_rows(K, bits), N)``: uint8 for 2 to 7 bits, int8
      for 8 (``QArray.codes``).
    scale: block scales ``(nk, ncol)``, float32 or float16 (``QArray.scale``).
    table: float32 levels, ``2**bits`` or ``2**bits - 1`` entries (``QArray.table``).
    bits: code width, 2 to 8.
    k: rows of the weight (K).
    config: the method, the tiling and the lookup (:class:`KernelConfig`); unset
      values come from :func:`choose_tiling`.
    precision: of the in-kernel products for float32 ``x`` (default: TF32 on GPU,
      like XLA's default; ``lax.Precision.HIGHEST`` for IEEE float32).
    interpret: run the kernel with Pallas' interpreter (any backend, slow).
    out_dtype: dtype of the result, default ``x.dtype``.

  Returns:
    ``(M, N)`` in ``out_dtype``, accumulated in float32.
  """
  _check(x, codes, scale, table, bits, k)
  mesh = explicit_mesh(x, codes, scale, table)
  if mesh is not None:
    # The kernel reads whole operands: on an Explicit mesh it runs with the mesh's
    # axes Auto, where XLA gathers them (as on an Auto mesh), and a replicated result.
    fn = functools.partial(
      packed_matmul,
      bits=bits,
      k=k,
      config=config,
      precision=precision,
      interpret=interpret,
      out_dtype=out_dtype,
    )
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.auto_axes(fn, out_sharding=whole)(x, codes, scale, table)
  lookup = config.lookup
  if lookup not in ('gather', 'select'):
    raise ValueError(f'lookup must be "gather" or "select", got {lookup!r}')
  if lookup == 'select' and bits > SELECT_MAX_BITS:
    raise ValueError(f'lookup="select" covers up to {SELECT_MAX_BITS} bits, got {bits}')
  m, n = x.shape[0], codes.shape[1]
  out_dtype = np.dtype(x.dtype if out_dtype is None else out_dtype)
  if m == 0 or n == 0 or k == 0:
    return jnp.zeros((m, n), out_dtype)
  nk, ncol = scale.shape
  tiling = choose_tiling(m, k, n, bits, nk=nk, config=config)
  plan = _Launch(
    tiling=tiling,
    bits=bits,
    m=m,
    k=k,
    n=n,
    nk=nk,
    ncol=ncol,
    table_size=int(table.shape[0]),
    lookup=lookup,
    compute_dtype=np.dtype(x.dtype),
    out_dtype=out_dtype,
    precision=precision,
  )
  bm, bn, splits = tiling.block_m, tiling.block_n, tiling.split_k
  grid = (pl.cdiv(m, bm), pl.cdiv(n, bn), splits)
  in_specs = [
    pl.BlockSpec((bm, k), lambda i, j, s: (i, 0)),
    pl.BlockSpec((codes.shape[0], bn), lambda i, j, s: (0, j)),
    (
      pl.BlockSpec((nk, bn), lambda i, j, s: (0, j))
      if ncol > 1
      else pl.BlockSpec((nk, 1), lambda i, j, s: (0, 0))
    ),
    pl.BlockSpec((table.shape[0],), lambda i, j, s: (0,)),
  ]
  if splits > 1:
    out_shape = jax.ShapeDtypeStruct((splits, m, n), jnp.float32)
    out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
  else:
    out_shape = jax.ShapeDtypeStruct((m, n), out_dtype)
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
  call = pl.pallas_call(
    functools.partial(_kernel, p=plan),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_spec,
    out_shape=out_shape,
    interpret=interpret,
    compiler_params=plgpu.CompilerParams(
      num_warps=tiling.num_warps, num_stages=tiling.num_stages
    ),
    name=f'pqjax_packed_matmul_{bits}b',
  )

  def run(x: jax.Array, codes: jax.Array, scale: jax.Array, table: jax.Array):
    out = call(x, codes, scale, table)
    return jnp.sum(out, axis=0).astype(out_dtype) if splits > 1 else out

  product = jax.custom_jvp(run)
  product.defjvp(
    functools.partial(_product_jvp, run, bits=bits, k=k, out_dtype=out_dtype),
    symbolic_zeros=True,
  )
  return product(x, codes, scale, table)


def _product_jvp(
  run: Callable[..., jax.Array],
  primals: tuple[jax.Array, ...],
  tangents: tuple[Any, ...],
  *,
  bits: int,
  k: int,
  out_dtype: np.dtype,
) -> tuple[jax.Array, jax.Array]:
  """The kernel's value, and its derivative through the product written in JAX.

  A Pallas kernel has no derivative of its own; the product is linear in ``x`` and
  the tangent ``t @ W`` (with ``W`` decoded) transposes to ``g @ W.T``, so gradients
  decode the weight where the backward product runs, as the XLA paths do.
  """
  out = run(*primals)
  live = [
    i
    for i, t in enumerate(tangents)
    if i != 1 and not isinstance(t, jax.custom_derivatives.SymbolicZero)
  ]
  if not live:
    return out, jnp.zeros_like(out)

  def reference(*values: jax.Array) -> jax.Array:
    x, codes, scale, table = (
      values[live.index(i)] if i in live else p for i, p in enumerate(primals)
    )
    w = decode_packed(codes, scale.astype(jnp.float32)[:, None, :], table, bits, k)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)

  _, t_out = jax.jvp(reference, [primals[i] for i in live], [tangents[i] for i in live])
  return out, t_out
