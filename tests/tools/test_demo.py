"""The demo end to end on the real MiniLM, on a few sentences."""

import pytest

from pqjax.tools import demo


@pytest.mark.slow
def test_demo_runs_and_ranks_the_methods():
  report = demo.run(bits=4, granularity=64, sentences=16, full=True)
  pqjax_row, paper, uniform = report.rows
  assert len(report.exponents) == 40
  # The defaults beat the paper's grid, which beats plain round-to-nearest.
  assert pqjax_row.relative_error < paper.relative_error < uniform.relative_error
  assert pqjax_row.mean_cosine > uniform.mean_cosine
  text = demo.format_report(report)
  assert 'pqjax (defaults)' in text and 'uniform RTN' in text


@pytest.mark.slow
def test_default_demo_embeds_only_pqjax_and_reports_progress():
  lines = []
  report = demo.run(bits=4, sentences=8, log=lines.append)
  pqjax_row, uniform = report.rows
  assert pqjax_row.relative_error < uniform.relative_error
  assert pqjax_row.mean_cosine > 0.9 and uniform.mean_cosine is None
  assert report.page is None and not report.full
  steps = ' '.join(lines)
  for step in (
    'loaded',
    'quantized: pqjax',
    'embedded 8 sentences',
    'quantized: uniform',
  ):
    assert step in steps, lines
  assert all(line.startswith('[') and ' s] ' in line for line in lines)
  assert '--full' in demo.format_report(report)
