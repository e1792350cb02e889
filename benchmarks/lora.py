"""QLoRA on MiniLM: adapters on a quantized base, trained with optax, measured.

For each base of ``--bases`` (3 bits per channel; ``bits_per_weight=3.0``; that
budget with block clipping; 4 bits on the kernels alone, as qwix quantizes), rank
and start (Gaussian; the SVD of the quantization error), trains the adapters of
every kernel toward the float model as ``examples/qlora_minilm.py`` does (batch 16,
Adam at 1e-3, the first 512 sentences of ``stdlib_sentences(1024)``; the recipe of
``--loss``, ``--hidden-weight``, ``--schedule`` and ``--alpha``) and reports the
held-out (the other 512) mean and minimum cosine with the float embeddings before,
every 100 steps and after folding: at each leaf's width, and under a budget of the
bits the adapted kernels store, adapters counted (``qlora_minilm.stored_bits``), so
that the folded tree stores as many bits as the adapted one. qwix's QLoRA
(``qwix.LoraProvider``, an nf4 base per channel, adapters on every Dense) is trained
the same way, on the same data and recipe, at each rank. Then, side by side in one
process, one training step of rank-8 adapters on the packed base, a float LoRA step
of the same rank (fp32 base, ``W + a @ b * scale`` in every Dense) and qwix's nf4
QLoRA step: args + temp of the compiled step (``memory_analysis()``) and its time,
at batch 2 and 16 of 64 tokens. Run:

    python benchmarks/lora.py [--steps 300] [--ranks 4,8,16] [--inits residual]
      [--bases "3 bits,bits_per_weight=3.0"] [--loss layers] [--hidden-weight 1]
      [--schedule constant] [--alpha 8] [--qwix-ranks 8]

Prints a table and writes benchmarks/results/lora.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import publish
from flax import traverse_util

import pqjax
from pqjax.tools import minilm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'examples'))
import qlora_minilm  # noqa: E402

# Training recipes measured once (3-bit base, rank 8, residual start, 300 steps,
# Adam 1e-3, batch 16), held-out mean (min) cosine; "layers" is the default loss.
RECIPES = [
  '| loss | alpha | after |',
  '|---|---|---|',
  '| pooled: 1 - embedding cosine | 8 | 0.9460 (0.8678) |',
  '| pooled | 32 | 0.9433 (0.8519) |',
  '| tokens: pooled + last hidden state MSE / its variance | 8 | 0.9493 (0.8666) |',
  "| layers: pooled + every block's hidden-state MSE / its variance (mean) | 8 |"
  ' 0.9510 (0.8753) |',
]

BASES: dict[str, dict[str, Any]] = {
  '3 bits': dict(bits=3),
  'bits_per_weight=3.0': dict(bits_per_weight=3.0),
  'bits_per_weight=3.0 block clip': dict(bits_per_weight=3.0, clip='block'),
  # The kernels alone, as qwix quantizes them: its nf4 base's bits per weight.
  '4 bits on kernels': dict(bits=4, filter=qlora_minilm.kernels),
}


class Recipe(NamedTuple):
  """How the adapters train (``qlora_minilm.train``'s options), on every base."""

  loss: str = 'layers'
  hidden_weight: float = 1.0
  schedule: str = 'constant'
  alpha: float | None = None


def accuracy_rows(
  task, steps: int, ranks: list[int], inits: list[str], bases: list[str], recipe: Recipe
) -> list[str]:
  rows = []
  # Adapter bits over the weights of every matrix (kernels and embedding tables),
  # as qwix's row counts them.
  weights = sum(x.size for x in jax.tree.leaves(task.model.params) if x.ndim >= 2)
  for base in bases:
    params_q, _ = pqjax.quantize(task.model.params, **BASES[base])
    before = task.cosines(params_q)
    bits = f'{pqjax.summary(params_q).bits_per_weight:.2f}'
    if 'filter' in BASES[base]:
      bits += ' on kernels; embedding tables float'
    for rank in ranks:
      for init in inits:
        params_l = pqjax.lora.init(
          params_q,
          rank,
          key=jax.random.key(0),
          alpha=recipe.alpha,
          init=init,
          params=task.model.params if init == 'residual' else None,
          filter=qlora_minilm.kernels,
        )
        start = task.cosines(params_l)
        during: list[str] = []
        params_l = qlora_minilm.train(
          task,
          params_l,
          steps=steps,
          lr=1e-3,
          loss=recipe.loss,
          hidden_weight=recipe.hidden_weight,
          schedule=recipe.schedule,
          report=lambda i, p, during=during: during.append(
            f'{task.cosines(p).mean():.4f}'
          ),
        )
        after = task.cosines(params_l)
        extra = 8 * pqjax.summary(params_l).adapter_bytes / weights
        folded = task.cosines(pqjax.lora.fold(params_l))
        # As many bits as the adapted tree stores, adapters counted.
        at_stored = pqjax.lora.fold(
          params_l, bits_per_weight=qlora_minilm.stored_bits(params_l)
        )
        same = task.cosines(at_stored)
        reached = pqjax.summary(at_stored).bits_per_weight
        rows.append(
          f'| {base} ({bits}) | {rank} | {init} | {before.mean():.4f} |'
          f' {start.mean():.4f} | {" / ".join(during)} | **{after.mean():.4f}**'
          f' ({after.min():.4f}) | {extra:.3f} (f32) | {folded.mean():.4f} |'
          f' {same.mean():.4f} ({same.min():.4f}) at {reached:.2f} |'
        )
        print(rows[-1], flush=True)
  return rows


def _qwix_model(module, rank: int, alpha: float | None = None):
  import qwix

  provider = qwix.LoraProvider(
    module_path='.*', weight_qtype='nf4', rank=rank, alpha=float(alpha or rank)
  )
  return qwix.quantize_model(module, provider)


def _is_adapter(key: tuple[str, ...]) -> bool:
  return key[-1].endswith(('_lora_a', '_lora_b'))


def qwix_qlora(
  task, rank: int, alpha: float | None = None
) -> tuple[Any, dict, dict, Callable[..., Any]]:
  """qwix's QLoRA of the model: ``(module, adapters, frozen, merge)``: the nf4 base
  from the float params (``qwix.quantize_params``), the adapters as qwix initialises
  them (``a`` He-uniform, ``b`` zeros), both as flat dicts."""
  import qwix

  qmodel = _qwix_model(task.model.module, rank, alpha)
  b = task.train.batches[0]
  inputs = (b['input_ids'], b['attention_mask'], b['token_type_ids'])
  init = jax.jit(qmodel.init)(jax.random.key(0), *inputs)['params']
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), *inputs))['params']
  base = traverse_util.flatten_dict(qwix.quantize_params(task.model.params, abstract))
  adapters = {k: v for k, v in traverse_util.flatten_dict(init).items() if _is_adapter(k)}

  def merge(adapters: dict, frozen: dict) -> Any:
    return traverse_util.unflatten_dict({**frozen, **adapters})

  return qmodel, adapters, base, merge


