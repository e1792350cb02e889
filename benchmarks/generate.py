"""Generation with a real JAX LLM client: tunix's Llama 3 and its Sampler, unchanged.

For each configuration (random weights at real shapes, a tokenizer of token ids),
each variant runs in a fresh process: the float32 model is built, turned into the
variant (bfloat16 weights; ``pqjax.nnx.quantize(model, bits=4, products=...)``;
qwix's PTQ ``qwix.quantize_model`` at int4 or nf4), the float model is dropped, and
tunix's ``Sampler`` generates greedily from prompts of 8 tokens at batch 1 and 8.
Measured per variant and batch:

- ms per generated token and tokens/s: a warm sampler call of ``--steps`` steps
  (prefill included), the best of 3;
- args + temp of the sampler's compiled decode loop (``memory_analysis()`` of its
  ``while_loop`` program, lowered with the arguments it was called with);
- peak RSS while generating (``VmHWM``, reset once the model is ready);
- whether the greedy tokens equal those of the model on ``pqjax.nnx.dequantize``d
  weights (pqjax variants).

Run:

    python benchmarks/generate.py [--configs small,1b] [--steps 32]

Prints a table and writes benchmarks/results/generate.md. Needs ``pqjax[llm]``
(google-tunix, which brings qwix).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import publish

CONFIGS = {
  # The small model: 4 layers, d=512, 8 heads, 4 KV heads, 32000 words.
  'small': dict(
    num_layers=4,
    vocab_size=32000,
    embed_dim=512,
    hidden_dim=1536,
    num_heads=8,
    head_dim=64,
    num_kv_heads=4,
  ),
  # Llama 3.2 1B's shapes (untied here: tunix ties by sharing the embedding).
  '1b': dict(
    num_layers=16,
    vocab_size=128256,
    embed_dim=2048,
    hidden_dim=8192,
    num_heads=32,
    head_dim=64,
    num_kv_heads=8,
  ),
}
VARIANTS = [
  'float32',
  'bfloat16',
  'pqjax auto',
  'pqjax native',
  'pqjax fused',
  'pqjax decode',
  'qwix int4',
  'qwix nf4',
]
PROMPT = 8


def variant_model(shape: dict, variant: str) -> Any:
  """The variant of a random-weight Llama 3."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from tunix.models.llama3 import model as llama_lib

  import pqjax

  config = llama_lib.ModelConfig(**shape, rope_theta=500_000, norm_eps=1e-5)
  model = llama_lib.Llama3(config, rngs=nnx.Rngs(0))
  if variant == 'bfloat16':
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
  elif variant.startswith('pqjax'):
    model, _ = pqjax.nnx.quantize(model, bits=4, products=variant.split()[1])
  elif variant.startswith('qwix'):
    import qwix

    qtype = variant.split()[1]
    tiles = {'tile_size': 64} if qtype == 'nf4' else {}
    rule = qwix.QtRule(module_path='.*', weight_qtype=qtype, **tiles)
    ids = jnp.zeros((1, PROMPT), jnp.int32)
    mask = jnp.ones((1, PROMPT, PROMPT), bool)
    positions = jnp.arange(PROMPT)[None]
    provider = qwix.PtqProvider([rule])
    model = qwix.quantize_model(model, provider, ids, positions, None, mask)
  return model


