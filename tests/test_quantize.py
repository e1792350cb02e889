"""quantize: selection, structure, dtypes, bad input, purity."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pqjax
from tests import reference as ref


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'dense': {
      'kernel': rng.standard_normal((32, 16)).astype(np.float32),
      'bias': rng.standard_normal(16).astype(np.float32),
    },
    'conv': {'kernel': rng.standard_normal((3, 3, 4, 8)).astype(np.float32)},
    'embed': jnp.asarray(rng.standard_normal((50, 16)), jnp.bfloat16),
    'half': jnp.asarray(rng.standard_normal((16, 8)), jnp.float16),
    'layers': [rng.standard_normal((8, 8)).astype(np.float32), None],
    'step': np.int32(3),
    'ids': np.arange(12, dtype=np.int32).reshape(3, 4),
  }


def test_default_selection_and_structure():
  params = _params()
  params_q, alphas = pqjax.quantize(params, 4)

  def structure(tree):
    return jax.tree_util.tree_structure(tree, is_leaf=lambda x: x is None)

  assert structure(alphas) == structure(params)
  assert isinstance(params_q['dense']['kernel'], pqjax.QArray)
  assert isinstance(params_q['conv']['kernel'], pqjax.QArray)
  assert isinstance(params_q['embed'], pqjax.QArray)
  assert isinstance(params_q['layers'][0], pqjax.QArray)
  assert params_q['layers'][1] is None
  assert params_q['dense']['bias'] is params['dense']['bias']
  assert params_q['ids'] is params['ids'] and params_q['step'] is params['step']
  assert alphas['dense']['bias'] is None and alphas['ids'] is None
  assert isinstance(alphas['conv']['kernel'], float)


def test_decoded_tree_has_original_shapes_and_dtypes():
  params = _params()
  decoded = pqjax.dequantize(pqjax.quantize(params, 4)[0])
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(decoded)):
    assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype


def test_no_float_copy_in_quantized_leaves():
  params_q, _ = pqjax.quantize(_params(), 4)
  q = params_q['dense']['kernel']
  assert q.codes.dtype == np.uint8 and q.codes.shape == (16, 16)  # 2 codes a byte
  assert q.scale.shape == (1, 16) and q.table.shape == (16,)  # the full grid


@pytest.mark.parametrize(
  'granularity,scale_shape', [('tensor', (1, 1)), ('channel', (1, 16)), (8, (4, 16))]
)
def test_granularity_sets_the_scale_blocks(granularity, scale_shape):
  w = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)
  params_q, alphas = pqjax.quantize(
    {'w': w},
    4,
    granularity=granularity,
    grid='symmetric',
    clip=False,
    scale_dtype='float32',
  )
  q = params_q['w']
  assert q.scale.shape == scale_shape
  nk, ncol = scale_shape
  codes, _, m = ref.power_codes(w, alphas['w'], 4, nk, ncol)
  np.testing.assert_array_equal(
    np.asarray(q.dequantize()), ref.power_decode(codes, m, alphas['w'], 4)
  )


def test_filter_chooses_leaves_by_path():
  params = _params()
  params_q, alphas = pqjax.quantize(
    params, 8, filter=lambda path, leaf: path.startswith('dense/')
  )
  assert isinstance(params_q['dense']['kernel'], pqjax.QArray)
  assert isinstance(params_q['dense']['bias'], pqjax.QArray)  # 1-D forced in
  assert params_q['conv']['kernel'] is params['conv']['kernel']
  assert alphas['embed'] is None
  np.testing.assert_allclose(
    np.asarray(params_q['dense']['bias'].dequantize()), params['dense']['bias'], atol=0.05
  )


@pytest.mark.parametrize('bits', [1, 9, 0, -4, 4.0, '4', True])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match='bits must be an integer in 2..8'):
    pqjax.quantize(_params(), bits)


@pytest.mark.parametrize('granularity', ['row', 0, -8, 2.5, True])
def test_bad_granularity(granularity):
  with pytest.raises(ValueError, match='granularity'):
    pqjax.quantize(_params(), 4, granularity=granularity)


@pytest.mark.parametrize('exponent', ['best', 0.0, -1.0, float('nan'), float('inf')])
def test_bad_exponent(exponent):
  with pytest.raises(ValueError, match='exponent'):
    pqjax.quantize(_params(), 4, exponent=exponent)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_leaf_is_named(bad):
  params = _params()
  params['conv']['kernel'][1, 2, 3, 4] = bad
  with pytest.raises(ValueError, match=r'conv/kernel: .*NaN or Inf'):
    pqjax.quantize(params, 4)


def test_non_float_leaf_forced_by_filter_is_named():
  with pytest.raises(TypeError, match=r'ids: only floating arrays.*int32'):
    pqjax.quantize(_params(), 4, filter=lambda path, leaf: path in ('ids', 'conv/kernel'))
  with pytest.raises(TypeError, match='step'):
    pqjax.quantize({'step': 3}, 4, filter=lambda path, leaf: True)


def test_quantized_tree_is_refused_by_leaf_path():
  params_q, _ = pqjax.quantize(_params(), 4)
  with pytest.raises(ValueError, match=r'^conv/kernel: already quantized'):
    pqjax.quantize(params_q, 4)
  with pytest.raises(ValueError, match=r'^dense/kernel: already quantized'):
    pqjax.quantize(params_q, 8, filter=lambda path, leaf: path.startswith('dense/'))
  # A filter may leave the quantized leaves out and quantize the rest.
  partial, _ = pqjax.quantize(_params(), 4, filter=lambda path, leaf: path == 'half')
  both, alphas = pqjax.quantize(partial, 8, filter=lambda path, leaf: path == 'embed')
  assert both['half'] is partial['half'] and alphas['half'] is None
  assert both['embed'].bits == 8
  assert set(pqjax.quantized_leaves(both)) == {'embed', 'half'}


NOT_BOOL = 'the filter must return a bool, got '


@pytest.mark.parametrize(
  ('filter_fn', 'error', 'match'),
  [
    (lambda path, leaf: 1 / 0, ValueError, 'the filter raised ZeroDivisionError'),
    (lambda path, leaf: {}[path], ValueError, 'the filter raised KeyError'),
    (lambda path, leaf: np.ones(3) > 0, TypeError, NOT_BOOL + 'ndarray'),
    (lambda path, leaf: jnp.array(True), TypeError, NOT_BOOL + '.*Array'),
    (lambda path, leaf: 'yes', TypeError, NOT_BOOL + "str 'yes'"),
    (lambda path, leaf: None, TypeError, NOT_BOOL + 'NoneType'),
  ],
)
def test_filter_errors_name_the_leaf(filter_fn, error, match):
  with pytest.raises(error, match=r'^conv/kernel: ' + match):
    pqjax.quantize(_params(), 4, filter=filter_fn)


def test_filter_may_return_a_numpy_bool():
  params_q, _ = pqjax.quantize(
    _params(), 4, filter=lambda path, leaf: np.size(leaf) > np.int64(600)
  )
  assert set(pqjax.quantized_leaves(params_q)) == {'embed'}


def test_group_size_that_does_not_divide_k_leaves_a_shorter_last_block():
  params_q, _ = pqjax.quantize({'conv': _params()['conv']}, 4, granularity=5)
  q = params_q['conv']['kernel']
  assert q.scale.shape == (8, 8) and q.block_rows == 5  # K = 36: 7 blocks of 5, 1 of 1
  # 8 blocks a column: uint8 steps of a column scale (float16 below 5 blocks).
  assert q.scale.dtype == np.uint8 and q.column_scale.shape == (1, 8)


@pytest.mark.parametrize('clip', ['some', 0.0, 1.5, -0.2, float('nan')])
def test_bad_clip(clip):
  with pytest.raises(ValueError, match='clip must be'):
    pqjax.quantize(_params(), 4, clip=clip)


@pytest.mark.parametrize(
  'kw', [{'grid': 'uniform'}, {'scale_dtype': 'int8'}, {'scale_dtype': np.float64}]
)
def test_bad_grid_and_scale_dtype(kw):
  with pytest.raises(ValueError, match='grid|scale_dtype'):
    pqjax.quantize(_params(), 4, **kw)


def test_float16_scales_out_of_range_fall_back_or_are_named():
  w = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32) * 1e-7
  params_q, _ = pqjax.quantize({'w': w}, 4, granularity=4)
  assert params_q['w'].scale.dtype == np.float32  # automatic: float32 when needed
  with pytest.raises(ValueError, match='w: block scales fall outside the float16'):
    pqjax.quantize({'w': w}, 4, granularity=4, scale_dtype=np.float16)


def test_all_zero_tensor_and_channel_decode_to_exact_zeros():
  w = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
  w[:, 2] = 0
  for granularity in ('channel', 'tensor', 4):
    for exponent, clip in (('layer', True), ('global', 'block'), (1.0, False)):
      params_q, alphas = pqjax.quantize(
        {'w': w, 'z': np.zeros((8, 4), np.float32)},
        3,
        granularity=granularity,
        exponent=exponent,
        clip=clip,
      )
      out = pqjax.dequantize(params_q)
      assert np.all(np.isfinite(out['w'])) and np.all(out['w'][:, 2] == 0)
      assert np.all(out['z'] == 0) and np.isfinite(alphas['z'])


def test_empty_trees():
  assert pqjax.quantize({}, 4) == ({}, {})
  assert pqjax.quantize([], 4, exponent='global') == ([], [])
  params = {'b': np.ones(3, np.float32)}
  params_q, alphas = pqjax.quantize(params, 4, exponent='global')
  assert params_q['b'] is params['b'] and alphas == {'b': None}


def test_inputs_are_not_mutated_and_runs_are_bit_identical():
  params = _params()
  before = copy.deepcopy(params)
  first = pqjax.quantize(params, 3, granularity=2)
  second = pqjax.quantize(params, 3, granularity=2)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert first[1] == second[1]
  leaves = jax.tree_util.tree_leaves
  for a, b in zip(leaves(first[0]), leaves(second[0])):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_quantized_tree_works_with_jax_tree_utilities():
  params_q, _ = pqjax.quantize(_params(), 4)
  q = params_q['dense']['kernel']
  moved = jax.tree_util.tree_map(lambda x: x, params_q)
  assert moved['dense']['kernel'].shape == q.shape
  with pytest.raises(ValueError, match='codes shape'):
    pqjax.QArray(
      codes=q.codes[:3],
      scale=q.scale,
      alpha=q.alpha,
      table=q.table,
      bits=4,
      shape=q.shape,
      dtype=q.dtype,
    )
  with pytest.raises(ValueError, match='does not tile'):
    pqjax.QArray(
      codes=q.codes,
      scale=q.scale[:, :5],
      alpha=q.alpha,
      table=q.table,
      bits=4,
      shape=q.shape,
      dtype=q.dtype,
    )


@pytest.mark.parametrize('dtype', ['bool', 'uint8', 'int32', 'complex64', 'int4'])
def test_qarray_dtype_must_be_floating(dtype):
  q = pqjax.quantize(_params(), 4)[0]['dense']['kernel']
  fields = {f: getattr(q, f) for f in ('codes', 'scale', 'alpha', 'table')}
  dtype = jnp.dtype(dtype)
  with pytest.raises(ValueError, match=f'dtype {dtype.name} is not a floating dtype'):
    pqjax.QArray(**fields, bits=4, shape=q.shape, dtype=dtype)
  for name in ('alpha', 'table'):
    bad = {**fields, name: fields[name].astype(jnp.int32)}
    with pytest.raises(ValueError, match=f'{name} dtype int32 is not float32'):
      pqjax.QArray(**bad, bits=4, shape=q.shape, dtype=q.dtype)
  for ok in (jnp.float32, jnp.float16, jnp.bfloat16, np.float64):
    assert pqjax.QArray(**fields, bits=4, shape=q.shape, dtype=ok).dtype == ok


def test_error_shrinks_with_bits():
  w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
  errs = [
    float(
      np.sum((np.asarray(pqjax.dequantize(pqjax.quantize({'w': w}, b)[0])['w']) - w) ** 2)
    )
    for b in range(2, 9)
  ]
  assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))


def test_progress_bar_reports_every_weight(capsys):
  params = {'a': np.ones((64, 32), np.float32), 'b': np.ones((3, 3, 8, 16), np.float32)}
  pqjax.quantize(params, 4, progress=True)
  err = capsys.readouterr().err
  assert 'pqjax.quantize' in err and '6.40k/6.40k' in err  # 2 passes of 3200 weights
  pqjax.quantize(params, 4)
  assert capsys.readouterr().err == ''  # small tree: no bar by default


def test_quantize_signature_is_the_options_contract():
  """One contract: quantize's keyword-only arguments are QuantizeOptions' fields,
  with the same defaults, each documented in QuantizeOptions' Attributes."""
  import dataclasses
  import inspect

  params = inspect.signature(pqjax.quantize).parameters
  keywords = {n: p for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
  fields = {f.name: f for f in dataclasses.fields(pqjax.QuantizeOptions)}
  assert ['params', 'bits', *keywords] == list(params)
  assert set(keywords) | {'bits'} == set(fields)
  for name, p in keywords.items():
    f = fields[name]
    default = f.default if f.default is not dataclasses.MISSING else None
    assert p.default == default, name
  doc = pqjax.QuantizeOptions.__doc__
  assert all(f'\n    {name}: ' in doc for name in fields)
  with pytest.raises(TypeError, match='unexpected keyword'):
    pqjax.quantize({'w': np.ones((4, 4), np.float32)}, 4, granularty='tensor')
