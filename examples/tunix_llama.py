"""A real JAX LLM client: tunix's Llama 3 model and its Sampler, on 4-bit weights.

``pqjax.nnx.quantize`` returns a model object whose modules run on their quantized
parameters wherever they are called, so tunix's ``Sampler``, which splits the model
and merges it inside its own jitted prefill and decode loop, runs it unchanged.
The model has random weights at a small Llama 3 shape and the tokenizer reads text
of token ids (nothing is downloaded); generation is greedy, and its tokens are
those of the same model on ``pqjax.nnx.dequantize``d weights.

Needs the ``llm`` extra (google-tunix).
"""

import time

import jax
import numpy as np
from flax import nnx
from tunix.generate import sampler as sampler_lib
from tunix.models.llama3 import model as llama_lib

import pqjax

CONFIG = llama_lib.ModelConfig(
  num_layers=4,
  vocab_size=32000,
  embed_dim=512,
  hidden_dim=1536,
  num_heads=8,
  head_dim=64,
  num_kv_heads=4,
  rope_theta=500_000,
  norm_eps=1e-5,
)
STEPS = 24


class IdTokenizer:
  """Text of space-separated token ids: what tunix's Sampler needs of a tokenizer."""

  def encode(self, text: str, **kwargs: object) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids: list[int], **kwargs: object) -> str:
    return ' '.join(str(int(i)) for i in ids)

  def bos_id(self) -> int:
    return 1

  def eos_id(self) -> int:
    return 2

  def pad_id(self) -> int:
    return 0


def generate(model: nnx.Module, prompts: list[str]) -> tuple[np.ndarray, float]:
  """Greedy tokens of ``model`` from tunix's Sampler, and seconds a warm call took."""
  cache = sampler_lib.CacheConfig(
    cache_size=64,
    num_layers=CONFIG.num_layers,
    num_kv_heads=CONFIG.num_kv_heads,
    head_dim=CONFIG.head_dim,
  )
  sampler = sampler_lib.Sampler(model, IdTokenizer(), cache)
  run = lambda: sampler(prompts, max_generation_steps=STEPS, max_prompt_length=16)
  run()  # compiles
  start = time.perf_counter()
  out = run()
  seconds = time.perf_counter() - start
  return np.asarray([np.asarray(t) for t in out.tokens]), seconds


def main() -> None:
  model = llama_lib.Llama3(CONFIG, rngs=nnx.Rngs(0))
  only_weights = lambda path, leaf: leaf.ndim >= 2 and 'norm' not in path
  model_q, _ = pqjax.nnx.quantize(model, bits=4, filter=only_weights)
  prompts = ['1 5 77 300 12 9', '1 9 9 9 31999']
  tokens, seconds = generate(model_q, prompts)
  want, _ = generate(pqjax.nnx.dequantize(model_q), prompts)
  _, float_seconds = generate(model, prompts)
  nbytes = lambda m: sum(x.nbytes for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
  print('4-bit tokens:', tokens[0].tolist())
  print(f'generated tokens: {tokens.shape[1]}')
  print(f'tokens equal to the dequantized model: {float(np.array_equal(tokens, want))}')
  print(f'float32 parameter bytes: {nbytes(model)}')
  print(f'4-bit parameter bytes: {nbytes(model_q)}')
  print(f'4-bit seconds per call: {seconds:.3f}')
  print(f'float32 seconds per call: {float_seconds:.3f}')


if __name__ == '__main__':
  main()
