"""Hugging Face model folders as the parameter tree of their Flax model class.

A folder with ``config.json`` holds PyTorch names and layouts (a Linear weight is
``(out_features, in_features)``). Each tensor is renamed and its axes permuted by
transformers' own PyTorch-to-Flax rules (``rename_key_and_reshape_tensor``), applied
to the tensor's axes alone, so nothing is read; the Flax model's parameter shapes
come from its ``params_shape_tree`` (no weights are made). Needs ``transformers``
(the ``demo`` extra).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pqjax._src.io.sources import FLOAT_DTYPES, Stored, Tensor
from pqjax._src.io.treespec import CheckpointError

if TYPE_CHECKING:
  from transformers import PretrainedConfig


class _Axes:
  """Stands for a tensor in transformers' rules: records transposes, holds no data."""

  def __init__(self, shape: tuple[int, ...], perm: tuple[int, ...] | None = None):
    self.stored = shape
    self.perm = perm or tuple(range(len(shape)))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.stored[i] for i in self.perm)

  @property
  def ndim(self) -> int:
    return len(self.stored)

  @property
  def T(self) -> _Axes:  # noqa: N802 (NumPy's name)
    return _Axes(self.stored, self.perm[::-1])

  def transpose(self, *axes: int) -> _Axes:
    return _Axes(self.stored, tuple(self.perm[a] for a in axes))


def flax_class(folder: Path) -> tuple[type, PretrainedConfig]:
  """The transformers Flax class of a model folder's ``config.json``, unbuilt, and
  its configuration."""
  try:
    import transformers
  except ImportError:
    raise CheckpointError(
      f'{folder}: converting a Hugging Face folder to its Flax layout needs'
      ' transformers (pip install "pqjax[demo]"), or keep its own layout'
    ) from None
  config = json.loads((folder / 'config.json').read_text())
  names = config.get('architectures') or []
  for name in names:
    cls = getattr(transformers, f'Flax{name}', None)
    if cls is not None:
      return cls, transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
  raise CheckpointError(
    f'{folder}: transformers has no Flax class for {names or "this model"}'
    f' (model_type {config.get("model_type")!r}); quantize it in its own layout'
    ' (layout="none" or "torch", --layout none or torch)'
  )


def _tie_head(out: dict[tuple[str, ...], Tensor], expected: dict[tuple, Any]) -> None:
  """A tied model's output kernel, where its Flax class has one of its own (Llama's
  does not tie) and the checkpoint stores only the embedding: the embedding
  transposed, read from the same bytes."""
  for key in expected:
    if key in out or key[-1] != 'kernel' or len(expected[key].shape) != 2:
      continue
    want = tuple(expected[key].shape)
    for other, t in out.items():
      if other[-1] == 'embedding' and t.shape[::-1] == want and t.perm is None:
        out[key] = Tensor('/'.join(key), t.stored, (1, 0))
        break


# Flax modules whose kernel is (out_features, in_features), by model_type: GPT-2's
# Conv1D, which contracts its kernel's last axis. transformers' rules transpose its
# (in, out) PyTorch weight into that layout; the kernel is quantized with one scale
# per output feature, its first axis (a transposed QArray).
OUTPUT_FIRST_MODULES = {'gpt2': frozenset({'c_attn', 'c_proj', 'c_fc'})}


def output_first(folder: Path, tensors: dict[str, Tensor]) -> frozenset[str]:
  """Paths of the Flax kernels of a folder's model whose first axis is the output."""
  model_type = json.loads((folder / 'config.json').read_text()).get('model_type')
  modules = OUTPUT_FIRST_MODULES.get(model_type, frozenset())
  return frozenset(
    path
    for path, t in tensors.items()
    if t.ndim == 2 and path.endswith('/kernel') and path.split('/')[-2] in modules
  )


def flax_tensors(folder: Path, stored: dict[str, Stored]) -> dict[str, Tensor]:
  """The tensors of a Hugging Face folder by their path in the Flax model's params."""
  from flax.traverse_util import flatten_dict
  from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor

  cls, config = flax_class(folder)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    model = cls(config, _do_init=False)
  prefix = model.base_model_prefix
  expected = flatten_dict(model.params_shape_tree)
  tops = {name.split('.')[0] for name in stored}
  head_into_base = prefix not in {k[0] for k in expected} and prefix in tops
  base_into_head = prefix in {k[0] for k in expected} and prefix not in tops
  out: dict[tuple[str, ...], Tensor] = {}
  unused = []
  for name in sorted(stored):
    key = tuple(name.split('.'))
    if head_into_base and key[0] == prefix:
      key = key[1:]
    # transformers types the tensor as an array; the rules only permute its axes.
    rule: Any = rename_key_and_reshape_tensor
    key, axes = rule(key, _Axes(stored[name].shape), expected, prefix)
    if base_into_head and (prefix, *key) in expected:
      key = (prefix, *key)
    if key not in expected:
      # Integer buffers (BERT's position_ids) are not parameters: no warning.
      if stored[name].dtype in FLOAT_DTYPES:
        unused.append(name)
      continue
    want = tuple(expected[key].shape)
    if axes.shape != want:
      raise CheckpointError(
        f'{stored[name].file}: tensor {name!r} of shape {stored[name].shape} does not'
        f' fit {cls.__name__}, which expects {want} at {"/".join(key)}'
      )
    perm = None if axes.perm == tuple(range(axes.ndim)) else axes.perm
    path = '/'.join(key)
    out[key] = Tensor(path, stored[name], perm)
  if getattr(config, 'tie_word_embeddings', False):
    _tie_head(out, expected)
  missing = sorted('/'.join(k) for k in expected if k not in out)
  if missing:
    raise CheckpointError(
      f'{folder}: {cls.__name__} needs {len(missing)} parameters the checkpoint does'
      f' not hold: {missing[:5]}'
    )
  if unused:
    warnings.warn(
      f'{folder}: {len(unused)} tensors have no place in {cls.__name__} and are'
      f' left out: {unused[:5]}',
      stacklevel=3,
    )
  # In the order of the Flax model's parameters.
  return {'/'.join(k): out[k] for k in expected}
