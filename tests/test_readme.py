"""The README's quickstart runs as written, the docs site's copy is the same code,
and the README's relative links point at files that exist."""

import re
from pathlib import Path

import numpy as np
import pytest

import pqjax
from tests import reference as ref

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(text: str) -> list[str]:
  return re.findall(r'^```python\n(.*?)^```$', text, re.M | re.S)


def _quickstart(path: Path, heading: str) -> str:
  text = path.read_text()
  assert heading in text, f'{path.name} has no {heading!r}'
  return _python_blocks(text.split(heading, 1)[1])[0]


def _decoded(qa: pqjax.QArray) -> np.ndarray:
  """The weight of a QArray's stored codes and scales, decoded in NumPy."""
  assert qa.column_scale is None and qa.layer_axes == 0 and not qa.transposed
  k = qa.shape[0]
  return ref.decode_stored(
    np.asarray(qa.codes), np.asarray(qa.scale), np.asarray(qa.table), qa.bits, k
  )


def test_readme_and_docs_quickstart_match():
  readme = _quickstart(ROOT / 'README.md', '\n## Quickstart\n')
  docs = _quickstart(ROOT / 'docs' / 'quickstart.md', '# Quickstart\n')
  assert readme == docs


def test_readme_quickstart_runs(capsys: pytest.CaptureFixture[str]):
  namespace: dict = {}
  exec(_quickstart(ROOT / 'README.md', '\n## Quickstart\n'), namespace)
  params, params_q, alphas = (namespace[k] for k in ('params', 'params_q', 'alphas'))
  x, y, y_float = (np.asarray(namespace[k], np.float64) for k in ('x', 'y', 'y_float'))
  assert 'quantized leaves: 2' in capsys.readouterr().out

  w0 = _decoded(params_q['layers_0']['kernel'])
  w2 = _decoded(params_q['layers_2']['kernel'])
  b0 = np.asarray(params['layers_0']['bias'], np.float64)
  b2 = np.asarray(params['layers_2']['bias'], np.float64)
  reference = np.maximum(x @ w0 + b0, 0) @ w2 + b2
  np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(y_float, reference, rtol=1e-4, atol=1e-5)
  # 4 bits are close to the float weights, not equal to them.
  w = np.asarray(params['layers_0']['kernel'], np.float64)
  error = np.sum((w - w0) ** 2) / np.sum(w**2)
  assert 1e-4 < error < 0.02
  assert alphas['layers_0']['bias'] is None
  assert 0.05 <= float(alphas['layers_0']['kernel']) <= 2.0


def test_readme_links_resolve():
  text = (ROOT / 'README.md').read_text()
  links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', text)
  local = [link for link in links if '://' not in link]
  assert any(link.startswith('docs/') for link in local)
  missing = [link for link in local if not (ROOT / link).exists()]
  assert not missing, missing
