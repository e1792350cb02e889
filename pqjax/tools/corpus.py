"""Real English text with no download: first paragraphs of standard-library docstrings.

The sentences are stored in ``data/stdlib_sentences.txt``, written once by
``scripts/make_corpus.py`` in a clean interpreter, so every call in every process
returns the same list whatever was imported before.
"""

from __future__ import annotations

import functools
from importlib import resources

_FILE = 'stdlib_sentences.txt'


@functools.cache
def _stored() -> tuple[str, ...]:
  text = (
    resources.files('pqjax.tools').joinpath('data', _FILE).read_text(encoding='utf-8')
  )
  # Lines starting with '#' are the header; a sentence never starts with one.
  return tuple(line for line in text.split('\n') if line and not line.startswith('#'))


def available() -> int:
  """How many sentences are stored (the largest ``n`` of ``stdlib_sentences``)."""
  return len(_stored())


def stdlib_sentences(n: int = 512) -> list[str]:
  """The first ``n`` stored docstring paragraphs: distinct, non-empty, fixed order.

  Args:
    n: how many sentences, 1 to ``available()``.

  Returns:
    A new list of ``n`` one-line sentences, the same in every call and process.
  """
  if isinstance(n, bool) or not isinstance(n, int):
    raise TypeError(f'n must be an int, got {type(n).__name__}')
  stored = _stored()
  if not 1 <= n <= len(stored):
    raise ValueError(
      f'n must be between 1 and {len(stored)} (the stored sentences), got {n}'
    )
  return list(stored[:n])
