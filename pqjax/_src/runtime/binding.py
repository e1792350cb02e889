"""Binding a jaxpr equation's primitive again, as the rewriter and the products do."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core


def bind(eqn: core.JaxprEqn, invals: Sequence[Any]) -> list[Any]:
  """Binds ``eqn``'s primitive to ``invals`` with its parameters, in its context."""
  params = eqn.primitive.get_bind_params(eqn.params)
  args = list(invals)
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
    args = [*subfuns, *args]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*args, **params)
  return list(out) if eqn.primitive.multiple_results else [out]