def _qwix_bits(frozen: dict) -> tuple[float, int]:
  """Bits per weight of the quantized kernels (codes at 4 bits, scales as stored),
  and the weights left float (embedding tables: qwix quantizes products only)."""
  quantized = [v.array for v in frozen.values() if hasattr(v, 'array')]
  n = sum(q.qvalue.size for q in quantized)
  bits = sum(4 * q.qvalue.size + 8 * q.scale.nbytes for q in quantized)
  left = sum(v.size for k, v in frozen.items() if k[-1] == 'embedding')
  return bits / n, left


def qwix_row(task, steps: int, rank: int, recipe: Recipe) -> str:
  """qwix's nf4 QLoRA trained as the pqjax adapters are: same data, recipe, steps."""
  qmodel, adapters, frozen, merge = qwix_qlora(task, rank, recipe.alpha)
  embed = minilm.embed_fn(qmodel.apply)

  def cosines(ad: dict) -> np.ndarray:
    got = minilm.embed_all(embed, merge(ad, frozen), task.held_out)
    return minilm.cosines(got, task.reference)

  def loss_fn(ad, batch, target):
    hidden = qlora_minilm.hidden_states(qmodel.apply, merge(ad, frozen), batch)
    return qlora_minilm.distillation_loss(
      hidden, target, batch, recipe.loss, recipe.hidden_weight
    )

  before = cosines(adapters)
  during: list[str] = []
  adapters = qlora_minilm.fit(
    task,
    adapters,
    loss_fn,
    steps=steps,
    lr=1e-3,
    schedule=recipe.schedule,
    report=lambda i, ad: during.append(f'{cosines(ad).mean():.4f}'),
  )
  after = cosines(adapters)
  bits, left = _qwix_bits(frozen)
  n = sum(q.array.qvalue.size for q in frozen.values() if hasattr(q, 'array'))
  # Over the weights pqjax quantizes (kernels and embedding tables), as its rows.
  extra = 8 * sum(x.nbytes for x in adapters.values()) / (n + left)
  overall = (bits * n + 32 * left) / (n + left)
  row = (
    f'| qwix nf4 per channel ({bits:.2f} on kernels; {left / 1e6:.1f}M embedding'
    f' weights float: {overall:.1f} overall) | {rank} | he_uniform |'
    f' {before.mean():.4f} | {before.mean():.4f} |'
    f' {" / ".join(during)} | **{after.mean():.4f}** ({after.min():.4f}) |'
    f' {extra:.3f} (f32) | - | - |'
  )
  print(row, flush=True)
  return row


