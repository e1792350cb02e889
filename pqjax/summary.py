"""Sizes and errors of quantized trees."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pqjax.qarray import QArray, is_qarray


def leaf_nbytes(x: Any) -> int:
  """Bytes a leaf really occupies (a QArray: its codes, scales and exponent)."""
  if isinstance(x, QArray):
    return x.nbytes
  if hasattr(x, 'shape') and hasattr(x, 'dtype'):
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
  return 0


def nbytes(tree: Any) -> int:
  """Bytes held by the arrays of ``tree``, quantized leaves at their packed size."""
  return sum(leaf_nbytes(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qarray))


def relative_error(params: Any, params_q: Any) -> float:
  """``sum ||W - W_hat||^2 / sum ||W||^2`` over the quantized leaves."""
  pairs = [(w, q) for w, q in zip(jax.tree_util.tree_leaves(params),
                                  jax.tree_util.tree_leaves(params_q, is_leaf=is_qarray))
           if isinstance(q, QArray)]
  if not pairs:
    return 0.0
  num = sum(float(jnp.sum(jnp.square(jnp.asarray(w, jnp.float32)
                                     - q.dequantize().astype(jnp.float32))))
            for w, q in pairs)
  den = sum(float(jnp.sum(jnp.square(jnp.asarray(w, jnp.float32)))) for w, _ in pairs)
  return num / den if den else 0.0
