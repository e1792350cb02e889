"""Writing a checkpoint tensor by tensor: its whole layout is planned first.

Every tensor's name, shape and dtype is known before any is computed (the tree's
metadata describes them), so the files are laid out up front and each tensor is
written at its place as it comes. Output is one safetensors file, or a folder of
shards (``model-00001-of-00003.safetensors``...) with ``model.safetensors.index.json``,
each shard at most ``shard_bytes`` (a larger tensor has a shard of its own). The
pqjax metadata (format, version, tree, SHA-256) sits in the file's header or in the
index's ``metadata``; its checksum is that of :func:`treespec.checksum`, computed
when every tensor is written by reading them back in name order.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pqjax._src.io import sources
from pqjax._src.io.treespec import checksum

SHA_PLACEHOLDER = '0' * 64


def _header(
  entries: list[tuple[str, tuple[int, ...], np.dtype]], meta: dict[str, str]
) -> tuple[bytes, dict[str, int]]:
  """A safetensors header for tensors in this order, and each one's data offset."""
  head: dict[str, Any] = {'__metadata__': dict(sorted(meta.items()))}
  offsets, offset = {}, 0
  for name, shape, dtype in entries:
    nbytes = math.prod(shape) * dtype.itemsize
    kind = sources.DTYPE_NAMES.get(dtype)
    if kind is None:
      raise TypeError(f'{name}: arrays of dtype {dtype} cannot be saved in safetensors')
    head[name] = {
      'dtype': kind,
      'shape': list(shape),
      'data_offsets': [offset, offset + nbytes],
    }
    offsets[name] = offset
    offset += nbytes
  text = json.dumps(head, separators=(',', ':')).encode()
  text += b' ' * (-len(text) % 8)
  start = 8 + len(text)
  head_bytes = len(text).to_bytes(8, 'little') + text
  return head_bytes, {k: start + v for k, v in offsets.items()}


class Writer:
  """Lays out a checkpoint at ``path`` (a file, or a folder of shards) and writes it.

  Args:
    path: ``*.safetensors`` for one file; anything else is a folder of shards.
    tensors: every tensor's ``(shape, dtype)`` by name.
    meta: the pqjax metadata, less its checksum.
    shard_bytes: the most data a shard holds (one larger tensor excepted).
  """

  def __init__(
    self,
    path: Path,
    tensors: dict[str, tuple[tuple[int, ...], np.dtype]],
    meta: dict[str, str],
    shard_bytes: int = 2 << 30,
  ):
    self.path = path
    self.meta = meta
    # Largest items first, then by name: each tensor starts at a multiple of its
    # item size, as safetensors readers expect.
    order = sorted(tensors, key=lambda n: (-np.dtype(tensors[n][1]).itemsize, n))
    entries = [(n, tuple(tensors[n][0]), np.dtype(tensors[n][1])) for n in order]
    self.single = path.suffix == '.safetensors'
    if self.single:
      shards = [entries]
    else:
      shards, size = [[]], 0
      for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
          shards.append([])
          size = 0
        shards[-1].append(entry)
        size += nbytes
    self.slots: dict[str, sources.Stored] = {}
    self.files: list[Path] = []
    self._sha_at = 0
    for i, shard in enumerate(shards):
      if self.single:
        file = path
        head, offsets = _header(shard, {**meta, 'sha256': SHA_PLACEHOLDER})
        self._sha_at = head.index(SHA_PLACEHOLDER.encode())
      else:
        path.mkdir(parents=True, exist_ok=True)
        file = path / f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        head, offsets = _header(shard, {'pqjax_shard': f'{i + 1} of {len(shards)}'})
      end = len(head) + sum(math.prod(s) * d.itemsize for _, s, d in shard)
      with open(file, 'wb') as f:
        f.write(head)
        f.truncate(end)
      self.files.append(file)
      for name, shape, dtype in shard:
        self.slots[name] = sources.Stored(file, name, shape, dtype, offsets[name])
    self._fds = {f: os.open(f, os.O_RDWR) for f in self.files}

  def write(self, name: str, x: npt.ArrayLike, start: int = 0) -> None:
    """Writes ``x``'s bytes into tensor ``name`` from byte ``start`` of its data."""
    slot = self.slots[name]
    data = np.ascontiguousarray(np.asarray(x, dtype=slot.dtype))
    if sys.byteorder == 'big':  # safetensors is little-endian
      data = data.byteswap()
    raw = data.reshape(-1).view(np.uint8)
    if start + raw.size > slot.nbytes:
      raise ValueError(f'{name}: {raw.size} bytes at {start} overflow its {slot.nbytes}')
    done = 0
    while done < raw.size:
      done += os.pwrite(self._fds[slot.file], raw[done:].data, slot.offset + start + done)

  def write_columns(self, name: str, x: np.ndarray, row: int, col: int) -> None:
    """Writes the 2-D ``x`` at ``[row:, col:]`` of tensor ``name`` seen as a matrix
    (its last axis by the others), a block of rows at a time through a map of the
    file whose pages are handed back after each block (they stay in the page cache
    until written out), so a tensor written by columns is never all resident."""
    slot = self.slots[name]
    n = slot.shape[-1]
    if x.shape[1] == n:
      self.write(name, x, start=row * n * slot.dtype.itemsize)
      return
    assert sys.byteorder == 'little', 'column writes assume a little-endian host'
    fd = self._fds[slot.file]
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE)
    try:
      view = np.frombuffer(m, slot.dtype, slot.nbytes // slot.dtype.itemsize, slot.offset)
      matrix = view.reshape(-1, n)
      step = max(1, (32 << 20) // (n * slot.dtype.itemsize))
      for r0 in range(0, x.shape[0], step):
        r1 = min(x.shape[0], r0 + step)
        matrix[row + r0 : row + r1, col : col + x.shape[1]] = x[r0:r1]
        start = (slot.offset + (row + r0) * n * slot.dtype.itemsize) // mmap.PAGESIZE
        end = slot.offset + (row + r1) * n * slot.dtype.itemsize
        m.madvise(mmap.MADV_DONTNEED, start * mmap.PAGESIZE, end - start * mmap.PAGESIZE)
      del view, matrix
    finally:
      m.close()

  def finish(self) -> str:
    """Computes the checksum, writes it and the index; returns the checksum."""
    for fd in self._fds.values():
      os.fsync(fd)
    digest = self._checksum()
    if self.single:
      os.pwrite(self._fds[self.path], digest.encode(), self._sha_at)
    else:
      index = {
        'metadata': {**self.meta, 'sha256': digest, 'total_size': self.total},
        'weight_map': {name: s.file.name for name, s in sorted(self.slots.items())},
      }
      (self.path / sources.INDEX).write_text(json.dumps(index, indent=1) + '\n')
    for fd in self._fds.values():
      os.fsync(fd)
      os.close(fd)
    self._fds = {}
    return digest

  @property
  def total(self) -> int:
    return sum(s.nbytes for s in self.slots.values())

  def _checksum(self) -> str:
    """:func:`treespec.checksum` of what was written, read back through memory maps
    whose pages are handed back a block at a time."""
    fields = {k: v for k, v in self.meta.items() if k != 'sha256'}
    with sources.Source(
      sources.flat_tensors(self.slots, sep=None), str(self.path)
    ) as src:
      views = {name: src.view(s) for name, s in self.slots.items()}
      try:
        return checksum(
          fields, views, lambda name, lo, hi: src.release(self.slots[name], lo, hi)
        )
      finally:
        del views  # the maps close once nothing views them

  def abort(self) -> None:
    for fd in self._fds.values():
      os.close(fd)
    self._fds = {}
