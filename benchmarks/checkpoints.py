"""Quantizing the checkpoints users hold: Llama-shaped Hugging Face folders on disk.

Writes bfloat16 folders as transformers saves them (PyTorch names and layouts,
shards of at most 5 GB with ``model.safetensors.index.json``, a ``config.json``) of
about 1B, 3B and 8B parameters with deterministic heavy-tailed weights (Student's t
with 4 degrees of freedom; nothing is downloaded, nothing kept), then, each in a
fresh process:

- ``pqjax quantize SRC DST --bits 4`` (the command line, streaming, Flax layout):
  peak RSS, wall time, seconds per million weights, the output's size;
- ``pqjax.load(DST)`` and one forward step of ``FlaxLlamaForCausalLM``'s module
  (8 tokens, batch 1) under ``jax.jit(pqjax.wrap(...))``: peak RSS, against the
  output's size plus what the step's compiled program needs;

and, on the 1B folder, streaming against in-memory ``pqjax.quantize`` of the same
tensors (``pqjax.load_float``), both warm (compiled by a first run on a 2-layer
model of the same shapes), in one process. Run:

    python benchmarks/checkpoints.py [--sizes 1B,3B,8B] [--dir DIR]

Prints a table and writes benchmarks/results/checkpoints.md. The folders take
2.5 + 6.4 + 16 GB of disk in ``DIR`` (default: a temporary folder) and are removed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
from common import publish

# Llama 3.2 1B and 3B (tied embeddings) and Llama 3.1 8B.
CONFIGS = {
  '1B': dict(layers=16, d=2048, ffn=8192, heads=32, kv=8, vocab=128256, tied=True),
  '3B': dict(layers=28, d=3072, ffn=8192, heads=24, kv=8, vocab=128256, tied=True),
  '8B': dict(layers=32, d=4096, ffn=14336, heads=32, kv=8, vocab=128256, tied=False),
  # A check that the script runs, in seconds.
  'tiny': dict(layers=2, d=256, ffn=512, heads=4, kv=2, vocab=1024, tied=False),
}
SHARD_BYTES = 5 << 30
# Values are drawn once and each tensor reads them from its own offset.
BANK = 1 << 24


def torch_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  """The tensors of a LlamaForCausalLM state dict, by name."""
  d, kv = c['d'], c['d'] // c['heads'] * c['kv']
  out: dict[str, tuple[int, ...]] = {'model.embed_tokens.weight': (c['vocab'], d)}
  for i in range(c['layers']):
    p = f'model.layers.{i}.'
    out |= {
      p + 'input_layernorm.weight': (d,),
      p + 'self_attn.q_proj.weight': (d, d),
      p + 'self_attn.k_proj.weight': (kv, d),
      p + 'self_attn.v_proj.weight': (kv, d),
      p + 'self_attn.o_proj.weight': (d, d),
      p + 'post_attention_layernorm.weight': (d,),
      p + 'mlp.gate_proj.weight': (c['ffn'], d),
      p + 'mlp.up_proj.weight': (c['ffn'], d),
      p + 'mlp.down_proj.weight': (d, c['ffn']),
    }
  out['model.norm.weight'] = (d,)
  if not c['tied']:
    out['lm_head.weight'] = (c['vocab'], d)
  return out


def hf_config(c: dict) -> dict:
  return {
    'architectures': ['LlamaForCausalLM'],
    'model_type': 'llama',
    'hidden_size': c['d'],
    'intermediate_size': c['ffn'],
    'num_hidden_layers': c['layers'],
    'num_attention_heads': c['heads'],
    'num_key_value_heads': c['kv'],
    'vocab_size': c['vocab'],
    'tie_word_embeddings': c['tied'],
    'max_position_embeddings': 8192,
    'rms_norm_eps': 1e-5,
    'rope_theta': 500000.0,
    'torch_dtype': 'bfloat16',
  }


def write_folder(folder: Path, c: dict) -> int:
  """Writes the folder tensor by tensor (never a whole shard in memory); its bytes."""
  rng = np.random.default_rng(0)
  bank = (0.02 * rng.standard_t(4, BANK)).astype(ml_dtypes.bfloat16)
  shapes = torch_shapes(c)
  shards: list[list[str]] = [[]]
  size = 0
  for name, shape in shapes.items():
    nbytes = 2 * math.prod(shape)
    if shards[-1] and size + nbytes > SHARD_BYTES:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  folder.mkdir(parents=True)
  weight_map = {}
  for s, names in enumerate(shards):
    file = f'model-{s + 1:05d}-of-{len(shards):05d}.safetensors'
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name in names:
      n = 2 * math.prod(shapes[name])
      header[name] = {
        'dtype': 'BF16',
        'shape': list(shapes[name]),
        'data_offsets': [offset, offset + n],
      }
      offset += n
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    with open(folder / file, 'wb') as f:
      f.write(len(text).to_bytes(8, 'little') + text)
      for i, name in enumerate(names):
        count = math.prod(shapes[name])
        if len(shapes[name]) == 1:
          f.write(np.ones(count, ml_dtypes.bfloat16).tobytes())
          continue
        start = (zlib.crc32(name.encode()) + 7919 * i) % BANK
        for done in range(0, count, BANK):
          part = np.roll(bank, -(start + done) % BANK)[: min(BANK, count - done)]
          f.write(part.tobytes())
    weight_map |= dict.fromkeys(names, file)
  total = sum(2 * math.prod(s) for s in shapes.values())
  index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
  (folder / 'model.safetensors.index.json').write_text(json.dumps(index, indent=1))
  (folder / 'config.json').write_text(json.dumps(hf_config(c), indent=1))
  return sum(p.stat().st_size for p in folder.glob('*.safetensors'))


def run_measured(argv: list[str]) -> tuple[float, float, str]:
  """Runs ``argv`` in a fresh process: (wall seconds, peak RSS bytes, stdout)."""
  start = time.perf_counter()
  child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
  out = child.stdout.read() if child.stdout else ''
  _, status, usage = os.wait4(child.pid, 0)
  wall = time.perf_counter() - start
  child.returncode = os.waitstatus_to_exitcode(status)
  if child.returncode:
    raise SystemExit(f'{argv} failed with {child.returncode}')
  return wall, usage.ru_maxrss * 1024, out


STEP = """
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import pqjax
from transformers import FlaxLlamaForCausalLM, LlamaConfig