def _dense_paths(params) -> list[tuple[str, ...]]:
  flat = traverse_util.flatten_dict(params)
  return [k[:-1] for k in flat if k[-1] == 'kernel']


def step_rows(task, rank: int = 8) -> list[str]:
  """One Adam step of the adapters: packed base, float LoRA and qwix's nf4 QLoRA."""
  model = task.model
  params_q, _ = pqjax.quantize(model.params, bits=3)
  params_l = pqjax.lora.init(
    params_q, rank, key=jax.random.key(0), filter=qlora_minilm.kernels
  )
  adapters, frozen = pqjax.lora.split(params_l)
  opt = optax.adam(1e-3)
  apply_q = pqjax.wrap(model.module.apply)
  kernels = _dense_paths(model.params)
  flat_a = traverse_util.flatten_dict(adapters)
  floats = {k: (flat_a[(*k, 'kernel')].a, flat_a[(*k, 'kernel')].b) for k in kernels}
  scale = flat_a[(*kernels[0], 'kernel')].scale

  def embed(apply_fn, params, batch):
    out = apply_fn(
      {'params': params}, batch['input_ids'], batch['attention_mask'], None
    ).last_hidden_state
    return jnp.mean(out, axis=1)

  def packed_step(adapters, state, batch, target):
    def loss(adapters):
      return jnp.mean(
        (embed(apply_q, pqjax.lora.merge(adapters, frozen), batch) - target) ** 2
      )

    g = jax.grad(loss)(adapters)
    updates, state = opt.update(g, state, adapters)
    return optax.apply_updates(adapters, updates), state

  def float_step(floats, state, base, batch, target):
    def loss(floats):
      flat = traverse_util.flatten_dict(base)
      for k, (a, b) in floats.items():
        flat[(*k, 'kernel')] = flat[(*k, 'kernel')] + a @ b * scale
      params = traverse_util.unflatten_dict(flat)
      return jnp.mean((embed(model.module.apply, params, batch) - target) ** 2)

    g = jax.grad(loss)(floats)
    updates, state = opt.update(g, state, floats)
    return optax.apply_updates(floats, updates), state

  qmodel, qwix_adapters, qwix_frozen, qwix_merge = qwix_qlora(task, rank)

  def qwix_step(adapters, state, frozen, batch, target):
    def loss(adapters):
      params = qwix_merge(adapters, frozen)
      return jnp.mean((embed(qmodel.apply, params, batch) - target) ** 2)

    g = jax.grad(loss)(adapters)
    updates, state = opt.update(g, state, adapters)
    return optax.apply_updates(adapters, updates), state

  rows = []
  for batch_size in (2, 16):
    ids = np.asarray(task.train.batches[0]['input_ids'][:1]).repeat(batch_size, 0)
    tokens = np.resize(ids, (batch_size, 64))
    batch = {'input_ids': tokens, 'attention_mask': np.ones_like(tokens)}
    target = jnp.zeros((batch_size, 384))
    runs = {
      'packed base (3 bits)': (
        packed_step,
        (adapters, opt.init(adapters), batch, target),
      ),
      'float LoRA (fp32 base)': (
        float_step,
        (floats, opt.init(floats), model.params, batch, target),
      ),
      'qwix nf4 QLoRA': (
        qwix_step,
        (qwix_adapters, opt.init(qwix_adapters), qwix_frozen, batch, target),
      ),
    }
    measured = {}
    for name, (fn, args) in runs.items():
      jitted = jax.jit(fn)
      m = jitted.lower(*args).compile().memory_analysis()
      jax.block_until_ready(jitted(*args))
      times = []
      for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
      held = m.argument_size_in_bytes + m.temp_size_in_bytes
      measured[name] = (held, min(times))
    (pq, tq), (pf, tf), (pw, tw) = measured.values()
    rows.append(
      f'| {batch_size} x 64 | {pq / 2**20:.1f} MB, {1e3 * tq:.0f} ms |'
      f' {pf / 2**20:.1f} MB, {1e3 * tf:.0f} ms | {pw / 2**20:.1f} MB,'
      f' {1e3 * tw:.0f} ms | **{pq / pf:.2f}x** / {pq / pw:.2f}x |'
      f' {tq / tf:.2f}x / {tq / tw:.2f}x |'
    )
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--ranks', default='4,8,16')
  parser.add_argument('--inits', default='residual')
  parser.add_argument('--bases', default='3 bits,bits_per_weight=3.0', help=str(BASES))
  parser.add_argument('--loss', choices=('pooled', 'tokens', 'layers'), default='layers')
  parser.add_argument('--hidden-weight', type=float, default=1.0)
  parser.add_argument(
    '--schedule', choices=('constant', 'warmup-cosine'), default='constant'
  )
  parser.add_argument('--alpha', type=float, default=None, help='default: the rank')
  parser.add_argument('--qwix-ranks', default='8', help='"" leaves qwix out')
  parser.add_argument('--name', default='lora', help='of the benchmarks/results file')
  args = parser.parse_args()
  ranks = [int(r) for r in args.ranks.split(',')]
  qwix_ranks = [int(r) for r in args.qwix_ranks.split(',') if r]
  inits = args.inits.split(',')
  bases = args.bases.split(',')
  recipe = Recipe(args.loss, args.hidden_weight, args.schedule, args.alpha)
  task = qlora_minilm.distillation(minilm.load())
  steps = step_rows(task)
  accuracy = accuracy_rows(task, args.steps, ranks, inits, bases, recipe)
  accuracy += [qwix_row(task, args.steps, r, recipe) for r in qwix_ranks]
  publish(
    args.name,
    [
      '# QLoRA on MiniLM: adapters trained on a quantized base',
      '',
      f'Machine: {platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__}.'
      f' Command: `python benchmarks/lora.py --steps {args.steps}'
      f' --ranks {args.ranks} --inits {args.inits} --bases "{args.bases}"'
      f' --loss {args.loss} --hidden-weight {args.hidden_weight}'
      f' --schedule {args.schedule}'
      + (f' --alpha {args.alpha:g}' if args.alpha else '')
      + f' --qwix-ranks "{args.qwix_ranks}"'
      + (f' --name {args.name}' if args.name != 'lora' else '')
      + '`.',
      '',
      'Held-out mean cosine with the float embeddings (512 sentences; min in'
      ' brackets), adapters on every kernel, batch 16, Adam 1e-3'
      f' ({args.schedule}), loss "{args.loss}" (hidden states weighted'
      f' {args.hidden_weight:g}), alpha {args.alpha or "the rank"}'
      ' (`examples/qlora_minilm.py`); "during" every 100'
      ' steps; "folded": `pqjax.lora.fold` at each leaf\'s width; "folded at the'
      ' stored bits": under a budget of the bits per weight the adapted kernels store'
      ' (bases and f32 adapters), the embedding tables kept, so that the folded tree'
      ' stores as many bits as the adapted one (its bits per weight after "at"; min'
      ' in brackets). qwix: the same'
      ' training of `qwix.LoraProvider` adapters on its nf4 base (bits per weight of'
      ' its quantized kernels; it leaves the embedding tables float).',
      '',
      '| base (bits/weight) | rank | start | quantized | at start | during |'
      ' after | adapter bits/weight | folded | folded at the stored bits |',
      '|---|---|---|---|---|---|---|---|---|---|',
      *accuracy,
      '',
      'One training step, rank 8, 3-bit base (qwix: nf4), 64 tokens, args + temp'
      ' of the compiled step and its best of 5 times, side by side; ratios: packed'
      ' over float LoRA / packed over qwix:',
      '',
      '| batch | packed base | float LoRA | qwix nf4 QLoRA | memory ratio | time ratio |',
      '|---|---|---|---|---|---|',
      *steps,
      '',
      'Training recipes compared (3-bit base, rank 8, residual start, 300 steps;'
      ' held-out mean cosine, min in brackets):',
      '',
      *RECIPES,
    ],
  )


if __name__ == '__main__':
  main()
