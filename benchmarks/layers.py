"""Stacked layers: the error with ``layer_axes=1`` against one exponent and scale set.

Twelve 768 x 768 layers stacked in one (12, 768, 768) leaf, as ``nn.scan`` stores a
transformer's blocks, quantized at 4 bits per channel with the defaults:

- ``layer_axes=0`` (one matrix of 9216 x 768: one exponent, clip ratio and scale per
  column for all twelve layers), ``layer_axes=1`` (each layer its own), and the
  layers as twelve separate leaves (which ``layer_axes=1`` must equal bit for bit);
- two stacks: Gaussian layers whose spread grows 1.5 times a layer, and layers of the
  same spread but different distributions (Gaussian, Laplace, Student-t, uniform);
- the time of each (best of ``--repeats`` calls after a first, compiling one).

Run ``.venv/bin/python benchmarks/layers.py``; prints a table and writes
benchmarks/results/layers.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from common import publish

import pqjax

LAYERS, K, N, BITS = 12, 768, 768, 4


def growing(rng: np.random.Generator) -> np.ndarray:
  """Gaussian layers, layer i scaled by 1.5 ** i."""
  w = rng.standard_normal((LAYERS, K, N)).astype(np.float32)
  return w * (1.5 ** np.arange(LAYERS, dtype=np.float32))[:, None, None]


def mixed(rng: np.random.Generator) -> np.ndarray:
  """Unit-variance layers drawn from four distributions in turn."""
  draws = [
    lambda: rng.standard_normal((K, N)),
    lambda: rng.laplace(size=(K, N)) / np.sqrt(2),
    lambda: rng.standard_t(3, (K, N)) / np.sqrt(3),
    lambda: rng.uniform(-np.sqrt(3), np.sqrt(3), (K, N)),
  ]
  return np.stack([draws[i % 4]() for i in range(LAYERS)]).astype(np.float32)


def layer_errors(w: np.ndarray, decoded: np.ndarray) -> np.ndarray:
  """Relative error ``||W - W_hat||^2 / ||W||^2`` of each layer, float64."""
  d = (w.astype(np.float64) - decoded.astype(np.float64)).reshape(LAYERS, -1)
  return np.sum(d**2, axis=1) / np.sum(w.astype(np.float64).reshape(LAYERS, -1) ** 2, 1)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
  """``(result, best s of the calls after a first, compiling one)``."""
  out = jax.block_until_ready(fn())
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return out, best


def run(name: str, w: np.ndarray, repeats: int) -> tuple[list[str], list[str]]:
  separate = {f'{i:02d}': w[i] for i in range(LAYERS)}
  (q0, _), warm0 = timed(lambda: pqjax.quantize({'w': w}, BITS), repeats)
  (q1, a1), warm1 = timed(lambda: pqjax.quantize({'w': w}, BITS, layer_axes=1), repeats)
  (qs, _), warms = timed(lambda: pqjax.quantize(separate, BITS), repeats)
  same = all(
    np.array_equal(np.asarray(getattr(q1['w'], f)[i]), np.asarray(getattr(qs[k], f)))
    for i, k in enumerate(separate)
    for f in ('codes', 'scale', 'alpha', 'table')
  )
  e0 = layer_errors(w, np.asarray(q0['w'].dequantize()))
  e1 = layer_errors(w, np.asarray(q1['w'].dequantize()))
  total = lambda e: float(
    np.sum(e * np.sum(w.astype(np.float64).reshape(LAYERS, -1) ** 2, 1))
    / np.sum(w.astype(np.float64) ** 2)
  )
  rows = [
    f'| {name} | layer_axes=0 | {total(e0):.5f} | {e0.mean():.5f} | {e0[0]:.5f} |'
    f' {e0.max():.5f} | 1 exponent | {warm0:.3f} |',
    f'| {name} | layer_axes=1 | {total(e1):.5f} | {e1.mean():.5f} | {e1[0]:.5f} |'
    f' {e1.max():.5f} | {a1["w"].min():.3f}..{a1["w"].max():.3f} | {warm1:.3f} |',
    f'| {name} | 12 separate leaves | (identical: {same}) | | | | | {warms:.3f} |',
  ]
  notes = [
    f'{name}: without layer axes the error is {total(e0) / total(e1):.2f}x over the'
    f' stack, {e0.mean() / e1.mean():.2f}x per layer on average and'
    f' {e0[0] / e1[0]:.2f}x on the first layer; layer_axes=1 equals 12 separate'
    f' leaves bit for bit: {same}; its time is {warm1 / warms:.2f}x theirs.',
  ]
  return rows, notes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows, notes = [], []
  for name, make in (('spread 1.5 ** i', growing), ('4 distributions', mixed)):
    r, n = run(name, make(rng), args.repeats)
    rows += r
    notes += n
  publish(
    'layers',
    [
      f'# Stacked layers: {LAYERS} x {K} x {N}, {BITS} bits per channel, defaults',
      '',
      f'Machine: {platform.platform()}, jax {jax.__version__}, CPU backend.'
      ' Relative error: ||W - W_hat||^2 / ||W||^2 over the stack ("stack"), the'
      ' mean of the layers\' own ("mean layer"), the first layer\'s and the worst'
      " layer's. Time: best of the calls after a first (compiling) one.",
      '',
      '| layers | quantized as | stack error | mean layer error | first layer |'
      ' worst layer | exponents | s |',
      '|---|---|---|---|---|---|---|---|',
      *rows,
      '',
      *notes,
    ],
  )


if __name__ == '__main__':
  main()