out = sys.argv[1]
start = time.perf_counter()
params = pqjax.load(out)
loaded = time.perf_counter() - start
model = FlaxLlamaForCausalLM(LlamaConfig.from_pretrained(out), _do_init=False)

def step(params, ids):
  mask, positions = jnp.ones_like(ids), jnp.arange(ids.shape[1])[None]
  return model.module.apply({'params': params}, ids, mask, positions).logits[:, -1]

ids = jnp.asarray(np.arange(8)[None] * 97 + 1)
compiled = jax.jit(pqjax.wrap(step)).lower(params, ids).compile()
m = compiled.memory_analysis()
logits = compiled(params, ids).block_until_ready()
assert np.all(np.isfinite(np.asarray(logits)))
print(json.dumps({'load_s': loaded, 'temp': m.temp_size_in_bytes,
                  'output': m.output_size_in_bytes, 'args': m.argument_size_in_bytes}))
"""

SPEED = """
import json, sys, time
import pqjax

src, small, dst = sys.argv[1:4]
# Warm: a 2-layer model of the same shapes compiles every program of both paths.
pqjax.quantize(pqjax.load_float(small), bits=4)
pqjax.quantize_checkpoint(small, dst + '-warm', bits=4, layout='none')
tree = pqjax.load_float(src)
start = time.perf_counter()
q, _ = pqjax.quantize(tree, bits=4)
memory = time.perf_counter() - start
del q, tree
start = time.perf_counter()
pqjax.quantize_checkpoint(src, dst, bits=4, layout='none')
streaming = time.perf_counter() - start
print(json.dumps({'in_memory_s': memory, 'streaming_s': streaming}))
"""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--sizes', default='1B,3B,8B')
  parser.add_argument('--dir', default=None, help='where the folders are written')
  args = parser.parse_args()
  sizes = args.sizes.split(',')
  base = Path(tempfile.mkdtemp(prefix='pqjax-ckpt-', dir=args.dir))
  pqjax_cli = [sys.executable, '-m', 'pqjax.tools.cli']
  rows, notes = [], []
  # What a process holds before loading anything: Python, jax, transformers.
  _, baseline, _ = run_measured(
    [sys.executable, '-c', 'import jax, pqjax, transformers; jax.numpy.ones(1)']
  )
  try:
    for size in sizes:
      c = CONFIGS[size]
      src, dst = base / f'llama-{size}', base / f'llama-{size}-4bit'
      start = time.perf_counter()
      src_bytes = write_folder(src, c)
      written = time.perf_counter() - start
      weights = src_bytes // 2
      wall, rss, _ = run_measured(
        [*pqjax_cli, 'quantize', str(src), str(dst), '--bits', '4']
      )
      out_bytes = sum(p.stat().st_size for p in dst.glob('*.safetensors'))
      script = base / 'step.py'
      script.write_text(STEP)
      _, step_rss, out = run_measured([sys.executable, str(script), str(dst)])
      step = json.loads(out.strip().splitlines()[-1])
      rows.append(
        dict(
          size=size,
          weights=weights,
          src_gb=src_bytes / 1e9,
          shards=len(list(src.glob('*.safetensors'))),
          written_s=written,
          wall=wall,
          rss=rss,
          s_per_m=wall / (weights / 1e6),
          out_gb=out_bytes / 1e9,
          out_shards=len(list(dst.glob('*.safetensors'))),
          load_s=step['load_s'],
          step_rss=step_rss,
          step_temp=step['temp'] + step['output'],
        )
      )
      print(rows[-1], flush=True)
      if size == sizes[0]:
        small = base / 'small'
        write_folder(small, {**c, 'layers': 2})
        script = base / 'speed.py'
        script.write_text(SPEED)
        _, _, out = run_measured(
          [sys.executable, str(script), str(src), str(small), str(base / 'speed-out')]
        )
        speed = json.loads(out.strip().splitlines()[-1])
        notes.append(
          f'Speed, {size} ({weights / 1e9:.2f}B weights, bits=4, warm, one process):'
          f' in-memory `pqjax.quantize` of `pqjax.load_float(SRC)`'
          f' {speed["in_memory_s"]:.1f} s, `pqjax.quantize_checkpoint(SRC, DST,'
          f' layout="none")` {speed["streaming_s"]:.1f} s:'
          f' **{speed["streaming_s"] / speed["in_memory_s"]:.2f}x**.'
        )
        print(notes[-1], flush=True)
        shutil.rmtree(small)
        shutil.rmtree(base / 'speed-out', ignore_errors=True)
        shutil.rmtree(base / 'speed-out-warm', ignore_errors=True)
      shutil.rmtree(src)
      shutil.rmtree(dst)
  finally:
    shutil.rmtree(base, ignore_errors=True)

  import jax

  lines = [
    '# Quantizing Llama-shaped Hugging Face folders (bf16, sharded) on disk',
    '',
    f'Machine: {platform.machine()}, {os.cpu_count()} CPUs,'
    f' {os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30:.0f} GiB;'
    f' jax {jax.__version__}. Command: `python benchmarks/checkpoints.py'
    f' --sizes {args.sizes}`.',
    '',
    'Quantize: `pqjax quantize SRC DST --bits 4` in a fresh process (streaming,'
    ' working set 256 MiB (the default), Flax layout). Load + step:'
    ' `pqjax.load(DST)` and one 8-token forward of `FlaxLlamaForCausalLM` under'
    ' `jax.jit(pqjax.wrap(...))` in'
    ' a fresh process; "step needs" is its compiled temp + output; the last column'
    f' takes off the {baseline / 1e9:.2f} GB of a process that only imports jax,'
    ' pqjax and transformers.',
    '',
    '| model | weights | bf16 folder | quantize wall | s / M weights | quantize peak'
    ' RSS | 4-bit output | load s | load + step peak RSS | step needs | RSS / (output'
    ' + step), less imports |',
    '|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  gb = 1e9
  for r in rows:
    lines.append(
      f'| {r["size"]} | {r["weights"] / 1e9:.2f}B | {r["src_gb"]:.2f} GB in'
      f' {r["shards"]} | {r["wall"]:.0f} s | {r["s_per_m"]:.3f} |'
      f' {r["rss"] / gb:.2f} GB | {r["out_gb"]:.2f} GB in {r["out_shards"]} |'
      f' {r["load_s"]:.1f} | {r["step_rss"] / gb:.2f} GB |'
      f' {r["step_temp"] / gb:.2f} GB |'
      f' {(r["step_rss"] - baseline) / (r["out_gb"] * gb + r["step_temp"]):.2f} |'
    )
  if len(rows) > 1:
    lines += [
      '',
      f'Peak RSS of quantizing, {rows[-1]["size"]} over {rows[0]["size"]}:'
      f' {rows[-1]["rss"] / rows[0]["rss"]:.2f}x.',
    ]
  lines += ['', *notes]
  publish('checkpoints', lines)


if __name__ == '__main__':
  main()
