"""Report folders: PNGs that decode and are not blank, tables that match the library."""

import re

import jax
import matplotlib.image
import numpy as np
import pytest

import pqjax
from pqjax import path_str
from pqjax._src.core.qarray import is_qarray
from pqjax.tools import cli, minilm, report
from tests import reference

PNGS = (
  'error_vs_exponent.png',
  'histograms.png',
  'exponents.png',
  'fidelity_vs_bits.png',
)


def check_png(path, min_size=(200, 300)):
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1]
  colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
  assert len(colours) > 16, f'{path} is blank ({len(colours)} colours)'


def terminal_rows(text):
  """``{path: (exponent, error, bytes before, bytes after)}`` of the rich table."""
  rows = {}
  for line in text.splitlines():
    cells = line.split()
    if len(cells) == 7 and re.fullmatch(r'[\d.]+', cells[3]):
      rows[cells[0]] = (float(cells[3]), cells[4], cells[5], cells[6])
  return rows


def markdown_rows(text, first):
  """Rows of the Markdown table whose header starts with ``first``."""
  lines = text.splitlines()
  start = lines.index(next(x for x in lines if x.startswith(f'| {first} |')))
  rows = []
  for line in lines[start + 2 :]:
    if not line.startswith('|'):
      break
    rows.append([c.strip() for c in line.strip('|').split('|')])
  return rows


def numpy_error(w, q):
  """||W - W_hat||^2 / ||W||^2 in float64."""
  w = np.asarray(w, np.float64)
  w_hat = np.asarray(q.dequantize(), np.float64)
  return float(np.sum((w - w_hat) ** 2) / np.sum(w**2))


def qleaves(tree):
  return {
    path_str(p): x
    for p, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qarray)
    if isinstance(x, pqjax.QArray)
  }


def check_tables(out_text, page_text, params, params_q, alphas):
  """The terminal and Markdown tables against quantize, summary and NumPy errors."""
  q = qleaves(params_q)
  floats = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want_alpha = {
    path_str(p): a
    for p, a in jax.tree_util.tree_leaves_with_path(alphas)
    if a is not None
  }
  sizes = {x.path: x for x in pqjax.summary(params_q).leaves}
  printed = terminal_rows(out_text)
  assert set(printed) == set(q) == set(want_alpha)
  for path, (exponent, error, before, after) in printed.items():
    assert exponent == pytest.approx(want_alpha[path], abs=5.1e-5), path
    assert float(error) == pytest.approx(numpy_error(floats[path], q[path]), rel=2e-3)
    assert int(before.replace(',', '')) == sizes[path].bytes_before
    assert int(after.replace(',', '')) == sizes[path].bytes_after == q[path].nbytes
  md = {r[0]: r for r in markdown_rows(page_text, 'layer')}
  assert set(md) == set(q)
  for path, (exponent, error, before, after) in printed.items():
    assert md[path][3:] == [f'{exponent:.4f}', error, before, after]
  total = sum(int(r[6].replace(',', '')) for r in md.values())
  assert total == sum(x.nbytes for x in q.values())
  assert f'-> {pqjax.nbytes(params_q):,} bytes' in out_text.replace('\n', ' ')


@pytest.fixture(scope='module')
def model():
  return minilm.load()


