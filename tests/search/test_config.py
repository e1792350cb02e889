"""SearchConfig: every field is checked when it is made."""

import math

import numpy as np
import pytest

import pqjax


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('hi', math.inf, 'hi must be a finite number'),
    ('hi', -math.inf, 'hi must be a finite number'),
    ('lo', math.nan, 'lo must be a finite number'),
    ('hi', math.nan, 'hi must be a finite number'),
    ('lo', 0.0, 'the exponent range must satisfy 0 < lo < hi'),
    ('lo', -1.0, 'the exponent range must satisfy 0 < lo < hi'),
    (
      'lo',
      2.0,
      'the exponent range must satisfy 0 < lo < hi',
    ),  # lo == hi: an empty range
    ('lo', 3.0, 'the exponent range must satisfy 0 < lo < hi'),
    ('hi', '2', 'hi must be a finite number'),
    ('hi', True, 'hi must be a finite number'),
    ('clip_lo', 0.0, r'clip_lo must be in \(0, 1\)'),
    ('clip_lo', 1.0, r'clip_lo must be in \(0, 1\)'),
    ('clip_lo', 1.5, r'clip_lo must be in \(0, 1\)'),
    ('clip_lo', math.nan, 'clip_lo must be a finite number'),
    ('refine_width', math.inf, 'refine_width must be a finite number'),
    ('refine_width', -0.1, 'refine_width must be >= 0'),
    ('block_clip_width', math.nan, 'block_clip_width must be a finite number'),
    ('exponent_points', 2, 'exponent_points must be an integer >= 3'),
    ('exponent_points', 24.0, 'exponent_points must be an integer >= 3'),
    ('exponent_points', 3.5, 'exponent_points must be an integer >= 3'),
    ('iters', 0, 'iters must be an integer >= 1'),
    ('iters', True, 'iters must be an integer >= 1'),
    ('clip_points', 1, 'clip_points must be an integer >= 2'),
    ('rounds', None, 'rounds must be an integer >= 1'),
    ('refine_iters', -1, 'refine_iters must be an integer >= 0'),
    ('refine_below', 1e5, 'refine_below must be an integer >= 0'),
    ('bins', 8, 'bins must be an integer >= 16'),
    ('bins', 1000, 'bins must be at most 256 or a multiple of 256'),
    ('block_clips', 0, 'block_clips must be an integer >= 1'),
  ],
)
def test_bad_fields_are_named(field, value, message):
  with pytest.raises(ValueError, match=rf'^SearchConfig: {message}'):
    pqjax.SearchConfig(**{field: value})


def test_numpy_numbers_are_accepted_as_python_ones():
  cfg = pqjax.SearchConfig(
    lo=np.float32(0.25), hi=1, exponent_points=np.int64(8), bins=512
  )
  assert cfg.lo == 0.25 and type(cfg.lo) is float and type(cfg.hi) is float
  assert cfg.exponent_points == 8 and type(cfg.exponent_points) is int
  assert cfg == pqjax.SearchConfig(
    lo=0.25, hi=1.0, exponent_points=8, bins=512
  )  # hashable, equal


def test_a_valid_config_searches_inside_its_range():
  w = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
  for cfg in (
    pqjax.SearchConfig(lo=0.3, hi=0.4, bins=256),
    pqjax.SearchConfig(lo=1.2, hi=1.5, bins=16, exponent_points=3, refine_iters=0),
  ):
    _, alphas = pqjax.quantize({'w': w}, 4, search_config=cfg)
    assert np.float32(cfg.lo) <= alphas['w'] <= np.float32(cfg.hi)
