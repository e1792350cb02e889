"""Bit budgets: the allocation against brute force, and quantize(bits_per_weight=...)."""

import itertools
import math
from fractions import Fraction

import jax
import numpy as np
import pytest

import pqjax
from pqjax._src import budget, widths
from pqjax._src import quantize as quantize_lib
from pqjax._src.options import QuantizeOptions


def brute_force(costs, damages, limit):
  """The least summed damage over every assignment within ``limit``, and one such."""
  best, arg = math.inf, None
  for choice in itertools.product(*[range(len(c)) for c in costs]):
    cost = sum(c[i] for c, i in zip(costs, choice))
    if cost > limit:
      continue
    damage = sum(d[i] for d, i in zip(damages, choice))
    if damage < best:
      best, arg = damage, choice
  return best, arg


@pytest.mark.parametrize('seed', range(12))
def test_allocation_is_optimal_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  items = rng.integers(2, 6)
  options = rng.integers(2, 5)
  costs, damages = [], []
  for _ in range(items):
    c = np.sort(rng.integers(1, 40, options)).astype(np.float64)
    if rng.random() < 0.3:
      c[rng.integers(options)] = np.inf  # a width the leaf cannot take
    if np.all(np.isinf(c)):
      c[0] = 5.0
    costs.append(c)
    damages.append(rng.uniform(0, 1, options) * (1 if seed % 2 else 10))
  finite = [c[np.isfinite(c)] for c in costs]
  lo, hi = sum(f.min() for f in finite), sum(f.max() for f in finite)
  for limit in np.linspace(lo, hi, 7).astype(int):
    want, _ = brute_force(costs, damages, limit)
    got = budget.allocate(costs, damages, int(limit))
    assert sum(c[i] for c, i in zip(costs, got)) <= limit
    assert np.isclose(sum(d[i] for d, i in zip(damages, got)), want, rtol=1e-12)


def test_allocation_ties_and_errors():
  # Equal damages: the cheaper choice, deterministically.
  got = budget.allocate([np.array([1.0, 2.0])] * 3, [np.array([1.0, 1.0])] * 3, 100)
  assert got.tolist() == [0, 0, 0]
  with pytest.raises(ValueError, match='no choice fits'):
    budget.allocate([np.array([5.0, 6.0])], [np.array([1.0, 0.0])], 4)


def test_thinned_frontier_stays_within_the_budget():
  rng = np.random.default_rng(3)
  costs = [np.sort(rng.integers(100, 10_000, 7)).astype(float) for _ in range(12)]
  damages = [np.sort(rng.uniform(0, 1, 7))[::-1] for _ in range(12)]
  limit = int(sum(c[3] for c in costs))
  exact = budget.allocate(costs, damages, limit)
  thin = budget.allocate(costs, damages, limit, max_frontier=64)
  value = lambda ch: sum(d[i] for d, i in zip(damages, ch))
  assert sum(c[i] for c, i in zip(costs, thin)) <= limit
  # Each of the 12 thinnings costs at most one span of limit / 64 bytes: the thinned
  # result is at least as good as the exact one with 12 spans less.
  smaller = budget.allocate(costs, damages, limit - 12 * math.ceil(limit / 64))
  assert value(exact) <= value(thin) <= value(smaller)
  assert value(smaller) > value(exact)  # the bound is not trivially loose


@pytest.mark.parametrize('bpw', [0.1, 1 / 3, 3.5, 4.123456789, 8.0])
def test_budget_bytes_is_exact(bpw):
  for weights in (1, 7, 1000, 12_345_679):
    limit = budget.budget_bytes(bpw, weights)
    assert Fraction(8 * limit, weights) <= Fraction(bpw)
    assert Fraction(8 * (limit + 1), weights) > Fraction(bpw)


# --- quantize with a budget ------------------------------------------------------------


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'a': rng.standard_normal((256, 192)).astype(np.float32),
    'b': (rng.laplace(size=(384, 128)) * 0.1).astype(np.float32),
    'c': rng.uniform(-1, 1, (160, 96)).astype(np.float32),
    'stack': rng.standard_normal((3, 128, 64)).astype(np.float32)
    * np.float32(2.0) ** np.arange(3, dtype=np.float32)[:, None, None],
    'bias': rng.standard_normal(16).astype(np.float32),
  }


