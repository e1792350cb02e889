"""What every benchmark shares: printing its table and keeping it in results/."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


def publish(name: str, lines: list[str]) -> None:
  """Prints the report and writes it to ``benchmarks/results/<name>.md``."""
  text = '\n'.join(lines) + '\n'
  print(text)
  out = Path(__file__).parent / 'results' / f'{name}.md'
  out.parent.mkdir(exist_ok=True)
  out.write_text(text)


class Fidelity(NamedTuple):
  """What the MiniLM benchmarks measure against: the tokenized fixed corpus, the
  wrapped embedding function (``embed(params_q, text)``) and fp32's embeddings."""

  text: Any
  embed: Any
  reference: np.ndarray

  def cosines(self, params_q: Any) -> np.ndarray:
    """Each sentence's embedding cosine of ``params_q`` against fp32."""
    from pqjax.tools import minilm

    return minilm.cosines(
      self.reference, minilm.embed_all(self.embed, params_q, self.text)
    )


def minilm_fidelity(model: Any, sentences: int) -> Fidelity:
  """:class:`Fidelity` of ``model`` (``pqjax.tools.minilm.load()``) on ``sentences``
  sentences of the fixed corpus."""
  import pqjax
  from pqjax.tools import corpus, minilm

  text = minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(sentences))
  reference = minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)
  return Fidelity(text, minilm.embed_fn(pqjax.wrap(model.module.apply)), reference)