def child(shape: dict, variant: str, steps: int) -> dict:
  """Measures one variant in this (fresh) process."""
  import gc

  import jax
  import numpy as np
  from tunix.generate import sampler as sampler_lib

  import pqjax

  sys.path.insert(0, str(Path(__file__).parents[1] / 'examples'))
  from tunix_llama import IdTokenizer  # text of token ids

  model = variant_model(shape, variant)
  gc.collect()
  cache = sampler_lib.CacheConfig(
    cache_size=PROMPT + steps + 8,
    num_layers=shape['num_layers'],
    num_kv_heads=shape['num_kv_heads'],
    head_dim=shape['head_dim'],
  )

  def sampler_for(m: Any) -> tuple[Any, Any, list]:
    s = sampler_lib.Sampler(m, IdTokenizer(), cache)
    compiled, seen = s._compiled_decode_fn, []

    def recording(*args: Any) -> Any:
      if not seen:
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
        seen.append(jax.tree.map(sds, args))
      return compiled(*args)

    s._compiled_decode_fn = recording
    return s, compiled, seen

  def generate(s: Any, batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    ids = rng.integers(3, shape['vocab_size'], (batch, PROMPT - 1))
    prompts = [' '.join(str(t) for t in [1, *row]) for row in ids]
    out = s(prompts, max_generation_steps=steps, max_prompt_length=PROMPT)
    return np.asarray([np.asarray(t) for t in out.tokens])

  results, tokens = {}, {}
  for batch in (1, 8):
    s, compiled, seen = sampler_for(model)
    tokens[batch] = generate(s, batch)
    mem = compiled.lower(*seen[0]).compile().memory_analysis()
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # peak RSS from here
    best = float('inf')
    for _ in range(3):
      start = time.perf_counter()
      generate(s, batch)
      best = min(best, time.perf_counter() - start)
    with open('/proc/self/status') as f:
      hwm = next(line for line in f if line.startswith('VmHWM'))
    results[batch] = dict(
      ms=1000 * best / steps,
      tps=batch * steps / best,
      args=mem.argument_size_in_bytes,
      temp=mem.temp_size_in_bytes,
      rss=int(hwm.split()[1]) * 1024,
      same=None,
    )
  if variant.startswith('pqjax'):
    # Built after the measurements, so that its float weights are not counted.
    reference = pqjax.nnx.dequantize(model)
    for batch, r in results.items():
      want = generate(sampler_for(reference)[0], batch)
      r['same'] = bool(np.array_equal(tokens[batch], want))
  return results


def run(shape: dict, variant: str, steps: int) -> dict:
  out = subprocess.run(
    [sys.executable, __file__, '--child', json.dumps(shape), variant, str(steps)],
    capture_output=True,
    text=True,
  )
  if out.returncode:
    last = out.stderr.strip().splitlines() or [f'exit status {out.returncode}']
    if out.returncode < 0:
      last = [f'killed by signal {-out.returncode} (out of memory?)']
    return {'error': last[-1][:160]}
  return {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
  if sys.argv[1:2] == ['--child']:
    shape, variant, steps = json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    print(json.dumps(child(shape, variant, steps)))
    return
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='small,1b')
  parser.add_argument('--steps', type=int, default=32)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--name', default='generate', help='results/<name>.md')
  args = parser.parse_args()
  import jax

  import pqjax

  lines = [
    "# Generation with tunix's Llama 3 Sampler (benchmarks/generate.py)",
    '',
    f'Machine: {platform.machine()} {platform.processor() or ""}, '
    f'{jax.device_count()} CPU device(s), jax {jax.__version__}; '
    f'native kernels: {pqjax.native_status().level or "not loaded"}. '
    f'Greedy, prompts of {PROMPT} tokens, {args.steps} generated tokens a call; '
    'each variant in a fresh process; ms/token and tokens/s of a warm sampler call '
    '(prefill included, best of 3); args + temp of its compiled decode loop; peak RSS '
    'while generating.',
    '',
  ]
  for name in args.configs.split(','):
    shape = CONFIGS[name]
    rows = {v: run(shape, v, args.steps) for v in args.variants.split(',')}
    for v, r in rows.items():
      print(name, v, r, flush=True)
    lines += [
      f'## {name}: {json.dumps(shape)}',
      '',
      '| variant | batch | ms/token | tokens/s | vs float32 | args + temp (MB) | vs'
      ' float32 | temp (MB) | peak RSS (MB) | tokens = dequantized |',
      '|---|---|---|---|---|---|---|---|---|---|',
    ]
    base = rows.get('float32', {})
    for v, r in rows.items():
      if 'error' in r:
        lines.append(f'| {v} | | failed: {r["error"]} | | | | | | | |')
        continue
      for batch, m in r.items():
        b = base.get(batch) if isinstance(base, dict) else None
        mem = (m['args'] + m['temp']) / 1e6
        speed = f'{m["tps"] / b["tps"]:.2f}x' if b else ''
        size = f'{(m["args"] + m["temp"]) / (b["args"] + b["temp"]):.2f}x' if b else ''
        same = '' if m['same'] is None else ('yes' if m['same'] else '**no**')
        lines.append(
          f'| {v} | {batch} | {m["ms"]:.1f} | {m["tps"]:.1f} | {speed} | {mem:.1f} |'
          f' {size} | {m["temp"] / 1e6:.2f} | {m["rss"] / 1e6:.0f} | {same} |'
        )
    lines.append('')
  publish(args.name, lines)


if __name__ == '__main__':
  sys.exit(main())
