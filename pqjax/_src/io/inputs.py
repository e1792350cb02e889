"""Opening a float checkpoint for streaming, in a layout.

A safetensors file, a folder of shards, a Hugging Face model folder (in its Flax
model's layout, :mod:`hf_layout`) or an Orbax folder, as a :class:`sources.Source`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pqjax._src.io import hf_layout, sources
from pqjax._src.io.treespec import CheckpointError

# How a source's tensors are named and laid out: "auto" converts a Hugging Face
# folder to its Flax model's tree; "none" keeps names and layouts, output features
# last; "torch" keeps them with every 2-D tensor's output features first, as
# PyTorch stores Linear and Embedding weights.
Layout = Literal['auto', 'none', 'torch']
LAYOUTS: tuple[Layout, ...] = ('auto', 'none', 'torch')


def open_source(path: os.PathLike | str, layout: Layout = 'auto') -> sources.Source:
  """A :class:`sources.Source` for a safetensors file, a folder of shards, a Hugging
  Face model folder or an Orbax folder, in ``layout`` (see :data:`Layout`)."""
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  source = _open(Path(path), layout)
  if layout == 'torch':
    source.output_first = frozenset(t.path for t in source if t.ndim == 2)
  return source


def _open(path: Path, layout: Layout) -> sources.Source:
  if not path.exists():
    raise CheckpointError(f'{path}: no such file or directory')
  if path.is_dir() and sources.is_orbax(path):
    return sources.open_orbax(path)
  if path.is_dir():
    stored, _ = sources.shard_files(path)
    description = f'{path} ({len(stored)} tensors)'
    if layout == 'auto' and (path / 'config.json').exists():
      tensors = hf_layout.flax_tensors(path, stored)
      return sources.Source(tensors, description, hf_layout.output_first(path, tensors))
  else:
    stored, meta = sources.header(path)
    description = f'{path} ({len(stored)} tensors)'
    if meta.get('format') == 'pqjax':
      # A pqjax checkpoint names its tensors by their paths.
      sources.refuse_quantized(meta, path)
      return sources.Source(sources.flat_tensors(stored, sep='/'), description)
  return sources.Source(sources.flat_tensors(stored), description)
