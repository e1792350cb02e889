"""Group scales in 8 bits, or larger groups: which buys more accuracy per bit?

Float16 group scales cost ``16 / G`` bits a weight. llama.cpp's k-quants store 6-
or 8-bit scales relative to one float per super-block instead; pqjax can store each
block's scale as a uint8 number of steps of one float32 step per column
(``scale_dtype="uint8"``: ``8 / G + 32 / K`` bits a weight; the column's largest
block is 255 steps, every block rounds up to whole steps and its codes are chosen
against that scale). This benchmark measures the trade on MiniLM at 4 bits (every
>= 2-D leaf): groups of G rows with float16 scales, and with uint8 scales, G in
128, 64, 32; per-channel scales for reference. Prints relative error, stored bits
per weight (as ``pqjax.summary`` counts them), the embedding cosine against fp32
on the fixed corpus, and the quantization time.

    python benchmarks/scales.py [--sentences 512] [--groups 128 64 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
from common import minilm_fidelity, publish

import pqjax
from pqjax.tools import minilm


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sentences', type=int, default=512)
  parser.add_argument('--groups', type=int, nargs='+', default=[128, 64, 32])
  parser.add_argument('--bits', type=int, default=4)
  args = parser.parse_args()

  model = minilm.load()
  fidelity = minilm_fidelity(model, args.sentences)
  rows = []

  def record(label, granularity, scale_dtype):
    start = time.perf_counter()
    params_q, _ = pqjax.quantize(
      model.params, args.bits, granularity=granularity, scale_dtype=scale_dtype
    )
    seconds = time.perf_counter() - start
    s = pqjax.summary(params_q)
    bpw = 8 * s.quantized_after / sum(x.size for x in s.leaves)
    dtypes = sorted({x.scale_dtype for x in s.leaves})
    cos = fidelity.cosines(params_q)
    err = pqjax.relative_error(model.params, params_q)
    row = (
      label,
      '/'.join(dtypes),
      err,
      bpw,
      float(cos.mean()),
      float(cos.min()),
      seconds,
    )
    rows.append(row)
    print('| {} | {} | {:.5f} | {:.3f} | {:.4f} | {:.4f} | {:.1f} |'.format(*row))

  record('channel', 'channel', 'auto')
  for g in args.groups:
    record(f'groups of {g}', g, 'float16')
    record(f'groups of {g}', g, 'uint8')

  lines = [
    '# Group scales: float16, or uint8 steps of a float32 column scale',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__}. `python'
    f' benchmarks/scales.py --bits {args.bits}`.',
    '',
    f'MiniLM (all-MiniLM-L6-v2), {args.bits} bits, every >= 2-D leaf. Relative error'
    ' ||W - W_hat||^2 / ||W||^2 over those leaves; bits per weight count codes,'
    ' scales, column scales, exponents and tables (`pqjax.summary`); cosine of'
    ' mean-pooled embeddings against fp32 on'
    f' {args.sentences} sentences of the fixed corpus; seconds: `pqjax.quantize`'
    ' (compilation included where a shape is new: the uint8 rows run the programs'
    ' the float16 rows compiled, the storage being an input of them).',
    '',
    '| blocks | scales | relative error | bits / weight | mean cosine | min cosine'
    ' | seconds |',
    '|---|---|---|---|---|---|---|',
  ]
  lines += [
    '| {} | {} | {:.5f} | {:.3f} | {:.4f} | {:.4f} | {:.1f} |'.format(*r) for r in rows
  ]
  publish(f'scales_{args.bits}bit' if args.bits != 4 else 'scales', lines)


if __name__ == '__main__':
  main()