def _stored_bytes(q):
  """A QArray's bytes by the storage format: whole packing units, scales, alpha, table."""
  layers = math.prod(q.shape[: q.layer_axes])
  k, n = q.matrix_shape
  per_unit, unit_bytes = {2: (4, 1), 4: (2, 1), 8: (1, 1)}.get(q.bits, (8, q.bits))
  codes = -(-k // per_unit) * unit_bytes * n
  scales = q.scale.size // max(layers, 1) * q.scale.dtype.itemsize
  return layers * (codes + scales + 4 + 4 * q.table.shape[-1])


@pytest.mark.parametrize('bpw', [2.6, 3.0, 3.5, 4.25, 5.5])
def test_budget_is_met_as_summary_counts(bpw):
  params = _tree()
  params_q, alphas = pqjax.quantize(params, bits_per_weight=bpw, layer_axes=_stack_axes)
  s = pqjax.summary(params_q)
  assert s.bits_per_weight <= bpw
  weights = sum(x.size for x in s.leaves)
  assert Fraction(8 * s.quantized_after, weights) <= Fraction(bpw)
  for leaf in s.leaves:
    q = pqjax.quantized_leaves(params_q)[leaf.path]
    assert leaf.bytes_after == q.nbytes == _stored_bytes(q)
  assert params_q['bias'] is params['bias'] and alphas['bias'] is None
  assert alphas['stack'].shape == (3,)


def _stack_axes(path, leaf):
  return 1 if path == 'stack' else 0


def _table(params, **options):
  """The allocation's own table (costs, damages, limit) for ``params``."""
  opts = QuantizeOptions(**options)
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  groups = quantize_lib.group(quantize_lib.select(flat, opts), opts)
  stats = quantize_lib.statistics(groups, opts.search_config, None)
  return widths.width_table(groups, stats, opts), opts


@pytest.mark.parametrize(
  'options',
  [
    {'bits_per_weight': 3.3},
    {'bits_per_weight': 4.6, 'bits': (3, 6), 'granularity': 16},
    {'bits_per_weight': 2.8, 'exponent': 'global', 'layer_axes': _stack_axes},
    {'bits_per_weight': 3.9, 'clip': 'block', 'importance': lambda p, x: x.size},
  ],
)
def test_quantize_picks_the_optimum_of_its_objective(options):
  params = _tree(1)
  table, opts = _table(params, **options)
  best, _ = brute_force(table.costs, table.damages, table.limit)
  params_q, _ = pqjax.quantize(params, **options)
  q = pqjax.quantized_leaves(params_q)
  chosen = [opts.widths.index(q[leaf.path].bits) for leaf in table.leaves]
  assert np.isclose(sum(d[i] for d, i in zip(table.damages, chosen)), best, rtol=1e-12)
  # The costs it optimised are the bytes stored.
  for leaf, cost, i in zip(table.leaves, table.costs, chosen):
    assert cost[i] == q[leaf.path].nbytes
  assert sum(x.nbytes for x in q.values()) <= table.limit


def test_widths_follow_the_budget_and_the_range():
  params = _tree(2)
  low = pqjax.quantize(params, bits_per_weight=2.5)[0]
  high = pqjax.quantize(params, bits_per_weight=6.0)[0]
  bits = lambda t: [x.bits for x in pqjax.quantized_leaves(t).values()]
  assert sum(bits(low)) < sum(bits(high))
  narrow = pqjax.quantize(params, bits=(3, 5), bits_per_weight=4.0)[0]
  assert set(bits(narrow)) <= {3, 4, 5}
  assert len(set(bits(pqjax.quantize(params, bits_per_weight=3.7)[0]))) > 1


def test_deterministic_and_decodes():
  params = _tree(3)
  a, alpha_a = pqjax.quantize(params, bits_per_weight=4.6, granularity=8)
  b, alpha_b = pqjax.quantize(params, bits_per_weight=4.6, granularity=8)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  decoded = pqjax.dequantize(a)
  error = pqjax.relative_error(params, a)
  assert 0 < error < 0.05
  assert decoded['a'].shape == params['a'].shape


def test_each_width_is_searched_like_one_width():
  # A leaf at width b under a budget is as good as the leaf quantized at b alone.
  params = _tree(4)
  params_q, _ = pqjax.quantize(params, bits_per_weight=4.4)
  for path, q in pqjax.quantized_leaves(params_q).items():
    alone, _ = pqjax.quantize({path: params[path]}, q.bits)
    one = pqjax.relative_error({path: params[path]}, {path: q})
    ref = pqjax.relative_error({path: params[path]}, alone)
    assert one <= ref * 1.01, (path, q.bits, one, ref)


@pytest.mark.parametrize(
  'kwargs,match',
  [
    ({'bits': 4, 'bits_per_weight': 3.5}, 'conflict'),
    ({'bits': (2, 6)}, 'needs a budget'),
    ({'bits': (6, 3), 'bits_per_weight': 4.0}, 'lo <= hi'),
    ({'bits': (1, 6), 'bits_per_weight': 4.0}, r'bits\[0\] must be'),
    ({'bits': (2, 3, 4), 'bits_per_weight': 4.0}, r'\(lo, hi\)'),
    ({'bits_per_weight': 0}, 'positive'),
    ({'bits_per_weight': float('nan')}, 'positive'),
    ({'bits_per_weight': '4'}, 'positive'),
    ({'bits_per_weight': 1.5}, r'out of reach: widths 2\.\.8 store 2\.\d+ to 8\.\d+'),
    ({'bits_per_weight': 9.0}, 'out of reach'),
    ({'bits_per_weight': 4.5, 'bits': (2, 4)}, r'widths 2\.\.4 store'),
  ],
)
def test_bad_budgets_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pqjax.quantize(_tree(), **kwargs)


def test_bad_importance_raises():
  with pytest.raises(TypeError, match='importance'):
    pqjax.quantize(_tree(), bits_per_weight=4.0, importance=3.0)
  with pytest.raises(ValueError, match='^a: importance must be'):
    pqjax.quantize(_tree(), bits_per_weight=4.0, importance=lambda p, x: -1.0)
  with pytest.raises(ValueError, match='^a: the importance function raised'):
    pqjax.quantize(_tree(), bits_per_weight=4.0, importance=lambda p, x: 1 / 0)
  # Without a budget it would weigh nothing: refused, not ignored.
  with pytest.raises(ValueError, match='bits_per_weight'):
    pqjax.quantize(_tree(), 4, importance=lambda p, x: 2.0)


def test_reachable_range_is_reachable():
  params = _tree()
  with pytest.raises(ValueError) as e:
    pqjax.quantize(params, bits_per_weight=1.0)
  lo, hi = (
    float(x) for x in str(e.value).split('store ')[1].split(' bits')[0].split(' to ')
  )
  for bpw in (lo, hi):
    s = pqjax.summary(pqjax.quantize(params, bits_per_weight=bpw)[0])
    assert s.bits_per_weight <= bpw
  # The ends are printed rounded inwards to 4 decimals: one step out is out of reach.
  for bpw in (lo - 1e-4, hi + 1e-4):
    with pytest.raises(ValueError, match='out of reach'):
      pqjax.quantize(params, bits_per_weight=bpw)


def test_one_width_keeps_its_meaning():
  params = _tree()
  default, _ = pqjax.quantize(params)
  four, _ = pqjax.quantize(params, 4)
  for x, y in zip(jax.tree_util.tree_leaves(default), jax.tree_util.tree_leaves(four)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  assert {q.bits for q in pqjax.quantized_leaves(four).values()} == {4}
  assert QuantizeOptions().bits == 4 and QuantizeOptions(bits_per_weight=3.0).bits == (
    2,
    8,
  )


def test_empty_tree_and_zero_leaves():
  assert pqjax.quantize({}, bits_per_weight=3.0) == ({}, {})
  only_bias = {'b': np.ones(4, np.float32)}
  params_q, _ = pqjax.quantize(only_bias, bits_per_weight=3.0)
  assert params_q['b'] is only_bias['b']
  zeros = {'z': np.zeros((16, 8), np.float32), 'w': _tree()['a']}
  params_q, _ = pqjax.quantize(zeros, bits_per_weight=3.0)
  assert np.all(np.asarray(pqjax.dequantize(params_q)['z']) == 0)
  assert params_q['z'].bits == 2  # an exact zero needs no bits


# --- checkpoints and the command line ---------------------------------------------------


@pytest.mark.parametrize('fmt', ['safetensors', 'orbax'])
def test_checkpoints_keep_each_width(tmp_path, fmt):
  params = _tree(5)
  params_q, _ = pqjax.quantize(params, bits_per_weight=4.6, layer_axes=_stack_axes)
  q = pqjax.quantized_leaves(params_q)
  assert len({x.bits for x in q.values()}) > 1
  if fmt == 'safetensors':
    pqjax.save_safetensors(tmp_path / 'q.safetensors', params_q)
    back = pqjax.quantized_leaves(pqjax.load_safetensors(tmp_path / 'q.safetensors'))
  else:
    pqjax.save_orbax(tmp_path / 'q', params_q)
    back = pqjax.quantized_leaves(pqjax.load_orbax(tmp_path / 'q'))
  assert {p: x.bits for p, x in back.items()} == {p: x.bits for p, x in q.items()}
  for p, x in q.items():
    assert np.asarray(back[p].codes).tobytes() == np.asarray(x.codes).tobytes()
    np.testing.assert_array_equal(back[p].dequantize(), x.dequantize())


def _codes_refs(spec, out):
  """Every QArray's codes reference in a checkpoint spec, with its bits."""
  if isinstance(spec, dict):
    if 'fields' in spec and 'codes' in spec['fields']:
      out.append((spec['bits'], spec['fields']['codes']))
    for v in spec.values():
      _codes_refs(v, out)
  elif isinstance(spec, list):
    for v in spec:
      _codes_refs(v, out)
  return out


@pytest.mark.parametrize('bits', [5, 6, 7])
@pytest.mark.parametrize('leaf,axes', [('c', 0), ('stack', 1)])
def test_files_with_one_code_a_byte_load_packed(bits, leaf, axes):
  # Files written before 5 to 7 bits were packed hold one signed int8 code a byte.
  from pqjax._src.core import grid, packing
  from pqjax._src.io import treespec

  params_q, _ = pqjax.quantize({leaf: _tree(6)[leaf]}, bits, layer_axes=axes)
  x = params_q[leaf]
  spec, tensors = treespec.flatten(params_q)
  ((_, ref),) = _codes_refs(spec, [])
  k, n = x.matrix_shape
  packed = np.asarray(tensors[ref['name']]).reshape(-1, packing.packed_rows(k, bits), n)
  zero = grid.zero_code(x.table.shape[-1])
  old = np.stack([np.asarray(packing.unpack(c, bits, k, zero), np.int8) for c in packed])
  old = old.reshape(*x.shape[:axes], k, n)
  assert np.abs(old).max() <= 2 ** (bits - 1)
  tensors[ref['name']] = old
  ref['dtype'], ref['shape'] = 'int8', list(old.shape)
  back = treespec.unflatten(spec, tensors, 'old.safetensors')[leaf]
  assert np.asarray(back.codes).tobytes() == np.asarray(x.codes).tobytes()
  np.testing.assert_array_equal(back.dequantize(), x.dequantize())


def test_command_line_budget_and_info(tmp_path, capsys):
  from safetensors.numpy import save_file

  from pqjax.tools.cli import main

  tensors = {k.replace('/', '.'): v for k, v in _tree(7).items() if k != 'stack'}
  save_file(tensors, tmp_path / 'p.safetensors')
  out = tmp_path / 'q.safetensors'
  argv = ['quantize', str(tmp_path / 'p.safetensors'), str(out)]
  assert main([*argv, '--bits-per-weight', '3.7']) == 0
  s = pqjax.summary(pqjax.load(out))
  assert s.bits_per_weight <= 3.7 and len(s.widths) > 1
  capsys.readouterr()
  assert main(['info', str(out)]) == 0
  text = capsys.readouterr().out
  assert f'widths: {s.widths_text()}' in text
  assert main([*argv, '--bits-per-weight', '3.7', '--bits', '3..4', '--force']) == 0
  assert set(pqjax.summary(pqjax.load(out)).widths) <= {3, 4}
  capsys.readouterr()
  assert main([*argv, '--bits-per-weight', '1.0', '--force']) == 1
  err = capsys.readouterr().err
  assert 'out of reach' in err and len(err.strip().splitlines()) == 1
  capsys.readouterr()
  assert main([*argv, '--bits', '4', '--bits-per-weight', '3.5', '--force']) == 1
  assert 'conflict' in capsys.readouterr().err
