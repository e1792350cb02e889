"""The demo end to end on the real MiniLM, on a few sentences."""

import pytest

from pqjax.tools import demo


@pytest.mark.slow
def test_demo_runs_and_ranks_the_methods():
  report = demo.run(bits=4, granularity=64, sentences=16)
  pqjax_row, paper, uniform = report.rows
  assert len(report.exponents) == 40
  # The defaults beat the paper's grid, which beats plain round-to-nearest.
  assert pqjax_row.relative_error < paper.relative_error < uniform.relative_error
  assert pqjax_row.mean_cosine > uniform.mean_cosine
  text = demo.format_report(report)
  assert 'pqjax (defaults)' in text and 'uniform RTN' in text
