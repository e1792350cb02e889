"""The number of XLA compilations grows with the number of shapes, not of layers."""

import collections
import hashlib
import logging
import os
import re
import subprocess
import sys

import jax
import numpy as np

import pqjax
from pqjax._src import stages
from pqjax._src.search import fit

# The programs that make a pass over the weights, compiled per layer shape.
PASSES = ('group_stats', 'leaf_codes')


class _Compiles(logging.Handler):
  def __init__(self):
    super().__init__()
    self.names = collections.Counter()

  def emit(self, record):
    m = re.match(r'Finished XLA compilation of jit\((\w+)\)', record.getMessage())
    if m:
      self.names[m.group(1)] += 1


def _count_compiles(fn) -> collections.Counter:
  """Programs compiled while ``fn`` runs, by name."""
  handler = _Compiles()
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  with jax.log_compiles(True):
    try:
      fn()
    finally:
      logger.removeHandler(handler)
  return handler.names


def _passes(names: collections.Counter) -> int:
  return sum(names[p] for p in PASSES)


def _tree(layers_per_shape: int, shapes) -> dict:
  rng = np.random.default_rng(0)
  return {
    f'{i}_{j}': rng.standard_normal(s).astype(np.float32)
    for i, s in enumerate(shapes)
    for j in range(layers_per_shape)
  }


def test_compilations_are_bounded_by_shapes():
  # Programs that depend on no shape are compiled once, by whichever test comes
  # first: a first call here makes the counts below the same in any test order.
  pqjax.quantize(_tree(2, [(59, 29)]), 4)
  # Shapes no other test uses, so that nothing is cached yet.
  shapes = [(37, 11), (41, 13), (43, 17), (47, 19), (53, 23)]
  few = _count_compiles(lambda: pqjax.quantize(_tree(1, shapes), 4))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(_tree(10, shapes2), 4))
  # One statistics and one encoding pass a shape, and one search for the tree, with
  # 1 layer a shape as with 10.
  assert _passes(few) == _passes(many) == 2 * len(shapes), (few, many)
  for names in (few, many):
    assert names['search_stats'] <= 1 and names['refine_layers'] <= 1, names
    # Small programs on the (L,) exponents: a few, none per layer (other tests may
    # have compiled some of them already).
    assert sum(names.values()) - _passes(names) <= 20, names


def test_stacked_layers_compile_as_their_shapes():
  rng = np.random.default_rng(1)

  def stacks(layers, shapes):
    return {
      str(i): rng.standard_normal((layers, *s)).astype(np.float32)
      for i, s in enumerate(shapes)
    }

  pqjax.quantize(stacks(2, [(61, 3)]), 4, layer_axes=1)
  # Shapes no other test uses; each stack joins its shape's group.
  shapes = [(29, 7), (31, 9), (33, 5)]
  few = _count_compiles(lambda: pqjax.quantize(stacks(3, shapes), 4, layer_axes=1))
  shapes2 = [(s[0] + 2, s[1]) for s in shapes]
  many = _count_compiles(lambda: pqjax.quantize(stacks(41, shapes2), 4, layer_axes=1))
  # 41 layers a leaf compile like 3: one pass of each kind a shape.
  assert _passes(few) == _passes(many) == 2 * len(shapes), (few, many)
  assert sum(many.values()) - _passes(many) <= 20, many


# Every XLA compilation of this process, by program name (compilations in threads
# included, which the log of a context does not see).
_COMPILED: list[str] = []


def _on_event(event: str, duration_secs: float, **kwargs: str | int) -> None:
  del duration_secs
  if event == '/jax/core/compile/backend_compile_duration':
    _COMPILED.append(str(kwargs.get('fun_name')))


jax.monitoring.register_event_duration_secs_listener(_on_event)

_FRESH = r"""
import hashlib, sys
import jax, numpy as np
import pqjax
from pqjax._src import stages
from pqjax._src.search import fit
tree = dict(np.load(sys.argv[1]))
q = pqjax.quantize(tree, bits=(2, 5), bits_per_weight=float(sys.argv[2]))
h = hashlib.sha256(str(jax.tree_util.tree_structure(q)).encode())
for x in jax.tree_util.tree_leaves(q):
  h.update(np.asarray(x).tobytes())
print(h.hexdigest())
"""


