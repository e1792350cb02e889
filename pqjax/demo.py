"""The demo: quantize the bundled MiniLM and report what it did to the model."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pqjax import minilm, report, sizes
from pqjax.apply import wrap
from pqjax.qarray import QArray, is_qarray
from pqjax.quantize import quantize
from pqjax.tools import corpus
from pqjax.tree import path_str


@dataclasses.dataclass(frozen=True)
class Fidelity:
  """How one quantization of MiniLM compares with the float model."""

  label: str
  seconds: float
  relative_error: float
  mean_cosine: float
  min_cosine: float
  nbytes: int


@dataclasses.dataclass(frozen=True)
class Report:
  bits: int
  granularity: Any
  sentences: int
  float_nbytes: int
  exponents: list[tuple[str, tuple[int, ...], float]]
  rows: list[Fidelity]
  page: Path | None = None
  report: report.Report | None = None


def _fidelity(label: str, model: minilm.MiniLM, params_q: Any, seconds: float,
              text: minilm.Corpus, reference: np.ndarray) -> Fidelity:
  emb = minilm.embed_all(minilm.embed_fn(wrap(model.module.apply)), params_q, text)
  cos = minilm.cosines(reference, emb)
  return Fidelity(label=label, seconds=seconds,
                  relative_error=sizes.relative_error(model.params, params_q),
                  mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
                  nbytes=sizes.nbytes(params_q))


def run(bits: int = 4, granularity: Any = 'channel', sentences: int = 512,
        out: str | Path | None = None, report_sentences: int = 128) -> Report:
  """Quantizes MiniLM with pqjax, the paper's grid and uniform RTN; measures each.

  With ``out``, also writes the report folder there (:mod:`pqjax.report`), whose
  fidelity against bits uses ``report_sentences`` sentences.
  """
  model = minilm.load()
  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(sentences))
  reference = minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)

  rows = []
  results = {}
  for label, setting in (('pqjax (defaults)', 'pqjax'),
                         ('paper grid (no clipping)', 'paper'),
                         ('uniform RTN (exponent 1)', 'uniform')):
    start = time.perf_counter()
    options = {**report.SETTINGS[setting], 'granularity': granularity}
    params_q, alphas = quantize(model.params, bits, **options)
    jax.block_until_ready(params_q)
    seconds = time.perf_counter() - start
    results[label] = (params_q, alphas)
    rows.append(_fidelity(label, model, params_q, seconds, text, reference))

  params_q, _ = results['pqjax (defaults)']
  exponents = [(path_str(p), q.shape, float(q.alpha)) for p, q in
               jax.tree_util.tree_leaves_with_path(params_q, is_leaf=is_qarray)
               if isinstance(q, QArray)]
  folder = page = None
  if out is not None:
    folder = report.minilm_report(bits, granularity, report_sentences, model=model)
    page = report.write(folder, out)
  return Report(bits=bits, granularity=granularity, sentences=sentences,
                float_nbytes=sizes.nbytes(model.params), exponents=exponents,
                rows=rows, page=page, report=folder)


def format_report(report: Report) -> str:
  mb = 1e6
  lines = [f'pqjax demo: all-MiniLM-L6-v2 (FlaxBertModel), {report.bits} bits,'
           f' granularity {report.granularity}', '',
           'Exponent per quantized leaf:',
           f'  {"leaf":<58} {"shape":>13} {"exponent":>9}']
  lines += [f'  {p:<58} {str(s):>13} {a:9.4f}' for p, s, a in report.exponents]
  lines += ['', f'Fidelity against fp32 ({report.sentences} standard-library docstring'
            ' paragraphs, mean-pooled sentence embeddings):',
            f'  {"method":<28} {"rel. error":>11} {"mean cos":>9} {"min cos":>8}'
            f' {"MB":>7} {"quantize s":>11}',
            f'  {"fp32":<28} {0.0:11.5f} {1.0:9.4f} {1.0:8.4f}'
            f' {report.float_nbytes / mb:7.2f} {"":>11}']
  lines += [f'  {r.label:<28} {r.relative_error:11.5f} {r.mean_cosine:9.4f}'
            f' {r.min_cosine:8.4f} {r.nbytes / mb:7.2f} {r.seconds:11.2f}'
            for r in report.rows]
  pq, uni = report.rows[0], report.rows[-1]
  lines += ['', f'Reconstruction error of pqjax / uniform at {report.bits} bits:'
            f' {pq.relative_error / uni.relative_error:.3f}',
            f'Size: {report.float_nbytes / mb:.1f} MB fp32 -> {pq.nbytes / mb:.1f} MB'
            f' ({report.float_nbytes / pq.nbytes:.1f}x smaller)']
  if report.page is not None:
    lines += [f'Report with plots: {report.page}']
  return '\n'.join(lines)
