"""End to end on the real all-MiniLM-L6-v2 through Hugging Face's FlaxBertModel."""

import jax
import numpy as np
import pytest

import pqjax
from pqjax import minilm, sizes
from pqjax.tools import corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def model():
  return minilm.load()


@pytest.fixture(scope='module')
def text(model):
  return minilm.tokenize(model.tokenizer, corpus.stdlib_sentences(512))


@pytest.fixture(scope='module')
def reference(model, text):
  return minilm.embed_all(minilm.embed_fn(model.module.apply), model.params, text)


@pytest.fixture(scope='module')
def power_q(model):
  return pqjax.quantize(model.params, 4, granularity='channel')


@pytest.fixture(scope='module')
def uniform_q(model):
  return pqjax.quantize(model.params, 4, granularity='channel', exponent=1.0,
                        grid='symmetric', clip=False)


def test_every_matrix_is_quantized(model, power_q):
  params_q, alphas = power_q
  n_matrices = sum(x.ndim >= 2 for x in jax.tree_util.tree_leaves(model.params))
  exps = [a for a in jax.tree_util.tree_leaves(alphas) if a is not None]
  assert len(exps) == n_matrices == 40
  assert all(0.05 <= a <= 2.0 for a in exps)
  assert np.median(exps) < 1.0  # trained weights are heavy near zero


def test_reconstruction_error_is_at_most_half_of_uniform(model, power_q, uniform_q):
  power_err = sizes.relative_error(model.params, power_q[0])
  uniform_err = sizes.relative_error(model.params, uniform_q[0])
  # Independent check of the helper on one leaf.
  w = np.asarray(model.params['pooler']['dense']['kernel'])
  w_hat = np.asarray(power_q[0]['pooler']['dense']['kernel'].dequantize())
  assert sizes.relative_error({'k': w}, {'k': power_q[0]['pooler']['dense']['kernel']}
                                ) == pytest.approx(np.sum((w - w_hat) ** 2)
                                                   / np.sum(w ** 2), rel=1e-5)
  assert power_err <= 0.5 * uniform_err, (power_err, uniform_err)


def test_embedding_cosine_against_fp32(model, text, reference, power_q, uniform_q):
  embed = minilm.embed_fn(pqjax.wrap(model.module.apply))
  power_cos = minilm.cosines(reference, minilm.embed_all(embed, power_q[0], text))
  uniform_cos = minilm.cosines(reference, minilm.embed_all(embed, uniform_q[0], text))
  assert len(power_cos) == 512
  assert power_cos.mean() >= 0.958, power_cos.mean()
  assert power_cos.mean() > uniform_cos.mean() + 0.02


def test_wrapped_jit_equals_apply_on_dequantized_params(model, text, power_q):
  batch = text.batches[0]
  wrapped = minilm.embed_fn(pqjax.wrap(model.module.apply))(power_q[0], batch)
  plain = minilm.embed_fn(model.module.apply)(pqjax.dequantize(power_q[0]), batch)
  np.testing.assert_allclose(np.asarray(wrapped), np.asarray(plain), rtol=0, atol=2e-6)


def test_quantized_model_is_small(model, power_q):
  assert sizes.nbytes(power_q[0]) <= 12.5e6
  assert sizes.nbytes(model.params) > 90e6