def _digest(result) -> str:
  """``_FRESH``'s hash of a ``(params_q, alphas)`` result: every array and the
  trees' structure (which holds each QArray's width and shape)."""
  h = hashlib.sha256(str(jax.tree_util.tree_structure(result)).encode())
  for x in jax.tree_util.tree_leaves(result):
    h.update(np.asarray(x).tobytes())
  return h.hexdigest()


def test_another_budget_compiles_nothing_and_matches_a_fresh_process(tmp_path):
  rng = np.random.default_rng(7)
  # Shapes no other test uses, small enough for the exact refinement.
  tree = {
    'a': rng.standard_normal((71, 29)).astype(np.float32),
    'b': (rng.standard_t(3, (131, 27)) * 0.02).astype(np.float32),
    'c': rng.laplace(size=(83, 31)).astype(np.float32),
  }
  budgets = (3.0, 3.5, 2.5, 4.25)
  quantize = lambda bpw: pqjax.quantize(tree, bits=(2, 5), bits_per_weight=bpw)
  results = {budgets[0]: quantize(budgets[0])}
  for bpw in budgets[1:]:
    _COMPILED.clear()
    results[bpw] = quantize(bpw)
    # Copying a small decode table of a new shape to the device may compile a copy.
    assert set(_COMPILED) <= {'jit(stage)'}, (bpw, _COMPILED)
  widths = {
    bpw: {p: x.bits for p, x in pqjax.quantized_leaves(r[0]).items()}
    for bpw, r in results.items()
  }
  # Later budgets choose other widths, some of them widths the first did not use.
  assert all(widths[b] != widths[budgets[0]] for b in budgets[1:]), widths
  later = {bits for b in budgets[1:] for bits in widths[b].values()}
  assert later - set(widths[budgets[0]].values()), widths
  # Each result as a fresh process computes it, bit for bit.
  np.savez(tmp_path / 'tree.npz', **tree)
  children = [
    subprocess.Popen(
      [sys.executable, '-c', _FRESH, str(tmp_path / 'tree.npz'), str(bpw)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
    )
    for bpw in budgets
  ]
  for bpw, child in zip(budgets, children):
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-3000:]
    assert out.strip().splitlines()[-1] == _digest(results[bpw]), bpw


def test_a_budget_on_another_tree_compiles_no_search():
  rng = np.random.default_rng(8)
  options = dict(bits=(2, 5), bits_per_weight=3.0, clip=False)
  pqjax.quantize({'a': rng.standard_normal((67, 21)).astype(np.float32)}, **options)
  # More layers, of shapes no other test uses.
  other = {
    str(i): rng.laplace(size=(89 + 2 * i, 25)).astype(np.float32) for i in range(5)
  }
  _COMPILED.clear()
  pqjax.quantize(other, **options)
  # The width estimates and the searches at each width are programs of a chunk of
  # layers: only the passes over the new shapes (and the refinement of the tree's
  # small layers) compile.
  searches = {'jit(width_errors)', 'jit(search_widths)', 'jit(search_stats)'}
  assert not searches & set(_COMPILED), _COMPILED


def test_estimates_in_chunks_equal_one_program_for_all_layers():
  rng = np.random.default_rng(9)
  options = pqjax.QuantizeOptions(bits_per_weight=3.0)
  config, plan = options.search_config, stages.plan_of(options)
  layers = 2 * fit.CHUNK + 1  # a last chunk filled with empty layers
  stats = rng.random((layers, 2, config.bins, 2)).astype(np.float32)
  stats[:, :, : config.bins // 2] *= 50  # most weight on small magnitudes
  alpha, clip = rng.uniform(0.5, 1, (2, layers)).astype(np.float32)
  widths = (2, 4, 7)
  whole = fit.width_errors(
    stats,
    alpha,
    clip,
    np.zeros(layers, np.int32),
    widths=widths,
    grid=options.grid,
    plan=plan,
    config=config,
  )
  chunked = fit.estimate_each_width(
    stats, alpha, clip, widths=widths, grid=options.grid, plan=plan, config=config
  )
  for got, want in zip(chunked, whole):
    np.testing.assert_array_equal(got, np.asarray(want))
