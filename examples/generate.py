"""Generation with a real LLM class: a Hugging Face Llama folder, quantized on disk,
run by ``FlaxLlamaForCausalLM``'s module with a KV cache under ``jax.jit(pqjax.wrap)``.

The folder is written here as a user's checkpoint is: PyTorch names and layouts,
bfloat16, two shards with ``model.safetensors.index.json`` and a ``config.json``
(a small config with random heavy-tailed weights, since nothing is downloaded).
``pqjax.quantize_checkpoint`` streams it into a folder of 4-bit shards in the layout
of the Flax class, which ``pqjax.load`` reads. transformers' ``generate`` cannot take
quantized params, so the greedy loop is written out: one prefill, then one jitted
step a token, each updating the cache.

Needs the ``demo`` extra (transformers).
"""

import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from transformers import FlaxLlamaForCausalLM, LlamaConfig

import pqjax

CONFIG = dict(
  vocab_size=2048,
  hidden_size=256,
  intermediate_size=688,
  num_hidden_layers=4,
  num_attention_heads=8,
  num_key_value_heads=4,
  max_position_embeddings=256,
  tie_word_embeddings=False,
)


def write_llama_folder(folder: Path, config: dict, seed: int = 0) -> None:
  """A Llama checkpoint as transformers saves one: PyTorch names, (out, in) weights."""
  d, f, v = config['hidden_size'], config['intermediate_size'], config['vocab_size']
  kv = d // config['num_attention_heads'] * config['num_key_value_heads']
  rng = np.random.default_rng(seed)

  def weight(*shape):
    return (0.02 * rng.standard_t(4, shape)).astype(ml_dtypes.bfloat16)

  tensors = {'model.embed_tokens.weight': weight(v, d), 'lm_head.weight': weight(v, d)}
  tensors['model.norm.weight'] = np.ones(d, ml_dtypes.bfloat16)
  for i in range(config['num_hidden_layers']):
    p = f'model.layers.{i}.'
    shapes = {
      'self_attn.q_proj': (d, d),
      'self_attn.k_proj': (kv, d),
      'self_attn.v_proj': (kv, d),
      'self_attn.o_proj': (d, d),
      'mlp.gate_proj': (f, d),
      'mlp.up_proj': (f, d),
      'mlp.down_proj': (d, f),
    }
    for name, shape in shapes.items():
      tensors[f'{p}{name}.weight'] = weight(*shape)
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      tensors[f'{p}{norm}.weight'] = np.ones(d, ml_dtypes.bfloat16)
  folder.mkdir(parents=True)
  names = sorted(tensors)
  weight_map = {}
  for s, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
    file = f'model-{s + 1:05d}-of-00002.safetensors'
    save_file({n: tensors[n] for n in part}, folder / file)
    weight_map.update(dict.fromkeys(part, file))
  (folder / 'model.safetensors.index.json').write_text(
    json.dumps({'metadata': {}, 'weight_map': weight_map})
  )
  llama = LlamaConfig(**config, torch_dtype='bfloat16')
  llama.architectures = ['LlamaForCausalLM']
  llama.save_pretrained(folder)


def greedy(step, params, prompt: np.ndarray, new_tokens: int, max_len: int, model):
  """Greedy tokens after ``prompt`` (batch, P): a prefill, then a step a token."""
  batch, length = prompt.shape
  cache = model.init_cache(batch, max_len)
  mask = jnp.ones((batch, max_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  logits, cache = step(params, cache, jnp.asarray(prompt), mask, positions)
  tokens = [jnp.argmax(logits, -1)]
  for i in range(new_tokens - 1):
    if i == 1:  # timed from the second step: the first one compiles
      tokens[-1].block_until_ready()
      start = time.perf_counter()
    positions = jnp.full((batch, 1), length + i)
    logits, cache = step(params, cache, tokens[-1][:, None], mask, positions)
    tokens.append(jnp.argmax(logits, -1))
  tokens = np.asarray(jnp.stack(tokens, axis=1))
  per_token = (time.perf_counter() - start) / (new_tokens - 2)
  return tokens, per_token


def main() -> None:
  with tempfile.TemporaryDirectory() as tmp:
    src, out = Path(tmp) / 'llama', Path(tmp) / 'llama-4bit'
    write_llama_folder(src, CONFIG)
    pqjax.quantize_checkpoint(src, out, bits=4)
    size = sum(p.stat().st_size for p in src.glob('*.safetensors'))
    size_q = sum(p.stat().st_size for p in out.glob('*.safetensors'))
    params_q = pqjax.load(out)
    # The summary's last lines: what was quantized, and the bytes.
    print('\n'.join(str(pqjax.summary(params_q)).splitlines()[-4:]))

    model = FlaxLlamaForCausalLM(LlamaConfig.from_pretrained(src), _do_init=False)

    def apply(params, cache, ids, mask, positions):
      out, variables = model.module.apply(
        {'params': params, 'cache': cache},
        ids,
        mask,
        positions,
        mutable=['cache'],
      )
      return out.logits[:, -1], variables['cache']

    prompt = np.random.default_rng(1).integers(0, CONFIG['vocab_size'], (1, 12))
    new, max_len = 24, 64
    # The same loop on float weights: the quantized ones decoded once.
    params_f = pqjax.dequantize(params_q)
    want, t_float = greedy(jax.jit(apply), params_f, prompt, new, max_len, model)
    got, t_q = greedy(jax.jit(pqjax.wrap(apply)), params_q, prompt, new, max_len, model)

  print(f'bf16 folder bytes: {size}')
  print(f'4-bit folder bytes: {size_q}')
  print(f'generated tokens: {got.size}')
  print(f'tokens equal to the dequantized model: {np.mean(got == want):.4f}')
  print(f'ms per token, dequantized float32: {1e3 * t_float:.3f}')
  print(f'ms per token, pqjax 4-bit: {1e3 * t_q:.3f}')
  print('tokens:', got[0].tolist())


if __name__ == '__main__':
  main()
