"""MiniLM inference time: jitted fp32 apply vs wrapped apply on 4-bit params_q.

All variants run in one process on the same inputs (real sentences, padded to the
length), warmed up, then timed interleaved: median of the runs. Also timed: the
quantized model with a per-code decode (power.unpack every code to int32, then
power.decode looks each up) instead of QArray.dequantize's byte tables, and the
decode of the kernels alone. Everything runs twice, each time in a fresh process:
with glibc's default malloc, which hands large freed blocks back to the system (so
XLA's big per-call buffers are page-faulted in anew on every call), and with
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set so that it keeps them. Run:

    python benchmarks/inference.py

Prints a table and writes benchmarks/results/inference.md.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from common import publish

import pqjax
from pqjax import minilm, power
from pqjax.qarray import QArray, is_qarray, matrix_shape
from pqjax.tools import corpus

SHAPES = ((32, 128, 15), (1, 16, 100))  # batch, tokens, timed runs
ALLOCATORS = (
    ('glibc default', {}),
    ('glibc, freed memory kept', {'MALLOC_MMAP_THRESHOLD_': str(2 ** 30),
                                  'MALLOC_TRIM_THRESHOLD_': str(2 ** 31)}),
)


def _inputs(tokenizer, batch: int, tokens: int) -> tuple[np.ndarray, ...]:
  sentences = corpus.stdlib_sentences(4 * batch)
  # Longest sentences first, so a 128-token batch is mostly text, not padding.
  sentences = sorted(sentences, key=len, reverse=True)[:batch]
  enc = tokenizer(sentences, padding='max_length', truncation=True, max_length=tokens,
                  return_tensors='np')
  return enc['input_ids'], enc['attention_mask'], enc['token_type_ids']


def _per_code_decode(x: QArray) -> jax.Array:
  """Decoding one code at a time: unpack to int32 codes, then one lookup each."""
  k, n = matrix_shape(x.shape)
  nk = x.scale.shape[0]
  q = power.unpack(x.codes, x.bits, k).reshape(nk, k // nk, n)
  w = power.decode(q, x.scale[:, None, :], x.table, x.bits)
  return w.reshape(x.shape).astype(x.dtype)


def _per_code_apply(apply_fn: Callable[..., object]) -> Callable[..., object]:
  def apply(variables, *args):
    params = jax.tree_util.tree_map(
        lambda x: _per_code_decode(x) if isinstance(x, QArray) else x, variables,
        is_leaf=is_qarray)
    return apply_fn(params, *args)

  return apply


def _time(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
  """Seconds of each run of each function, interleaved so drift hits all alike."""
  for fn in fns.values():
    for _ in range(3):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(runs):
    for k, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - start)
  return times


def measure() -> list[dict[str, float]]:
  """Times of every variant at every input shape, in this process."""
  model = minilm.load()
  params = model.params
  params_q, _ = pqjax.quantize(params, 4, granularity='channel')
  jax.block_until_ready(params_q)

  def hidden(apply_fn):
    return jax.jit(lambda p, ids, mask, types: apply_fn(
        {'params': p}, ids, mask, types).last_hidden_state)

  fp32 = hidden(model.module.apply)
  quant = hidden(pqjax.wrap(model.module.apply))
  per_code = hidden(_per_code_apply(model.module.apply))
  decode = jax.jit(pqjax.dequantize)
  # In the model, XLA fuses the embedding tables' decode into their row lookups;
  # the 37 kernels (10.6M weights) are what each call decodes in full.
  kernels_q = {k: v for k, v in params_q.items() if k != 'embeddings'}

  # The two decodes give the same weights bit for bit.
  per_code_weights = jax.jit(lambda q: jax.tree_util.tree_map(
      lambda x: _per_code_decode(x) if isinstance(x, QArray) else x, q,
      is_leaf=is_qarray))(params_q)
  for a, b in zip(jax.tree_util.tree_leaves(decode(params_q)),
                  jax.tree_util.tree_leaves(per_code_weights)):
    assert np.array_equal(np.asarray(a), np.asarray(b))

  rows = []
  for batch, tokens, runs in SHAPES:
    x = _inputs(model.tokenizer, batch, tokens)
    times = _time({'fp32': lambda x=x: fp32(params, *x),
                   'pqjax': lambda x=x: quant(params_q, *x),
                   'per_code': lambda x=x: per_code(params_q, *x)}, runs)
    # Apart, so that its memory traffic does not disturb the model runs.
    times.update(_time({'decode': lambda: decode(kernels_q)}, runs))
    ref, out = np.asarray(fp32(params, *x)), np.asarray(quant(params_q, *x))
    rows.append({'batch': batch, 'tokens': tokens, 'runs': runs,
                 **{k: statistics.median(v) for k, v in times.items()},
                 **{f'best_{k}': min(v) for k, v in times.items()},
                 'error': float(np.linalg.norm(out - ref) / np.linalg.norm(ref))})
  return rows


def _row(allocator: str, r: dict[str, float]) -> str:
  return (f'| {r["batch"]} x {r["tokens"]} | {allocator} | {r["runs"]} |'
          f' {1e3 * r["fp32"]:.1f} | {1e3 * r["pqjax"]:.1f} |'
          f' **{r["pqjax"] / r["fp32"]:.2f}x** |'
          f' {r["best_pqjax"] / r["best_fp32"]:.2f}x | {1e3 * r["per_code"]:.1f}'
          f' ({r["per_code"] / r["fp32"]:.2f}x) | {1e3 * r["decode"]:.1f} |'
          f' {r["error"]:.3f} |')


def main() -> None:
  if sys.argv[1:] == ['--child']:
    print(json.dumps(measure()))
    return
  results = []
  for label, env in ALLOCATORS:
    run = subprocess.run([sys.executable, __file__, '--child'], check=True,
                         capture_output=True, text=True, env={**os.environ, **env})
    results.append((label, json.loads(run.stdout.strip().splitlines()[-1])))
    for r in results[-1][1]:
      print(_row(label, r), flush=True)
  rows = [_row(label, r) for i in range(len(SHAPES)) for label, rs in results
          for r in rs[i:i + 1]]

  lines = [
      '# MiniLM inference: fp32 vs 4-bit pqjax (per channel)', '',
      f'Machine: {platform.platform()}, {os.cpu_count()} CPUs,'
      f' Python {platform.python_version()}, jax {jax.__version__},'
      f' {jax.default_backend().upper()} backend.', '',
      'fp32: `jax.jit` of `FlaxBertModel.module.apply` returning the last hidden'
      ' state. pqjax: the same through `pqjax.wrap` with 4-bit `params_q` (every'
      ' kernel and embedding table decoded inside the jitted function). Inputs: real'
      ' sentences (standard-library docstrings) padded or cut to the length.'
      ' Times: median of the runs after 3 warm-up calls, the variants interleaved;'
      ' best ratio: of the fastest runs. per-code decode: the quantized model with'
      ' every code unpacked to int32 and looked up one by one instead of one lookup'
      ' a byte (the same decoded weights bit for bit). kernels decode alone:'
      ' `jax.jit(pqjax.dequantize)` of the 37 encoder and pooler kernels (10.6M'
      ' weights, 42.5 MB as fp32), timed apart; in the model XLA fuses the'
      ' embedding tables\' decode into their row lookups, so only the kernels are'
      ' decoded in full each call. rel. error: ||h_q - h|| / ||h|| of the last'
      ' hidden states. allocator: each setting runs in its own process; "freed'
      ' memory kept" sets MALLOC_MMAP_THRESHOLD_=2^30 and MALLOC_TRIM_THRESHOLD_=2^31'
      ' so that XLA\'s large per-call buffers are reused instead of page-faulted in'
      ' again on every call.', '',
      '| batch x tokens | allocator | runs | fp32 ms | pqjax 4-bit ms | ratio |'
      ' best ratio | per-code decode ms | kernels decode alone ms | rel. error |',
      '|---|---|---|---|---|---|---|---|---|---|',
      *rows,
  ]
  publish('inference', lines)


if __name__ == '__main__':
  main()