@pytest.mark.slow
def test_minilm_report(model, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(minilm, 'load', lambda: model)
  monkeypatch.setenv('COLUMNS', '220')
  out = tmp_path / 'rep'
  # Two bit widths keep CI short; the default is 2, 3, 4 and 8.
  assert (
    cli.main(['report', '--out', str(out), '--sentences', '8', '--fidelity-bits', '3,4'])
    == 0
  )
  text = capsys.readouterr().out
  for name in PNGS:
    check_png(out / name)
  page = (out / 'report.md').read_text()
  for name in PNGS:
    assert f']({name})' in page
  params_q, alphas = pqjax.quantize(model.params, 4)
  check_tables(text, page, model.params, params_q, alphas)
  assert len(terminal_rows(text)) == 40

  fid = {(r[0], int(r[1])): r for r in markdown_rows(page, 'setting')}
  assert set(fid) == {(s, b) for s in report.SETTINGS for b in (3, 4)}
  # Each setting's 4-bit row against quantize and a NumPy error over the quantized
  # leaves.
  floats = jax.tree_util.tree_leaves(model.params)
  for name, options in report.SETTINGS.items():
    pq = params_q if not options else pqjax.quantize(model.params, 4, **options)[0]
    pairs = [
      (np.asarray(f, np.float64), np.asarray(q.dequantize(), np.float64))
      for f, q in zip(floats, jax.tree_util.tree_leaves(pq, is_leaf=is_qarray))
      if isinstance(q, pqjax.QArray)
    ]
    num = sum(np.sum((f - d) ** 2) for f, d in pairs)
    den = sum(np.sum(f**2) for f, _ in pairs)
    row = fid[(name, 4)]
    assert float(row[2]) == pytest.approx(num / den, rel=2e-3)
    assert int(row[3].replace(',', '')) == pqjax.nbytes(pq)
  cos = {k: float(r[4]) for k, r in fid.items()}
  assert all(-1 <= c <= 1 for c in cos.values())
  for name in report.SETTINGS:
    assert 0.8 < cos[(name, 4)] < 1 and cos[(name, 4)] > cos[(name, 3)]
  # The paper's finding on real sentences: the searched exponent beats uniform.
  assert cos[('paper', 4)] > cos[('uniform', 4)]
  assert float(fid[('paper', 4)][2]) < float(fid[('uniform', 4)][2])


@pytest.fixture
def small(tmp_path):
  rng = np.random.default_rng(0)
  params = {
    'dense': {
      'kernel': rng.standard_normal((64, 32)).astype(np.float32),
      'bias': np.zeros(32, np.float32),
    },
    'out': {'kernel': rng.laplace(size=(32, 8)).astype(np.float32)},
    'embed': rng.standard_normal((16, 32)).astype(np.float32) ** 3,
  }
  params_q, alphas = pqjax.quantize(params, 4)
  pqjax.save_safetensors(tmp_path / 'q.safetensors', params_q)
  pqjax.save_safetensors(tmp_path / 'f.safetensors', params)
  return params, params_q, alphas, tmp_path


def test_checkpoint_report_with_floats(small, capsys, monkeypatch):
  params, params_q, alphas, tmp = small
  monkeypatch.setenv('COLUMNS', '200')
  out = tmp / 'rep'
  assert (
    cli.main(
      [
        'report',
        str(tmp / 'q.safetensors'),
        '--float',
        str(tmp / 'f.safetensors'),
        '--out',
        str(out),
        '--fidelity-bits',
        '3,4',
      ]
    )
    == 0
  )
  text = capsys.readouterr().out
  for name in PNGS:
    check_png(out / name)
  page = (out / 'report.md').read_text()
  check_tables(text, page, params, params_q, alphas)
  rows = markdown_rows(page, 'setting')
  assert {(r[0], r[1]) for r in rows} == {
    (s, b) for s in report.SETTINGS for b in ('3', '4')
  }
  assert 'mean cosine' not in page


def test_checkpoint_report_without_floats(small, capsys, monkeypatch):
  _, params_q, _, tmp = small
  monkeypatch.setenv('COLUMNS', '200')
  out = tmp / 'rep'
  assert cli.main(['report', str(tmp / 'q.safetensors'), '--out', str(out)]) == 0
  text = capsys.readouterr().out
  assert sorted(p.name for p in out.glob('*.png')) == ['exponents.png', 'histograms.png']
  for p in out.glob('*.png'):
    check_png(p)
  rows = {r[0]: r for r in markdown_rows((out / 'report.md').read_text(), 'layer')}
  for path, q in qleaves(params_q).items():
    assert rows[path][3] == f'{float(q.alpha):.4f}' and rows[path][4] == 'n/a'
    assert path in text


def test_error_curves_match_numpy(small):
  params = small[0]
  params_q, _ = pqjax.quantize(params, 4, **report.SETTINGS['paper'])
  options = {k: v for k, v in report.SETTINGS['paper'].items() if k != 'exponent'}
  weights = {
    'dense/kernel': params['dense']['kernel'],
    'out/kernel': params['out']['kernel'],
  }
  curves = report.error_curves(weights, params_q, list(weights), options, points=9)
  q = qleaves(params_q)
  for c in curves:
    w = weights[c.path]
    for a, e in zip(c.exponents, c.errors):
      want = reference.power_error(w, a, 4) / float(np.sum(w.astype(np.float64) ** 2))
      assert e == pytest.approx(want, rel=1e-4)
    assert c.chosen == float(q[c.path].alpha)
    # The search's exponent is at least as good as every point of the grid.
    assert c.chosen_error <= c.errors.min() * (1 + 1e-4)


@pytest.fixture
def stacked(tmp_path):
  rng = np.random.default_rng(1)
  spread = (2.0 ** np.arange(3, dtype=np.float32))[:, None, None]
  params = {
    'scan': {'kernel': rng.laplace(size=(3, 48, 24)).astype(np.float32) ** 3 * spread},
    'head': rng.standard_normal((24, 8)).astype(np.float32),
    'embed': rng.standard_normal((16, 24)).astype(np.float32),
  }
  axes = lambda path, leaf: 1 if path == 'scan/kernel' else 0
  return params, axes, tmp_path


def test_stacked_layers_are_sampled_one_by_one(stacked):
  params, axes, _ = stacked
  params_q, alphas = pqjax.quantize(
    params, 4, layer_axes=axes, **report.SETTINGS['paper']
  )
  names = report.sample(params_q, n=10)
  layers = ['scan/kernel[0]', 'scan/kernel[1]', 'scan/kernel[2]']
  assert sorted(names) == ['embed', 'head', *layers]
  options = {k: v for k, v in report.SETTINGS['paper'].items() if k != 'exponent'}
  weights = {'scan/kernel': params['scan']['kernel']}
  picked = ['scan/kernel[0]', 'scan/kernel[2]']
  curves = report.error_curves(weights, params_q, picked, options, points=7)
  for c, i in zip(curves, (0, 2)):
    w = params['scan']['kernel'][i]
    for a, e in zip(c.exponents, c.errors):
      want = reference.power_error(w, a, 4) / float(np.sum(w.astype(np.float64) ** 2))
      assert e == pytest.approx(want, rel=1e-4)
    assert c.path == picked[i // 2] and c.chosen == float(alphas['scan']['kernel'][i])
    assert c.chosen_error <= c.errors.min() * (1 + 1e-4)
  (h,) = report.histograms(weights, params_q, ['scan/kernel[1]'])
  w = params['scan']['kernel'][1]
  np.testing.assert_allclose(
    h.values, (w / np.abs(w).max(axis=0, keepdims=True)).ravel(), rtol=1e-6
  )
  assert h.exponent == float(alphas['scan']['kernel'][1]) and h.levels.shape == (15,)


def test_checkpoint_report_on_stacked_layers(stacked, capsys, monkeypatch):
  params, axes, tmp = stacked
  monkeypatch.setenv('COLUMNS', '200')
  params_q, alphas = pqjax.quantize(params, 4, layer_axes=axes)
  pqjax.save_safetensors(tmp / 'q.safetensors', params_q)
  pqjax.save_safetensors(tmp / 'f.safetensors', params)
  out, bare = tmp / 'rep', tmp / 'bare'
  argv = ['report', str(tmp / 'q.safetensors'), '--fidelity-bits', '4', '--out']
  assert cli.main([*argv, str(out), '--float', str(tmp / 'f.safetensors')]) == 0
  assert cli.main([*argv, str(bare)]) == 0
  for name in PNGS:
    check_png(out / name)
  assert sorted(p.name for p in bare.glob('*.png')) == ['exponents.png', 'histograms.png']
  a = alphas['scan']['kernel']
  for folder in (out, bare):
    rows = {r[0]: r for r in markdown_rows((folder / 'report.md').read_text(), 'layer')}
    assert rows['scan/kernel'][3] == f'{a.min():.4f}..{a.max():.4f}'
    assert rows['head'][3] == f'{alphas["head"]:.4f}'
  # The stacked leaf's error is over all its layers.
  rows = {r[0]: r for r in markdown_rows((out / 'report.md').read_text(), 'layer')}
  want = numpy_error(params['scan']['kernel'], params_q['scan']['kernel'])
  assert float(rows['scan/kernel'][4]) == pytest.approx(want, rel=2e-3)
  text = capsys.readouterr().out
  assert text.count(f'{a.min():.4f}..{a.max():.4f}') == 2


def test_missing_extra_is_one_line(monkeypatch, capsys):
  import builtins

  real = builtins.__import__

  def no_matplotlib(name, *args, **kwargs):
    if name == 'matplotlib' or name.startswith('matplotlib.'):
      raise ImportError('no matplotlib')
    return real(name, *args, **kwargs)

  monkeypatch.setattr(builtins, '__import__', no_matplotlib)
  assert cli.main(['report', 'whatever.safetensors']) == cli.EXIT_ERROR
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'pqjax[report]' in err


def test_settings():
  # Uniform and paper share the paper's grid; they differ only in the exponent.
  uniform, paper = report.SETTINGS['uniform'], report.SETTINGS['paper']
  assert uniform['exponent'] == 1.0 and paper['exponent'] == 'layer'
  assert {k: v for k, v in uniform.items() if k != 'exponent'} == {
    k: v for k, v in paper.items() if k != 'exponent'
  }
  assert report.SETTINGS['pqjax'] == {}


def test_checkpoint_report_draws_the_widths_of_a_budget(tmp_path, capsys, monkeypatch):
  rng = np.random.default_rng(1)
  params = {
    'a': rng.standard_normal((256, 128)).astype(np.float32),
    'b': rng.laplace(size=(512, 64)).astype(np.float32),
    'c': (rng.standard_normal((128, 96)) ** 3).astype(np.float32),
  }
  # A narrow range: a budget compiles the encoding at every width of it.
  params_q, _ = pqjax.quantize(params, bits=(3, 5), bits_per_weight=4.4)
  s = pqjax.summary(params_q)
  assert len(s.widths) > 1
  pqjax.save_safetensors(tmp_path / 'q.safetensors', params_q)
  monkeypatch.setenv('COLUMNS', '200')
  out = tmp_path / 'rep'
  assert cli.main(['report', str(tmp_path / 'q.safetensors'), '--out', str(out)]) == 0
  capsys.readouterr()
  check_png(out / 'widths.png')
  page = (out / 'report.md').read_text()
  assert '](widths.png)' in page
  assert f'Widths: {s.widths_text()}.' in page
