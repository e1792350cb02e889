"""Group scales in 8 bits, or larger groups: which buys more accuracy per bit?

pqjax stores a group's scale as float16: ``16 / G`` bits a weight. llama.cpp's
k-quants store 6- or 8-bit scales relative to one float per super-block instead.
This benchmark measures that trade on MiniLM at 4 bits (every >= 2-D leaf):

- groups of G rows with float16 scales (pqjax today), G in 128, 64, 32;
- groups of G rows with 8-bit scales: each column keeps one float32 scale ``m``
  (its largest block scale) and each block an integer ``u`` in 1..255, the block
  scale being ``m * u / 255``, rounded up so that no weight is clipped more than
  the search chose; codes are then chosen again against the stored scale (the
  nearest level of the same table), as pqjax chooses them against float16 scales.

The 8-bit rows reuse each layer's exponent, table and clip ratio from the float16
run at the same G, so only the scale storage differs. Prints relative error, stored
bits per weight and the embedding cosine against fp32 on the fixed corpus.

    python benchmarks/scales.py [--sentences 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import jax
import numpy as np
from common import publish

import pqjax
from pqjax._src.core import grid, packing
from pqjax.tools import corpus, minilm


def eight_bit_scales(q: pqjax.QArray, w: np.ndarray) -> tuple[pqjax.QArray, int]:
  """``q`` with 8-bit block scales under a float32 per-column scale, re-encoded.

  Returns the new QArray (its scales stored as the float32 values they stand for)
  and the bytes the 8-bit form would store.
  """
  k, n = q.matrix_shape
  w = np.asarray(w, np.float32).reshape(k, n)
  s = np.asarray(q.scale, np.float32)  # (nk, n)
  nk = s.shape[0]
  m = s.max(axis=0, keepdims=True)
  u = np.clip(np.ceil(s / np.where(m > 0, m, 1) * 255), 1, 255)
  s8 = (m * u / 255).astype(np.float32)
  full = np.repeat(s8, q.block_rows, axis=0)[:k]
  table = np.asarray(q.table, np.float32)
  # The nearest level of the (ascending) table to each w / scale.
  x = np.where(full > 0, w / np.where(full > 0, full, 1), 0)
  mids = (table[1:] + table[:-1]) / 2
  index = np.searchsorted(mids, x).astype(np.int32)
  zero = grid.zero_code(table.shape[0])
  codes = packing.pack(jax.numpy.asarray(index - zero), q.bits, zero)
  out = dataclasses.replace(q, codes=codes, scale=jax.numpy.asarray(s8))
  stored = q.codes.size + nk * n + 4 * n + 4 + 4 * table.shape[0]
  return out, stored


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sentences', type=int, default=512)
  parser.add_argument('--groups', type=int, nargs='+', default=[128, 64, 32])
  args = parser.parse_args()

  model = minilm.load()
  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(args.sentences))
  embed = minilm.embed_fn(pqjax.wrap(model.module.apply))
  reference = minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)
  floats = {
    pqjax.path_str(p): np.asarray(x)
    for p, x in jax.tree_util.tree_leaves_with_path(model.params)
  }
  rows = []

  def record(label, params_q, stored_bytes, weights):
    emb = minilm.embed_all(embed, params_q, text)
    cos = minilm.cosines(reference, emb)
    err = pqjax.relative_error(model.params, params_q)
    bpw = 8 * stored_bytes / weights
    rows.append((label, err, bpw, float(cos.mean()), float(cos.min())))
    print(f'| {label} | {err:.5f} | {bpw:.3f} | {cos.mean():.4f} | {cos.min():.4f} |')

  for g in args.groups:
    start = time.perf_counter()
    params_q, _ = pqjax.quantize(model.params, 4, granularity=g)
    print(f'quantized, groups of {g}: {time.perf_counter() - start:.1f} s', flush=True)
    s = pqjax.summary(params_q)
    weights = sum(x.size for x in s.leaves)
    record(f'groups of {g}, float16 scales', params_q, s.quantized_after, weights)
    leaves = pqjax.quantized_leaves(params_q)
    stored = 0
    new = {}
    for path, q in leaves.items():
      new[path], b = eight_bit_scales(q, floats[path])
      stored += b
    params_8 = jax.tree_util.tree_map_with_path(
      lambda p, x, new=new: new.get(pqjax.path_str(p), x),
      params_q,
      is_leaf=lambda x: isinstance(x, pqjax.QArray),
    )
    record(f'groups of {g}, 8-bit scales', params_8, stored, weights)

  lines = [
    '# Group scales: float16, or 8 bits under a float32 column scale',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__}. `python'
    ' benchmarks/scales.py`.',
    '',
    'MiniLM (all-MiniLM-L6-v2), 4 bits, every >= 2-D leaf. Relative error'
    ' ||W - W_hat||^2 / ||W||^2 over those leaves; bits per weight count codes,'
    ' scales, exponents and tables; cosine of mean-pooled embeddings against fp32 on'
    f' {args.sentences} sentences of the fixed corpus.',
    '',
    '| scales | relative error | bits / weight | mean cosine | min cosine |',
    '|---|---|---|---|---|',
  ]
  lines += [
    f'| {label} | {e:.5f} | {b:.3f} | {c:.4f} | {lo:.4f} |' for label, e, b, c, lo in rows
  ]
  publish('scales', lines)


if __name__ == '__main__':
  main()
