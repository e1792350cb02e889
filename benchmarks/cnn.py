"""Weights and activations (W/A): a small ResNet on digits, and MiniLM embeddings.

A ResNet-style Flax Linen CNN with BatchNorm is trained with optax on scikit-learn's
8x8 digits (seeded; a held-out test split), then its test accuracy is measured in float
and with pqjax.wrap(..., act_bits=b) at W8A8, W6A6, W4A4, W4A8 and W4 (weights only),
for uniform quantization (weights with exponent 1, activations with exponent 1) and
for pqjax (searched weight exponents; each activation with its layer's exponent).
Weights are per channel; activation scales are the absolute maximum of each product's
input at run time, one per image (the test set runs through jax.vmap, so a tensor is
one image's activation). No calibration data anywhere. Also: MiniLM sentence embedding
cosine against fp32 at W8A8 and W4A8 on real sentences. Run:

    python benchmarks/cnn.py

Prints a table and writes benchmarks/results/activations.md.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pqjax
from pqjax import minilm
from pqjax.tools import corpus

SEED = 0
EPOCHS = 20
BATCH = 64
SENTENCES = 512
# (label, weight bits, activation bits or None, activation scale granularity)
SETTINGS = (('W8A8', 8, 8, 'tensor'), ('W6A6', 6, 6, 'tensor'), ('W4A8', 4, 8, 'tensor'),
            ('W4A4', 4, 4, 'tensor'), ('W4', 4, None, 'tensor'),
            ('W4A4, a scale per pixel', 4, 4, 'token'))
# (name, quantize options, activation exponent): uniform is plain round-to-nearest
# (the paper's grid at exponent 1, absmax scales); pqjax is the defaults, its
# activations take each layer's exponent.
METHODS = (('uniform', {'exponent': 1.0, 'grid': 'symmetric', 'clip': False}, 1.0),
           ('pqjax', {}, None))


class Block(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a skip (projected when the shape changes)."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False)(x)
    y = nn.relu(norm()(y))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    if x.shape != y.shape:
      x = norm()(nn.Conv(self.features, (1, 1), (self.stride, self.stride),
                         use_bias=False)(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Stem, three residual blocks (the last one strided), global pooling, Dense."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(32, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = Block(32)(x, train)
    x = Block(32)(x, train)
    x = Block(64, stride=2)(x, train)
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Digits:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def digits() -> Digits:
  """8x8 grey digits scaled to [0, 1]; a stratified, seeded 75/25 split."""
  data = load_digits()
  x = (data.images / 16.0).astype(np.float32)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      x, data.target, test_size=0.25, random_state=SEED, stratify=data.target)
  return Digits(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def train(data: Digits) -> tuple[dict[str, Any], float]:
  """Adam with a cosine schedule; returns the variables and the training seconds."""
  model = ResNet()
  variables = model.init(jax.random.key(SEED), data.x_train[:1])
  steps = EPOCHS * (len(data.x_train) // BATCH)
  tx = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
  opt_state = tx.init(variables['params'])

  @jax.jit
  def step(variables, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(variables['params'])
    upd, opt_state = tx.update(grads, opt_state, variables['params'])
    params = optax.apply_updates(variables['params'], upd)
    return {'params': params, **updates}, opt_state

  rng = np.random.default_rng(SEED)
  start = time.perf_counter()
  for _ in range(EPOCHS):
    order = rng.permutation(len(data.x_train))
    for i in range(0, len(order) - BATCH + 1, BATCH):
      idx = order[i:i + BATCH]
      variables, opt_state = step(variables, opt_state, data.x_train[idx],
                                  data.y_train[idx])
  jax.block_until_ready(variables)
  return variables, time.perf_counter() - start


def logits(apply_fn: Callable[..., jax.Array], variables: Any, data: Digits
           ) -> np.ndarray:
  """Test-set logits, each image run on its own (so activation scales are per image)."""
  one = lambda x: apply_fn(variables, x[None])[0]
  return np.asarray(jax.jit(jax.vmap(one))(data.x_test))


def cnn_rows(variables: Any, data: Digits) -> tuple[float, list[list[str]]]:
  """Float accuracy, and one row per W/A setting: accuracy and logit error by method."""
  model = ResNet()
  reference = logits(model.apply, variables, data)
  accuracy = lambda z: 100.0 * float(np.mean(np.argmax(z, -1) == data.y_test))
  base = accuracy(reference)
  rows = []
  quantized = {}
  for label, wbits, abits, granularity in SETTINGS:
    row = [label]
    for name, options, act_exponent in METHODS:
      if (wbits, name) not in quantized:
        quantized[wbits, name] = pqjax.quantize(variables['params'], wbits,
                                                **options)[0]
      apply_q = pqjax.wrap(model.apply, act_bits=abits, act_exponent=act_exponent,
                           act_granularity=granularity)
      z = logits(apply_q, {**variables, 'params': quantized[wbits, name]}, data)
      acc = accuracy(z)
      error = np.linalg.norm(z - reference) / np.linalg.norm(reference)
      row += [f'{acc:.2f} ({acc - base:+.2f})', f'{error:.4f}']
    rows.append(row)
  return base, rows


def per_sentence(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """``apply_fn`` run on each sentence of the batch alone, through jax.vmap."""

  def apply(variables, ids, mask, types_):
    one = lambda i, m, t: apply_fn(variables, i[None], m[None], t[None]
                                   ).last_hidden_state[0]
    return types.SimpleNamespace(last_hidden_state=jax.vmap(one)(ids, mask, types_))

  return apply


# (weight bits, method, activations, wrap options, one scale per sentence)
A8 = {'act_bits': 8}
MINILM = (
    (8, 'pqjax', 'none (weights only)', {}, False),
    (8, 'uniform', 'A8, a scale per sentence', {**A8, 'act_exponent': 1.0}, True),
    (8, 'pqjax', 'A8, a scale per sentence', A8, True),
    (8, 'pqjax', 'A8, a scale per sentence, exponent 0.5', {**A8, 'act_exponent': 0.5},
     True),
    (8, 'pqjax', 'A8, a scale per batch of 64', A8, False),
    (8, 'pqjax', 'A8, a scale per token', {**A8, 'act_granularity': 'token'}, False),
    (4, 'pqjax', 'none (weights only)', {}, False),
    (4, 'uniform', 'A8, a scale per sentence', {**A8, 'act_exponent': 1.0}, True),
    (4, 'pqjax', 'A8, a scale per sentence', A8, True),
    (4, 'pqjax', 'A8, a scale per token', {**A8, 'act_granularity': 'token'}, False),
)


def minilm_rows() -> list[list[str]]:
  """Embedding cosine against fp32, mean and min, for each W/A setting."""
  model = minilm.load()
  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(SENTENCES))
  reference = minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)
  options = {method: kwargs for method, kwargs, _ in METHODS}
  quantized = {}
  rows = []
  for wbits, method, label, wrap_options, sentence_scale in MINILM:
    if (wbits, method) not in quantized:
      quantized[wbits, method] = pqjax.quantize(model.params, wbits,
                                                **options[method])[0]
    apply_fn = pqjax.wrap(model.module.apply, **wrap_options)
    if sentence_scale:
      apply_fn = per_sentence(apply_fn)
    cos = minilm.cosines(reference, minilm.embed_all(
        minilm.embed_fn(apply_fn), quantized[wbits, method], text))
    rows.append([f'W{wbits}', method, label, f'{cos.mean():.5f}', f'{cos.min():.5f}'])
  return rows


def main() -> None:
  data = digits()
  variables, seconds = train(data)
  base, cnn = cnn_rows(variables, data)
  lm = minilm_rows()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))
  machine = (f'{platform.platform()}, {os.cpu_count()} CPUs, Python'
             f' {platform.python_version()}, jax {jax.__version__},'
             f' {jax.default_backend().upper()} backend')
  lines = [
      '# Weights and activations (W/A): ResNet on digits, MiniLM embeddings', '',
      f'Machine: {machine}.', '',
      'Activation quantization is simulated: each product runs in floating point on the'
      ' decoded weights and the decoded (power-quantized) activations, which gives the'
      ' outputs of an integer pipeline on power-domain codes. Weights: per channel, all'
      ' kernels (convolutions and Dense). Activations: the input of every convolution'
      ' and Dense, the image included, with the absolute maximum of that input at run'
      ' time as the scale (data-free). uniform: weights quantized with exponent 1,'
      ' activations with exponent 1. pqjax: searched weight exponent per layer, each'
      ' activation with its layer\'s exponent.', '',
      f'ResNet: stem conv 32, residual blocks 32, 32, 64 (stride 2), BatchNorm, global'
      f' pooling, Dense 10; {n_params} parameters. Data: `sklearn.datasets.load_digits`,'
      f' {len(data.x_train)} training and {len(data.x_test)} held-out test images'
      f' (stratified split, seed {SEED}). Training: AdamW, cosine schedule from 3e-3,'
      f' {EPOCHS} epochs of batch {BATCH}, {seconds:.1f} s. Activation scales: one per'
      ' image (the test set runs through `jax.vmap`).', '',
      f'Float test accuracy: **{base:.2f}%**.', '',
      'logit error: ||z_q - z|| / ||z|| of the test-set logits against the float model.'
      f' One test image is {100 / len(data.x_test):.2f} points of accuracy.', '',
      '| setting | uniform accuracy % | uniform logit error | pqjax accuracy % |'
      ' pqjax logit error |', '|---|---|---|---|---|']
  lines += [f'| {" | ".join(r)} |' for r in cnn]
  lines += [
      '', f'MiniLM (all-MiniLM-L6-v2, FlaxBertModel): cosine similarity of mean-pooled'
      f' sentence embeddings against fp32 on {SENTENCES} standard-library docstring'
      ' paragraphs, batches of 64 padded to 32, 64 or 128 tokens. Weights per channel,'
      ' every >= 2-D leaf; activations: the inputs of the 37 Dense layers (embedding'
      ' lookups are gathers, not products). Activation scales: per sentence (each'
      ' sentence run alone through `jax.vmap`), per batch, or per token.', '',
      '| weights | method | activations | mean cosine | min cosine |',
      '|---|---|---|---|---|']
  lines += [f'| {" | ".join(r)} |' for r in lm]
  publish('activations', lines)


if __name__ == '__main__':
  main()
