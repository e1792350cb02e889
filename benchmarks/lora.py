"""QLoRA on MiniLM: adapters on a quantized base, trained with optax, measured.

For each base (3 bits per channel; ``bits_per_weight=3.0``), rank and start
(Gaussian; the SVD of the quantization error), trains the adapters of every kernel
toward the float model's embeddings as ``examples/qlora_minilm.py`` does (batch 16,
Adam at 1e-3, the first 512 sentences of ``stdlib_sentences(1024)``) and reports the
held-out (the other 512) mean and minimum cosine with the float embeddings before,
every 100 steps and after folding. Then, side by side in one process, one training
step of rank-8 adapters on the packed base against a float LoRA step of the same
rank (fp32 base, ``W + a @ b * scale`` in every Dense): args + temp of the compiled
step (``memory_analysis()``) and its time, at batch 2 and 16 of 64 tokens. Run:

    python benchmarks/lora.py [--steps 300] [--ranks 4,8,16] [--inits gaussian,residual]

Prints a table and writes benchmarks/results/lora.md. qwix's QLoRA (``LoraProvider``
with an nf4 base) is not in the table yet.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

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

BASES = {'3 bits': dict(bits=3), 'bits_per_weight=3.0': dict(bits_per_weight=3.0)}


def accuracy_rows(task, steps: int, ranks: list[int], inits: list[str]) -> list[str]:
  rows = []
  for base, options in BASES.items():
    params_q, _ = pqjax.quantize(task.model.params, **options)
    before = task.cosines(params_q)
    bits = pqjax.summary(params_q).bits_per_weight
    for rank in ranks:
      for init in inits:
        params_l = pqjax.lora.init(
          params_q,
          rank,
          key=jax.random.key(0),
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
          report=lambda i, p, during=during: during.append(
            f'{task.cosines(p).mean():.4f}'
          ),
        )
        after = task.cosines(params_l)
        s = pqjax.summary(params_l)
        extra = 8 * s.adapter_bytes / sum(x.size for x in s.leaves)
        folded = task.cosines(pqjax.lora.fold(params_l))
        rows.append(
          f'| {base} ({bits:.2f}) | {rank} | {init} | {before.mean():.4f} |'
          f' {start.mean():.4f} | {" / ".join(during)} | **{after.mean():.4f}**'
          f' ({after.min():.4f}) | {extra:.3f} (f32) | {folded.mean():.4f} |'
        )
        print(rows[-1], flush=True)
  return rows


def _dense_paths(params) -> list[tuple[str, ...]]:
  flat = traverse_util.flatten_dict(params)
  return [k[:-1] for k in flat if k[-1] == 'kernel']


def step_rows(task, rank: int = 8) -> list[str]:
  """One Adam step of the adapters, packed base against a float LoRA step."""
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
    (pq, tq), (pf, tf) = measured.values()
    rows.append(
      f'| {batch_size} x 64 | {pq / 2**20:.1f} MB, {1e3 * tq:.0f} ms |'
      f' {pf / 2**20:.1f} MB, {1e3 * tf:.0f} ms | **{pq / pf:.2f}x** |'
      f' {tq / tf:.2f}x |'
    )
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--ranks', default='4,8,16')
  parser.add_argument('--inits', default='gaussian,residual')
  args = parser.parse_args()
  ranks = [int(r) for r in args.ranks.split(',')]
  inits = args.inits.split(',')
  task = qlora_minilm.distillation(minilm.load())
  steps = step_rows(task)
  accuracy = accuracy_rows(task, args.steps, ranks, inits)
  publish(
    'lora',
    [
      '# QLoRA on MiniLM: adapters trained on a quantized base',
      '',
      f'Machine: {platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__}.'
      f' Command: `python benchmarks/lora.py --steps {args.steps}'
      f' --ranks {args.ranks} --inits {args.inits}`.',
      '',
      'Held-out mean cosine with the float embeddings (512 sentences; min in'
      ' brackets), adapters on every kernel, batch 16, Adam 1e-3; "during" every 100'
      ' steps; "folded": `pqjax.lora.fold` at each leaf\'s width.',
      '',
      '| base (bits/weight) | rank | start | quantized | at start | during |'
      ' after | adapter bits/weight | folded |',
      '|---|---|---|---|---|---|---|---|---|',
      *accuracy,
      '',
      'One training step, rank 8, 3-bit base, 64 tokens, args + temp of the'
      ' compiled step and its best of 5 times, side by side:',
      '',
      '| batch | packed base | float LoRA | memory ratio | time ratio |',
      '|---|---|---|---|---|',
      *steps,
    ],
  )


if __name__ == '__main__':
  main()
