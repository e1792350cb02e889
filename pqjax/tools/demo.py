"""The demo: quantize the bundled MiniLM and report what it did to the model.

By default it shows its result within a minute on a small CPU: pqjax's defaults
against the float model on a few sentences, and against uniform round-to-nearest
by reconstruction error. ``full=True`` adds the paper's grid, every method's
embeddings on more sentences and, with ``out``, the report folder.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

import pqjax
from pqjax import quantize, wrap
from pqjax.tools import corpus, minilm, report

# Sentences for the embedding cosines: one batch by default, the README's 512 in full.
SENTENCES = 64
FULL_SENTENCES = 512

# label, setting in report.SETTINGS, whether the default demo embeds with it.
METHODS = (
  ('pqjax (defaults)', 'pqjax', True),
  ('paper grid (no clipping)', 'paper', False),
  ('uniform RTN (exponent 1)', 'uniform', False),
)
# What the default demo quantizes: the comparison with uniform costs little.
FAST_SETTINGS = ('pqjax', 'uniform')


@dataclasses.dataclass(frozen=True)
class Fidelity:
  """How one quantization of MiniLM compares with the float model.

  ``mean_cosine`` and ``min_cosine`` are None where the sentences were not embedded.
  """

  label: str
  seconds: float
  relative_error: float
  mean_cosine: float | None
  min_cosine: float | None
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Report:
  bits: int
  granularity: Any
  sentences: int
  float_nbytes: int
  exponents: list[tuple[str, tuple[int, ...], float]]
  rows: list[Fidelity]
  full: bool = False
  seconds: float = 0.0
  page: Path | None = None
  report: report.Report | None = None


class _Clock:
  """Elapsed time since the demo started, for its progress lines."""

  def __init__(self, log: Callable[[str], None] | None) -> None:
    self.start = time.perf_counter()
    self.log = log

  def __call__(self, message: str) -> None:
    if self.log is not None:
      self.log(f'[{time.perf_counter() - self.start:6.1f} s] {message}')


def run(
  bits: int = 4,
  granularity: Any = 'channel',
  sentences: int | None = None,
  out: str | Path | None = None,
  report_sentences: int = 128,
  full: bool = False,
  log: Callable[[str], None] | None = None,
) -> Report:
  """Quantizes MiniLM and measures it against the float model.

  Args:
    bits: code width.
    granularity: the scale blocks, as ``quantize``'s option.
    sentences: real sentences for the embedding cosines (default 64, or 512 with
      ``full``).
    out: a folder to write the report into (:mod:`pqjax.tools.report`), with its
      fidelity against bits on ``report_sentences`` sentences; None: no folder.
    report_sentences: sentences for the report's fidelity against bits.
    full: also the paper's grid, and embeddings for every method; by default
      pqjax's defaults are embedded and uniform RTN is compared by reconstruction
      error only.
    log: called with a line of progress at each step (e.g. ``print``).

  Returns:
    The measurements; :func:`format_report` prints them.
  """
  clock = _Clock(log)
  sentences = sentences or (FULL_SENTENCES if full else SENTENCES)
  clock('loading all-MiniLM-L6-v2')
  model = minilm.load()
  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(sentences))
  clock(
    f'loaded: {sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:.1f}M weights'
  )

  # One jitted program per model: every quantized tree reuses it.
  embed_float = minilm.embed_fn(model.module.apply)
  embed_q = minilm.embed_fn(wrap(model.module.apply))
  reference: np.ndarray | None = None
  rows, results = [], {}
  for label, setting, embedded in METHODS:
    if not full and setting not in FAST_SETTINGS:
      continue
    start = time.perf_counter()
    options = {**report.SETTINGS[setting], 'granularity': granularity}
    params_q, _ = quantize(model.params, bits, **options)
    jax.block_until_ready(params_q)
    seconds = time.perf_counter() - start
    results[setting] = params_q
    error = pqjax.relative_error(model.params, params_q)
    clock(f'quantized: {label}, {seconds:.1f} s, relative error {error:.5f}')
    cos = None
    if embedded or full:
      if reference is None:
        reference = minilm.embed_all(embed_float, model.params, text)
        clock(f'embedded {sentences} sentences with the float model')
      cos = minilm.cosines(reference, minilm.embed_all(embed_q, params_q, text))
      clock(f'embedded them with {label}: mean cosine {cos.mean():.4f}')
    rows.append(
      Fidelity(
        label=label,
        seconds=seconds,
        relative_error=error,
        mean_cosine=None if cos is None else float(cos.mean()),
        min_cosine=None if cos is None else float(cos.min()),
        nbytes=pqjax.nbytes(params_q),
      )
    )

  params_q = results['pqjax']
  exponents = [
    (p, q.shape, float(q.alpha)) for p, q in pqjax.quantized_leaves(params_q).items()
  ]
  folder = page = None
  if out is not None:
    clock(f'report: fidelity against bits {report.BITS} on {report_sentences} sentences')
    if report_sentences == sentences and reference is not None:
      rtext, rref = text, reference
    else:
      rtext = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(report_sentences))
      rref = minilm.embed_all(embed_float, model.params, rtext)
    embedder = report.Embedder(
      embed=lambda p: minilm.embed_all(embed_q, p, rtext),
      reference=rref,
      sentences=report_sentences,
    )
    folder = report.build(
      params_q,
      model.params,
      title=f'all-MiniLM-L6-v2 (FlaxBertModel), {bits} bits',
      options={'granularity': granularity},
      embedder=embedder,
    )
    page = report.write(folder, out)
    clock(f'wrote {page}')
  return Report(
    bits=bits,
    granularity=granularity,
    sentences=sentences,
    float_nbytes=pqjax.nbytes(model.params),
    exponents=exponents,
    rows=rows,
    full=full,
    seconds=time.perf_counter() - clock.start,
    page=page,
    report=folder,
  )


def _cos(x: float | None, width: int) -> str:
  return f'{"":>{width}}' if x is None else f'{x:{width}.4f}'


def format_report(report: Report) -> str:
  mb = 1e6
  lines = [
    f'pqjax demo: all-MiniLM-L6-v2 (FlaxBertModel), {report.bits} bits,'
    f' granularity {report.granularity}',
    '',
    'Exponent per quantized leaf:',
    f'  {"leaf":<58} {"shape":>13} {"exponent":>9}',
  ]
  lines += [f'  {p:<58} {str(s):>13} {a:9.4f}' for p, s, a in report.exponents]
  lines += [
    '',
    f'Fidelity against fp32 ({report.sentences} standard-library docstring'
    ' paragraphs, mean-pooled sentence embeddings):',
    f'  {"method":<28} {"rel. error":>11} {"mean cos":>9} {"min cos":>8}'
    f' {"MB":>7} {"quantize s":>11}',
    f'  {"fp32":<28} {0.0:11.5f} {1.0:9.4f} {1.0:8.4f}'
    f' {report.float_nbytes / mb:7.2f} {"":>11}',
  ]
  lines += [
    f'  {r.label:<28} {r.relative_error:11.5f} {_cos(r.mean_cosine, 9)}'
    f' {_cos(r.min_cosine, 8)} {r.nbytes / mb:7.2f} {r.seconds:11.2f}'
    for r in report.rows
  ]
  pq, uni = report.rows[0], report.rows[-1]
  lines += [
    '',
    f'Reconstruction error of pqjax / uniform at {report.bits} bits:'
    f' {pq.relative_error / uni.relative_error:.3f}',
    f'Size: {report.float_nbytes / mb:.1f} MB fp32 -> {pq.nbytes / mb:.1f} MB'
    f' ({report.float_nbytes / pq.nbytes:.1f}x smaller)',
  ]
  if report.page is not None:
    lines += [f'Report with plots: {report.page}']
  if not report.full:
    lines += [
      f'Done in {report.seconds:.0f} s. `python -m pqjax demo --full` adds the'
      f" paper's grid, every method's embeddings on {FULL_SENTENCES} sentences and"
      ' the report folder with plots.',
    ]
  return '\n'.join(lines)
