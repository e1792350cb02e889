"""``wrap``: run a model's apply function on quantized parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pqjax.qarray import contains_qarray, dequantize


def _decode_arg(x: Any) -> Any:
  # Containers without a QArray are passed as they are, not rebuilt, so that
  # objects such as modules or `mutable=` lists keep their identity.
  return dequantize(x) if contains_qarray(x) else x


def wrap(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns ``apply_fn`` taking quantized parameters.

  Every :class:`QArray` found in the positional and keyword arguments is decoded to
  its original shape and dtype, then ``apply_fn`` is called. Everything else
  (other collections, rngs, ``mutable=``, keyword arguments) passes through. The
  decoding is traced into ``jax.jit`` with the rest of the function, so XLA fuses it
  with the consumers of the weights.
  """

  @functools.wraps(apply_fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    args = tuple(_decode_arg(a) for a in args)
    kwargs = {k: _decode_arg(v) for k, v in kwargs.items()}
    return apply_fn(*args, **kwargs)

  return wrapped
