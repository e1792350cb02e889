"""``quantize_checkpoint``: :func:`quantize`'s stages over tensors streamed from files.

select -> group -> statistics -> search -> encode and write, as in memory, but each
leaf is read from the checkpoint when a pass needs it and let go after: the
statistics pass reads every selected leaf once, the search runs on all layers'
statistics (small), and the encoding pass reads each leaf again and writes its
arrays at their place in the output, which is laid out before (see
:mod:`pqjax._src.io.writer`). A leaf of up to ``working_set`` bytes as float32 is
read whole (counting the programs' temporaries) and goes through the very programs
:func:`quantize` runs, one leaf at a time; a larger one is read one tile of
:mod:`pqjax._src.search.tiles` at a time for its statistics (a tile column where
group scales cut K) and a few columns at a time for its codes, whose block maxima,
per-tile statistics (summed in tile order) and codes are those of the whole leaf,
bit for bit. So the result is what :func:`quantize` gives on the same tree, and
memory holds about the working set or one tile.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src import encoding, quantize
from pqjax._src.core import operator, packing
from pqjax._src.core.blocks import Blocks, block_absmax, block_view
from pqjax._src.core.grid import Grid, num_levels
from pqjax._src.core.leaves import PyTree
from pqjax._src.core.qarray import SCALE_DTYPES, QArray
from pqjax._src.io import atomic, inputs, orbax, sources, treespec
from pqjax._src.io.writer import Writer
from pqjax._src.options import QuantizeOptions
from pqjax._src.scale_storage import FLOAT32, UINT8, scale_storage
from pqjax._src.search import stats, tiles
from pqjax._src.stages import Group, GroupStats, Leaf
from pqjax._src.summary import Summary, summary
from pqjax._src.widths import choose_widths

WORKING_SET = 256 << 20
SHARD_BYTES = 2 << 30


def _key_path(path: str) -> tuple[jax.tree_util.DictKey, ...]:
  return tuple(jax.tree_util.DictKey(p) for p in path.split('/'))


# --- reading a leaf ---------------------------------------------------------------


@dataclasses.dataclass
class _Reader:
  """A leaf's values, whole or a block at a time, on the device."""

  source: sources.Source
  working_set: int

  def whole(self, tensor: sources.Tensor) -> jax.Array:
    return jnp.asarray(self.source.read(tensor))

  def fits(self, tensor: sources.Tensor) -> bool:
    """Whether the leaf is read whole: as float32 with the programs' temporaries
    (about three copies more), within the working set."""
    return 16 * tensor.size <= self.working_set

  def columns(
    self,
    tensor: sources.Tensor,
    layer: int,
    k: int,
    cols: slice,
    rows: slice = slice(None),
  ) -> jax.Array:
    """Rows ``rows`` (all by default) of one layer's ``(k, N)`` view, columns
    ``cols``, as float32."""
    first, last, _ = rows.indices(k)
    span = slice(layer * k + first, layer * k + last)
    return jnp.asarray(self.source.read(tensor, span, cols)).astype(jnp.float32)

  def column_width(self, k: int, n: int) -> int:
    """Columns encoded at once: all ``k`` rows of them, as float32 a sixteenth of
    the working set (the encoding's temporaries take several times that)."""
    return max(1, min(n, self.working_set // (64 * k)))


def _tile_columns(k: int, n: int, nk: int) -> tuple[int, int, int, int]:
  """``(tk, tn, kt, nt)``: tiles of a layer's padded ``(nk * rows, N)`` view."""
  rows = -(-k // nk)
  tk, tn = tiles.counts(nk * rows, n)
  return tk, tn, nk * rows // tk, n // tn


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
  try:
    return ctypes.CDLL(None).malloc_trim  # glibc
  except (OSError, AttributeError):
    return None


def _trim_heap() -> None:
  """Hands the heap's free pages back to the system after a leaf.

  glibc keeps what a leaf's temporaries freed in its arenas (one per thread that
  allocated), so peak RSS grew with the model's large leaves, not the working set:
  Llama-shaped bf16 folders by the command line peaked at 0.69 GB (1B) and 1.01 GB
  (8B) without it, 0.64 and 0.85 GB with it, for no measurable time.
  """
  trim = _malloc_trim()
  if trim is not None:
    trim(0)


# --- 3. statistics, leaf by leaf ----------------------------------------------------


@functools.partial(jax.jit, static_argnames=('nk', 'ncol'))
def _column_absmax(w: jax.Array, *, nk: int, ncol: int) -> jax.Array:
  return block_absmax(block_view(w, nk), ncol)


def _max_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Elementwise max of non-negative floats by their bits, as block_absmax takes it."""
  return np.maximum(a.view(np.int32), b.view(np.int32)).view(np.float32)


@functools.partial(jax.jit, static_argnames=('tk', 'nk', 'bins'))
def _column_stats(
  w: jax.Array, absmax: jax.Array, weight: jax.Array, *, tk: int, nk: int, bins: int
) -> jax.Array:
  """Stats ``(tk, 2, bins, 2)`` of the tiles of one tile column, as ``tile_stats``.

  ``w`` ``(k, nt)``; ``absmax`` ``(nk, 1, c)`` and ``weight`` ``(1, nk, 1, c)`` its
  columns' block scales and normalised weights (``c`` is ``nt``, or 1 for one scale).
  """
  x = operator.divide(block_view(w, nk), absmax)
  rows = x.shape[1]
  x = x.reshape(nk * rows, w.shape[1])
  kt = nk * rows // tk
  per_row = jnp.broadcast_to(weight, (1, nk, rows, weight.shape[3])).reshape(
    1, nk * rows, weight.shape[3]
  )
  out = []
  for i in range(tk):
    xt = x[i * kt : (i + 1) * kt][None, None]
    st = weight if nk == 1 else per_row[:, i * kt : (i + 1) * kt][:, None]
    out.append(stats._stats(xt, st, bins)[0])
  return jnp.stack(out)


def _leaf_stats(reader: _Reader, leaf: Leaf, blocks: Blocks, bins: int) -> GroupStats:
  """A leaf's finiteness, block absmax and binned statistics, layer by layer."""
  k, n, nk, ncol = blocks.k, blocks.n, blocks.nk, blocks.ncol
  if reader.fits(leaf.value):
    return GroupStats(
      *stats.group_stats(
        (reader.whole(leaf.value),), k=k, n=n, nk=nk, ncol=ncol, bins=bins
      )
    )
  tk, tn, kt, nt = _tile_columns(k, n, nk)
  # One scale per column block of all rows (per channel, per tensor): tiles are read
  # one at a time. Groups cut K into blocks that tiles do not follow: whole columns.
  by_tile = nk == 1
  row_tiles = [slice(i * kt, (i + 1) * kt) for i in range(tk)] if by_tile else None
  finite, absmaxes, binned = [], [], []
  for layer in range(leaf.layer_count):
    cols = [slice(j * nt, (j + 1) * nt) for j in range(tn)]
    if row_tiles is None:
      parts = [
        np.asarray(
          _column_absmax(reader.columns(leaf.value, layer, k, c), nk=nk, ncol=ncol)
        )
        for c in cols
      ]
    else:
      # A maximum is exact in any order: tile by tile.
      parts = [
        functools.reduce(
          _max_bits,
          [
            np.asarray(
              _column_absmax(reader.columns(leaf.value, layer, k, c, r), nk=1, ncol=ncol)
            )
            for r in row_tiles
          ],
        )
        for c in cols
      ]
    if ncol == 1:
      absmax = functools.reduce(_max_bits, parts)
    else:
      absmax = np.concatenate(parts, axis=2)
    absmax = absmax[None]
    host = jnp.asarray(absmax)
    weight = np.asarray(stats.normalise(host, stats.layer_binary_exponent(host)))
    per_tile: list[list[Any]] = [[None] * tn for _ in range(tk)]
    for j, c in enumerate(cols):
      a = jnp.asarray(absmax[0] if ncol == 1 else absmax[0][..., c])
      wt = jnp.asarray(weight if ncol == 1 else weight[..., c])
      if row_tiles is None:
        w = reader.columns(leaf.value, layer, k, c)
        s = jax.block_until_ready(_column_stats(w, a, wt, tk=tk, nk=nk, bins=bins))
        for i in range(tk):
          per_tile[i][j] = s[i]
      else:
        for i, r in enumerate(row_tiles):
          w = reader.columns(leaf.value, layer, k, c, r)
          per_tile[i][j] = jax.block_until_ready(
            _column_stats(w, a, wt, tk=1, nk=1, bins=bins)[0]
          )
    # Summed in tile order (row-major), as tiles.fold does.
    order = [t for row in per_tile for t in row]
    total = order[0]
    for t in order[1:]:
      total = total + t
    finite.append(bool(np.all(np.isfinite(absmax))))
    absmaxes.append(absmax)
    binned.append(total[None])
  return GroupStats(
    jnp.asarray(finite), jnp.asarray(np.concatenate(absmaxes)), jnp.concatenate(binned)
  )


def statistics(
  groups: Sequence[Group],
  reader: _Reader,
  bins: int,
  advance: Callable[[int], None],
) -> list[GroupStats]:
  """:func:`quantize.statistics`, one leaf at a time; ValueError on NaN or Inf."""
  out = []
  for g in groups:
    parts = []
    for leaf in g.leaves:
      # Waited for: dispatch would run ahead, each queued program holding its
      # input (a tile of weights) until it runs.
      parts.append(jax.block_until_ready(_leaf_stats(reader, leaf, g.blocks, bins)))
      _trim_heap()
      advance(leaf.value.nbytes)
    out.append(
      GroupStats(
        *(jnp.concatenate([getattr(p, f) for p in parts]) for f in GroupStats._fields)
      )
    )
  quantize.check_finite(groups, out)
  return out


# --- 5. encoding, leaf by leaf ------------------------------------------------------


def _leaf_arrays(
  reader: _Reader, p: _Planned, emit: Callable[[np.ndarray, int, int], None]
) -> tuple[Any, Any, Any, Any]:
  """A leaf's codes, scale values, uint8 steps and column scales (host arrays).

  A leaf read in parts hands its codes over part by part instead, ``emit(codes,
  row, col)`` (their place in the leaf's codes seen as a matrix of ``N`` columns),
  and its codes come back as None.
  """
  leaf, g, options = p.leaf, p.group, p.options
  absmax, alpha, clip, kinds = p.absmax, p.alpha, p.clip, p.kinds
  b = g.blocks
  spec = quantize.encode_spec(g, options)
  # A block clip over all columns (one scale a layer) needs the whole layer.
  if reader.fits(leaf.value) or (b.ncol == 1 and spec.block_clip):
    e = encoding.encode_layers(
      (reader.whole(leaf.value),),
      alpha,
      clip,
      absmax,
      kinds,
      spec=spec,
      layers=(leaf.layers,),
    )
    return tuple(np.asarray(x[0]) for x in e)  # type: ignore[return-value]
  # Stored rows are contiguous: blocks of them where they are the leaf's rows.
  if leaf.value.perm is None and b.nk == 1 and not spec.block_clip:
    return _encode_rows(reader, p, spec, emit)
  # Codes are packed along K and scales are per column: any columns encode alone,
  # their codes written at their place, their scales into arrays made once.
  width = reader.column_width(b.k, b.n)
  per_layer = packing.packed_rows(b.k, g.bits)
  scales: list[np.ndarray] = []
  for layer in range(leaf.layer_count):
    for j in range(0, b.n, width):
      cols = slice(j, min(b.n, j + width))
      w = reader.columns(leaf.value, layer, b.k, cols)
      a = absmax[layer] if b.ncol == 1 else absmax[layer][..., cols]
      codes, *part = (
        np.asarray(x)
        for x in _encode_columns(
          w, alpha[layer], clip[layer], a, jnp.asarray(kinds[layer]), spec=spec
        )
      )
      emit(codes, layer * per_layer, j)
      if not scales:
        scales = [
          np.empty(
            (leaf.layer_count, *x.shape[:-1], b.n if b.ncol != 1 else x.shape[-1]),
            x.dtype,
          )
          for x in part
        ]
      for out, x in zip(scales, part):
        # Per column, unless one scale serves every column.
        if b.ncol != 1:
          out[layer, ..., cols] = x
        elif j == 0:
          out[layer] = x
  return (None, *(x.reshape(*leaf.layers, *x.shape[1:]) for x in scales))  # type: ignore[return-value]


def _encode_rows(
  reader: _Reader,
  p: _Planned,
  spec: encoding.EncodeSpec,
  emit: Callable[[np.ndarray, int, int], None],
) -> tuple[Any, Any, Any, Any]:
  """Codes a block of rows at a time, handed to ``emit``; the scales of all rows.

  One scale block a column (per channel, per tensor): a code depends on its weight
  and its column's scale, which the column's maximum (from the statistics) fixes,
  so blocks of whole packing units of rows encode alone, and their packed rows are
  contiguous in the output. The leaf's codes are never held whole (the 128256 x 4096
  embedding's are 263 MB at 4 bits).
  """
  leaf, g, alpha, clip, kinds = p.leaf, p.group, p.alpha, p.clip, p.kinds
  b = g.blocks
  unit = packing.codes_per_unit(g.bits)[0] * 8  # rows: whole bytes at every width
  step = max(unit, reader.working_set // (64 * b.n) // unit * unit)
  per_layer = packing.packed_rows(b.k, g.bits)
  rest: list[np.ndarray] = []
  for layer in range(leaf.layer_count):
    for r0 in range(0, b.k, step):
      rows = slice(r0, min(b.k, r0 + step))
      w = reader.columns(leaf.value, layer, b.k, slice(None), rows)
      codes, *scales = (
        np.asarray(x)
        for x in _encode_columns(
          w,
          alpha[layer],
          clip[layer],
          p.absmax[layer],
          jnp.asarray(kinds[layer]),
          spec=spec,
        )
      )
      emit(codes, layer * per_layer + packing.packed_rows(r0, g.bits), 0)
      if r0 == 0:
        if not rest:
          rest = [np.empty((leaf.layer_count, *x.shape), x.dtype) for x in scales]
        for out, x in zip(rest, scales):
          out[layer] = x
  return (None, *(x.reshape(*leaf.layers, *x.shape[1:]) for x in rest))  # type: ignore[return-value]


# encoding.encode_block on some columns of a layer (all its rows).
_encode_columns = jax.jit(encoding.encode_block, static_argnames=('spec', 'column_max'))


def _lost_blocks(absmax: np.ndarray, scale: np.ndarray) -> int:
  return int(np.sum((absmax.reshape(-1) > 0) & (scale.reshape(-1) == 0)))


def _inside(path: Path, folder: Path) -> bool:
  """Whether ``path`` is ``folder`` or lies in it (links resolved)."""
  path, folder = path.resolve(), folder.resolve()
  return path == folder or folder in path.parents


# --- the output's layout ------------------------------------------------------------


def _nest(
  paths: Sequence[str], values: Sequence[QArray | jax.ShapeDtypeStruct]
) -> PyTree:
  root: dict[str, Any] = {}
  for path, value in zip(paths, values):
    *parents, last = path.split('/')
    node = root
    for part in parents:
      node = node.setdefault(part, {})
    node[last] = value
  return root


def _names(spec: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """Each leaf's stored tensor names by its path: a name, or ``{field: name}``."""
  kind = spec.get('type')
  if kind == 'array':
    return {prefix: spec['name']}
  if kind == 'qarray':
    return {prefix: {f: ref['name'] for f, ref in spec['fields'].items()}}
  out: dict[str, Any] = {}
  if kind in ('dict', 'frozendict'):
    for key, value in zip(spec['keys'], spec['values']):
      out.update(_names(value, f'{prefix}/{key}' if prefix else str(key)))
  elif kind in ('list', 'tuple'):
    for i, value in enumerate(spec['values']):
      out.update(_names(value, f'{prefix}/{i}' if prefix else str(i)))
  return out


def _placeholder(
  leaf: Leaf, bits: int, kind: int, alpha: np.ndarray, blocks: Blocks, grid: Grid
) -> QArray:
  """The leaf's QArray with shapes for arrays (its exponents for real)."""
  sds = jax.ShapeDtypeStruct
  layers = leaf.layers
  k, n = blocks.k, blocks.n
  scale_dtype = SCALE_DTYPES[kind]
  uint8 = kind == UINT8
  fields: dict[str, Any] = {
    'codes': sds((*layers, packing.packed_rows(k, bits), n), packing.packed_dtype(bits)),
    'scale': sds((*layers, blocks.nk, blocks.ncol), scale_dtype),
    'column_scale': sds((*layers, 1, blocks.ncol), np.float32) if uint8 else None,
    'alpha': np.asarray(alpha, np.float32).reshape(layers),
    'table': sds((*layers, num_levels(bits, grid)), np.float32),
  }
  return QArray(
    **fields,
    bits=bits,
    shape=leaf.shape,
    dtype=np.dtype(leaf.value.dtype),
    layer_axes=leaf.layer_axes,
    transposed=leaf.transposed,
  )


# --- the public function ------------------------------------------------------------


def quantize_checkpoint(
  src: str | os.PathLike,
  dst: str | os.PathLike,
  bits: int | tuple[int, int] | None = None,
  *,
  layout: inputs.Layout = 'auto',
  shard_bytes: int = SHARD_BYTES,
  working_set: int = WORKING_SET,
  overwrite: bool = False,
  **options: Any,
) -> Summary:
  """Quantizes a checkpoint on disk into a new one, never holding the model in memory.

  Args:
    src: a safetensors file, a folder of safetensors shards (with or without
      ``model.safetensors.index.json``), a Hugging Face model folder, or an Orbax
      float checkpoint (saved by Orbax, or by :func:`pqjax.save`), read through
      TensorStore a block at a time (an unsharded Orbax array is one chunk,
      which TensorStore decodes whole).
    dst: ``*.safetensors`` writes one file; anything else a folder of shards with
      an index, loadable by :func:`pqjax.load`. It appears only once complete.
    bits: as :func:`pqjax.quantize`.
    layout: ``"auto"``: a folder with ``config.json`` becomes the parameter tree of
      its transformers Flax class (names, kernels transposed from PyTorch's
      weights), so one scale serves each output feature; ``"none"``: names and
      layouts as stored, output features last; ``"torch"``: names and layouts as
      stored, each 2-D tensor's output features first (PyTorch's ``(out, in)``
      Linear and Embedding weights), as transposed QArrays that products
      contracting their last axis (``x @ W.T``) read as they read a Flax kernel.
      ``output_axis`` among ``options`` overrides the layout's choice.
    shard_bytes: the most bytes an output shard holds.
    working_set: bytes of weights the passes hold at once (a leaf read whole is
      counted as float32 with its temporaries, 16 bytes a weight); larger leaves
      are read a tile at a time for statistics and a few columns at a time for
      codes.
    overwrite: replace ``dst`` if it is a file or a pqjax checkpoint.
    **options: every option of :func:`pqjax.quantize`.

  Returns:
    The :class:`Summary` of the quantized checkpoint.

  Raises:
    CheckpointError: the source is missing, truncated or corrupt (naming the file
      and tensor), or cannot be converted to its Flax layout.
    ValueError, TypeError: as :func:`pqjax.quantize`.
  """
  dst = Path(dst)
  if _inside(Path(src), dst):
    raise ValueError(f'{dst}: writing there would replace the input {src}')
  with inputs.open_source(src, layout) as source:
    opts = QuantizeOptions(bits=bits, **{'output_axis': source.output_axis, **options})
    flat = [(_key_path(t.path), t) for t in source]
    groups = quantize.group(quantize.select(flat, opts), opts)
    reader = _Reader(source, working_set)
    selected = {leaf.path for g in groups for leaf in g.leaves}
    total = sum(t.nbytes for t in source) + sum(
      leaf.value.nbytes for g in groups for leaf in g.leaves
    )
    bar = _bar(total, opts.progress)
    del total
    with jax.enable_x64(False):
      group_stats = statistics(groups, reader, opts.search_config.bins, bar)
      storage = start = None
      if opts.bits_per_weight is not None:
        groups, group_stats, storage, *points = choose_widths(groups, group_stats, opts)
        start = (points[0], points[1])
      alphas, clips = quantize.search(
        _with_small_values(groups, reader, opts), group_stats, opts, start
      )
      plan = _plan(groups, group_stats, alphas, clips, storage, opts)
    tree = _nest(
      [t.path for t in source],
      [
        plan[t.path].placeholder
        if t.path in selected
        else jax.ShapeDtypeStruct(t.shape, t.dtype)
        for t in source
      ],
    )
    spec, placeholders = treespec.flatten(tree)
    meta = treespec.metadata_fields(json.dumps(spec, separators=(',', ':')))
    names = _names(spec)
    lost: list[str] = []

    def write(tmp: Path) -> None:
      writer = Writer(
        tmp, {n: (x.shape, x.dtype) for n, x in placeholders.items()}, meta, shard_bytes
      )
      try:
        with jax.enable_x64(False):
          for t in source:
            if t.path in selected:
              _write_leaf(writer, reader, t.path, plan[t.path], names[t.path], lost)
              _trim_heap()
            elif names.get(t.path) is not None:
              _copy(writer, source, t, names[t.path])
            bar(t.nbytes)
        writer.finish()
      except BaseException:
        writer.abort()
        raise
      if tmp.is_dir() and Path(src).is_dir():
        _copy_companions(Path(src), tmp)

    atomic.atomic_write(dst, write, overwrite, _is_checkpoint)
  if lost:
    warnings.warn(
      "pqjax.quantize_checkpoint: blocks of weights all below float32's smallest"
      ' normal number (1.2e-38), which XLA treats as zero, decode to zeros: '
      + ', '.join(lost),
      stacklevel=2,
    )
  return summary(tree)


# Weights in other formats are not copied next to the quantized ones.
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pt', '.pth', '.h5', '.msgpack', '.gguf')


def _copy_companions(src: Path, dst: Path) -> None:
  """The files a model folder holds besides its weights (``config.json``, the
  tokenizer's, ``generation_config.json``), so the output loads as the input does."""
  import shutil

  for file in src.iterdir():
    if (
      file.is_file()
      and file.name != sources.INDEX
      and not file.name.endswith(_WEIGHT_SUFFIXES)
      and not (dst / file.name).exists()
    ):
      shutil.copy2(file, dst / file.name)


def _is_checkpoint(path: Path) -> bool:
  return (path / sources.INDEX).exists() or orbax.is_checkpoint(path)


def _bar(total: int, progress: bool | None) -> Callable[[int], None]:
  """A progress bar in bytes (tqdm on stderr), as an ``advance(nbytes)`` function."""
  if progress is None:
    import sys

    progress = total >= (1 << 30) and sys.stderr.isatty()
  if not progress:
    return lambda nbytes: None
  from tqdm.auto import tqdm

  bar = tqdm(total=total, desc='pqjax.quantize_checkpoint', unit='B', unit_scale=True)
  return bar.update


def _with_small_values(
  groups: Sequence[Group], reader: _Reader, options: QuantizeOptions
) -> list[Group]:
  """Groups whose layers the search refines exactly, with their values read."""
  from pqjax._src.search import fit

  config = options.search_config
  total = sum(g.weights for g in groups)
  shared = options.exponent == 'global' and fit.needs_refine(total, config)
  out = []
  for g in groups:
    if shared or fit.needs_refine(g.blocks.k * g.blocks.n, config):
      leaves = tuple(leaf._replace(value=reader.whole(leaf.value)) for leaf in g.leaves)
      g = dataclasses.replace(g, leaves=leaves)
    out.append(g)
  return out


@dataclasses.dataclass(frozen=True)
class _Planned:
  """A leaf's place in the output and what encoding it needs."""

  placeholder: QArray
  leaf: Leaf
  group: Group
  absmax: jax.Array
  alpha: jax.Array
  clip: jax.Array
  kinds: np.ndarray
  options: QuantizeOptions


def _plan(
  groups: Sequence[Group],
  group_stats: Sequence[GroupStats],
  alphas: jax.Array,
  clips: jax.Array,
  storage: Sequence[np.ndarray] | None,
  options: QuantizeOptions,
) -> dict[str, _Planned]:
  """Each selected leaf's exponents, clip ratios, scale storage and output shapes."""
  out = {}
  offset = 0
  for i, (g, s) in enumerate(zip(groups, group_stats)):
    n = g.layer_count
    a, c = alphas[offset : offset + n], clips[offset : offset + n]
    kinds = scale_storage(g, s, c, c, options) if storage is None else storage[i]
    first = 0
    for leaf in g.leaves:
      span = slice(first, first + leaf.layer_count)
      kind = int(kinds[first]) if leaf.layer_count else FLOAT32
      alpha = np.asarray(a[span], np.float32).reshape(leaf.layers)
      out[leaf.path] = _Planned(
        _placeholder(leaf, g.bits, kind, alpha, g.blocks, options.grid),
        leaf,
        g,
        s.absmax[span],
        a[span],
        c[span],
        np.asarray(kinds[span]),
        options,
      )
      first += leaf.layer_count
    offset += n
  return out


def _write_leaf(
  writer: Writer,
  reader: _Reader,
  path: str,
  planned: _Planned,
  names: dict[str, str],
  lost: list[str],
) -> None:
  leaf, g = planned.leaf, planned.group

  def emit(codes: np.ndarray, row: int, col: int) -> None:
    writer.write_columns(names['codes'], codes, row, col)

  arrays = _leaf_arrays(reader, planned, emit)
  streamed = arrays[0] is None
  if streamed:
    arrays = (planned.placeholder.codes, *arrays[1:])
  kind = int(planned.kinds[0]) if leaf.layer_count else FLOAT32
  q = quantize.leaf_qarray(
    leaf, g.bits, arrays, kind, np.asarray(planned.placeholder.alpha), planned.options
  )
  for field, name in names.items():
    if name is not None and not (streamed and field == 'codes'):
      writer.write(name, np.asarray(getattr(q, field)))
  count = _lost_blocks(np.asarray(planned.absmax), arrays[1])
  if count:
    lost.append(f'{path} ({count} of {np.asarray(arrays[1]).size} blocks)')


# Bytes of a block of rows copied at once from a leaf that is not quantized.
COPY_BYTES = 64 << 20


def _copy(writer: Writer, source: sources.Source, t: sources.Tensor, name: str) -> None:
  """A tensor that is not quantized, copied to the output a block of rows at a time."""
  if t.ndim < 2 or t.nbytes <= COPY_BYTES:
    writer.write(name, source.read(t))
    return
  n = t.shape[-1]
  row_bytes = n * t.dtype.itemsize
  rows = math.prod(t.shape[:-1])
  step = max(1, COPY_BYTES // row_bytes)
  for r0 in range(0, rows, step):
    r1 = min(rows, r0 + step)
    writer.write(name, source.read(t, slice(r0, r1)), start=r0 * row_bytes)
