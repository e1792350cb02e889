"""Accuracy of data-free 4-bit (and 2, 3, 8-bit) quantization of all-MiniLM-L6-v2.

For each bit width and granularity (tensor, channel, groups of 128 and 64 rows):
total relative reconstruction error ||W - W_hat||^2 / ||W||^2 over every >= 2-D leaf
(embeddings included), stored bits per weight (scales, exponents and tables
counted), and the mean and minimum cosine of mean-pooled sentence embeddings
against fp32 on real sentences, for:

- uniform round-to-nearest (``exponent=1.0``, the paper's symmetric grid, absmax),
- the paper's power grid (``grid="symmetric", clip=False``, exponent per layer),
- pqjax's full-code grid, without and with the clip ratio search, per-block clip
  ratios, and one exponent for the whole tree,
- an NF4 reference: the 16-level bitsandbytes NormalFloat codebook with absmax
  blocks of the same layout and float32 scales (4 bits only),
- qwix (optional: ``pip install qwix``) int4 and nf4 on the same FlaxBertModel,
  per channel and with tiles of 128 and 64 (4 bits only; qwix quantizes the inputs
  of matrix products, so the embedding tables stay fp32),
- the strongest data-free formats, as NumPy references (``references.py``, blocks
  along K): Q4_K-, Q3_K- and Q2_K-like k-quants (super-blocks of 256 rows), fitted
  with llama.cpp's weights and unweighted, and HQQ-like groups of 64 at 4, 3 and 2
  bits. Each runs when its bit width is asked; ``--methods`` picks them by name, so
  these rows alone cost a few minutes:

    python benchmarks/accuracy.py --bits 4 3 2 --no-qwix --name accuracy_references \\
        --methods Q4_K-like Q3_K-like Q2_K-like HQQ-like

Run:

    python benchmarks/accuracy.py [--bits 4] [--granularity channel 64] [--sentences 512]

Prints one table and writes benchmarks/results/accuracy.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import minilm_fidelity, publish
from references import hqq, q2_k, q3_k, q4_k

import pqjax
from pqjax.tools import minilm

# The bitsandbytes NF4 codebook (QLoRA): quantiles of a standard normal, rescaled.
NF4 = np.array(
  [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
  ],
  np.float32,
)

METHODS = {
  'uniform RTN': dict(exponent=1.0, grid='symmetric', clip=False),
  'paper grid': dict(grid='symmetric', clip=False),
  'full grid': dict(grid='full', clip=False),
  'full grid + clip (default)': dict(),
  'full grid + block clip': dict(clip='block'),
  'full grid + clip, global exponent': dict(exponent='global'),
}
# At 2, 3 and 8 bits the table keeps the references and the two clip modes.
OTHER_BITS = (
  'uniform RTN',
  'paper grid',
  'full grid + clip (default)',
  'full grid + block clip',
)
# Groups of 32 rows (k-quants' blocks) with uint8 scales stay under 4.5 bits per
# weight, the budget of NF4 with float32 scales per 64.
EXTRA_4BIT = {32: ('full grid + clip (default)', 'full grid + block clip')}
# (bits, layout, name, variant, NumPy quantizer of a (K, N) matrix -> (decoded,
# bits/weight)). Layout 256/32: super-blocks of 256 rows, sub-blocks of 32. The
# k-quants fit with llama.cpp's weights of the squared error, and without weights,
# which gives MiniLM lower errors.
_UNWEIGHTED = {'weights': 'ones'}
REFERENCES = (
  (4, '256/32', 'Q4_K-like', "llama.cpp's weights", q4_k),
  (4, '256/32', 'Q4_K-like', 'unweighted', functools.partial(q4_k, **_UNWEIGHTED)),
  (3, '256/16', 'Q3_K-like', "llama.cpp's weights", q3_k),
  (3, '256/16', 'Q3_K-like', 'unweighted', functools.partial(q3_k, **_UNWEIGHTED)),
  (2, '256/16', 'Q2_K-like', "llama.cpp's weights", q2_k),
  (2, '256/16', 'Q2_K-like', 'unweighted', functools.partial(q2_k, **_UNWEIGHTED)),
  (4, 64, 'HQQ-like', 'l_p zero, fp16 scale and zero', hqq),
  (3, 64, 'HQQ-like', 'l_p zero, fp16 scale and zero', functools.partial(hqq, bits=3)),
  (2, 64, 'HQQ-like', 'l_p zero, fp16 scale and zero', functools.partial(hqq, bits=2)),
)


def _granularity(text: str) -> str | int:
  return text if text in ('tensor', 'channel') else int(text)


def _nf4_leaf(w: jax.Array, granularity: str | int) -> jax.Array:
  """NF4 fake-quantization of one leaf: absmax blocks, nearest codebook level."""
  shape = w.shape
  w2 = w.reshape(-1, shape[-1]).astype(jnp.float32)
  k, n = w2.shape
  g = {'tensor': k, 'channel': k}.get(granularity, granularity)
  nk = -(-k // g)
  rows = -(-k // nk)
  w3 = jnp.pad(w2, ((0, nk * rows - k), (0, 0))).reshape(nk, rows, n)
  m = jnp.max(jnp.abs(w3), axis=1, keepdims=True)
  if granularity == 'tensor':
    m = jnp.max(m, keepdims=True)
  x = w3 / jnp.where(m > 0, m, 1.0)
  mids = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
  idx = jnp.sum(x[..., None] >= mids, axis=-1)
  out = jnp.asarray(NF4)[idx] * m
  return out.reshape(-1, n)[:k].reshape(shape).astype(w.dtype)


def nf4(params: Any, granularity: str | int) -> tuple[Any, float]:
  """NF4-decoded params and their bits per weight (4 + 32-bit scales per block)."""
  leaves = [x for x in jax.tree_util.tree_leaves(params) if x.ndim >= 2]
  weights = sum(x.size for x in leaves)
  scales = 0
  for x in leaves:
    k, n = x.size // x.shape[-1], x.shape[-1]
    scales += {'tensor': 1, 'channel': n}.get(
      granularity, -(-k // max(granularity if isinstance(granularity, int) else 1, 1)) * n
    )
  out = jax.tree_util.tree_map(
    lambda x: _nf4_leaf(x, granularity) if x.ndim >= 2 else x, params
  )
  return out, 4 + 32 * scales / weights


def reference_params(
  params: Any, quantizer: Callable[[np.ndarray], tuple[np.ndarray, float]]
) -> tuple[Any, float]:
  """Every >= 2-D leaf through a NumPy reference as (K, N); its bits per weight."""
  bits = weights = 0.0

  def one(x):
    nonlocal bits, weights
    if x.ndim < 2:
      return x
    w = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    decoded, bpw = quantizer(w)
    bits += bpw * w.size
    weights += w.size
    return jnp.asarray(decoded.reshape(x.shape), x.dtype)

  out = jax.tree_util.tree_map(one, params)
  return out, bits / weights


def qwix_params(
  model: minilm.MiniLM, qtype: str, tile: int | None
) -> tuple[Callable[..., Any], Any, float]:
  """qwix PTQ of the FlaxBertModel: (apply_fn, quantized params, bits per weight)."""
  import qwix

  rule = dict(module_path='.*', weight_qtype=qtype)
  if tile:
    rule['tile_size'] = tile
  qmodel = qwix.quantize_model(
    model.module, qwix.PtqProvider([qwix.QuantizationRule(**rule)])
  )
  ids = jnp.ones((1, 16), jnp.int32)
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), ids, ids, ids))
  params_q = qwix.quantize_params(model.params, abstract['params'])
  weights = sum(x.size for x in jax.tree_util.tree_leaves(model.params) if x.ndim >= 2)
  # Every >= 2-D weight counted: qwix's stored codes (one a byte) and scales, and
  # the tables it keeps in fp32.
  stored = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params_q))
  small = sum(
    x.size * x.dtype.itemsize
    for x in jax.tree_util.tree_leaves(model.params)
    if x.ndim < 2
  )
  return qmodel.apply, params_q, 8 * (stored - small) / weights


def float_error(params: Any, decoded: Any) -> float:
  """``sum ||W - W_hat||^2 / sum ||W||^2`` over the >= 2-D leaves of two float trees."""
  num = den = 0.0
  leaves = jax.tree_util.tree_leaves
  for w, w_hat in zip(leaves(params), leaves(decoded)):
    if w.ndim >= 2:
      w = jnp.asarray(w, jnp.float32)
      w_hat = jnp.asarray(w_hat, jnp.float32).reshape(w.shape)
      num += float(jnp.sum(jnp.square(w - w_hat)))
      den += float(jnp.sum(jnp.square(w)))
  return num / den


def _qwix_dequantize(params_q: Any) -> Any:
  """qwix's quantized leaves (``WithAux``) decoded with ``qwix.dequantize``."""
  import qwix

  quantized = lambda x: hasattr(x, 'how') and hasattr(x, 'array')
  return jax.tree_util.tree_map(
    lambda x: qwix.dequantize(x.array) if quantized(x) else x, params_q, is_leaf=quantized
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--bits', type=int, nargs='+', default=[4, 2, 3, 8])
  parser.add_argument(
    '--granularity', type=_granularity, nargs='+', default=['tensor', 'channel', 128, 64]
  )
  parser.add_argument('--sentences', type=int, default=512)
  parser.add_argument(
    '--methods', nargs='*', default=None, help='subset of the method names (default: all)'
  )
  parser.add_argument(
    '--budgets',
    type=float,
    nargs='*',
    default=[2.5, 3.0, 3.5, 4.0, 4.25],
    help='bits per weight of the bit-budget rows (none: skip them)',
  )
  parser.add_argument(
    '--budget-granularity',
    type=_granularity,
    nargs='+',
    default=['channel'],
    help='scale blocks of the bit-budget rows',
  )
  parser.add_argument('--no-qwix', action='store_true')
  parser.add_argument('--name', default='accuracy')
  args = parser.parse_args()

  model = minilm.load()
  text, embed, reference = minilm_fidelity(model, args.sentences)

  rows = []

  def record(bits, gran, method, err, bpw, emb, seconds):
    cos = minilm.cosines(reference, emb)
    rows.append(
      (bits, str(gran), method, err, bpw, float(cos.mean()), float(cos.min()), seconds)
    )
    print(
      f'| {bits} | {gran} | {method} | {err:.5f} | {bpw:.3f} | {cos.mean():.4f} |'
      f' {cos.min():.4f} | {seconds:.2f} |',
      flush=True,
    )

  for bits in args.bits:
    grans = list(args.granularity) + (list(EXTRA_4BIT) if bits == 4 else [])
    for gran in grans:
      names = EXTRA_4BIT.get(gran) or (METHODS if bits == 4 else OTHER_BITS)
      names = [m for m in names if not args.methods or m in args.methods]
      for name in names:
        start = time.perf_counter()
        params_q, _ = pqjax.quantize(
          model.params, bits, granularity=gran, **METHODS[name]
        )
        jax.block_until_ready(params_q)
        seconds = time.perf_counter() - start
        s = pqjax.summary(params_q)
        record(
          bits,
          gran,
          name,
          pqjax.relative_error(model.params, params_q),
          s.bits_per_weight,
          minilm.embed_all(embed, params_q, text),
          seconds,
        )
      if (
        bits == 4
        and gran not in EXTRA_4BIT
        and (not args.methods or 'NF4 reference' in args.methods)
      ):
        start = time.perf_counter()
        params_nf4, bpw = nf4(model.params, gran)
        jax.block_until_ready(params_nf4)
        seconds = time.perf_counter() - start
        record(
          bits,
          gran,
          'NF4 reference (absmax, fp32 scales)',
          float_error(model.params, params_nf4),
          bpw,
          minilm.embed_all(embed, params_nf4, text),
          seconds,
        )
  for budget, gran in itertools.product(args.budgets, args.budget_granularity):
    # Each leaf's width chosen in 2..8 for the budget.
    start = time.perf_counter()
    params_q, _ = pqjax.quantize(model.params, bits_per_weight=budget, granularity=gran)
    jax.block_until_ready(params_q)
    seconds = time.perf_counter() - start
    s = pqjax.summary(params_q)
    widths = ' '.join(f'{b}:{n}' for b, n in s.widths.items())
    record(
      f'budget {budget}',
      gran,
      f'pqjax bit budget (widths: leaves {widths})',
      pqjax.relative_error(model.params, params_q),
      s.bits_per_weight,
      minilm.embed_all(embed, params_q, text),
      seconds,
    )
  for bits, layout, name, variant, quantizer in REFERENCES:
    if bits in args.bits and (not args.methods or name in args.methods):
      start = time.perf_counter()
      params_ref, bpw = reference_params(model.params, quantizer)
      seconds = time.perf_counter() - start
      record(
        bits,
        layout,
        f'{name} (NumPy reference, {variant})',
        float_error(model.params, params_ref),
        bpw,
        minilm.embed_all(embed, params_ref, text),
        seconds,
      )
  if 4 in args.bits and not args.no_qwix:
    try:
      import qwix  # noqa: F401
    except ImportError:
      print('qwix is not installed: skipped')
    else:
      qwix_embed = None
      for qtype in ('int4', 'nf4'):
        for tile, gran in ((None, 'channel'), (128, 128), (64, 64)):
          if gran not in args.granularity:
            continue
          start = time.perf_counter()
          apply_fn, params_q, bpw = qwix_params(model, qtype, tile)
          jax.block_until_ready(params_q)
          seconds = time.perf_counter() - start
          qwix_embed = minilm.embed_fn(apply_fn)
          record(
            4,
            gran,
            f'qwix {qtype} (embeddings fp32)',
            float_error(model.params, _qwix_dequantize(params_q)),
            bpw,
            minilm.embed_all(qwix_embed, params_q, text),
            seconds,
          )

  lines = [
    '# MiniLM accuracy (all-MiniLM-L6-v2, FlaxBertModel)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python'
    f' {platform.python_version()}, jax {jax.__version__}.',
    '',
    f'Every >= 2-D leaf quantized (37 kernels and embedding tables, 22.7M weights),'
    f' except where said. Relative error = ||W - W_hat||^2 / ||W||^2 summed over'
    f' those leaves. Bits per weight count codes, scales, exponents and tables'
    f' (pqjax groups store uint8 scales under a float32 step per column where a'
    f' column has 5 or more groups, float16 scales otherwise). The k-quant and HQQ'
    f' rows are the NumPy'
    f' references of benchmarks/references.py (blocks along K; float16 super-block'
    f' numbers, zeros and scales). Cosine: mean-pooled embeddings of'
    f' {args.sentences} first paragraphs of Python standard-library docstrings,'
    f' against fp32. Seconds: quantization time in this run (compilation included'
    f' the first time a shape is seen).',
    '',
    '| bits | granularity | method | relative error | bits / weight | mean cosine |'
    ' min cosine | seconds |',
    '|---|---|---|---|---|---|---|---|',
  ]
  lines += [
    f'| {b} | {g} | {m} | {e:.5f} | {w:.3f} | {c:.4f} | {lo:.4f} | {t:.2f} |'
    for b, g, m, e, w, c, lo, t in rows
  ]
  publish(args.name, lines)


if __name__ == '__main__':
  main()
