"""``wrap``: run a model's apply function on quantized parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from pqjax._src.core.qarray import contains_qarray, dequantize
from pqjax._src.runtime.activations import (
  ActivationConfig,
  check_options,
  quantize_inputs,
)


def _decode_arg(x: Any) -> Any:
  # Containers without a QArray are passed as they are, not rebuilt, so that
  # objects such as modules or `mutable=` lists keep their identity.
  return dequantize(x) if contains_qarray(x) else x


def wrap(
  apply_fn: Callable[..., Any],
  *,
  act_bits: int | None = None,
  act_granularity: str = 'tensor',
  act_exponent: float | None = None,
) -> Callable[..., Any]:
  """Returns ``apply_fn`` taking quantized parameters.

  Every :class:`QArray` found in the positional and keyword arguments is decoded to
  its original shape and dtype, then ``apply_fn`` is called. Everything else
  (other collections, rngs, ``mutable=``, keyword arguments) passes through. The
  decoding is traced into ``jax.jit`` with the rest of the function, so XLA fuses it
  with the consumers of the weights.

  Args:
    apply_fn: any function of pytrees, e.g. a Flax ``Module.apply``.
    act_bits: ``None`` (default) quantizes weights only. 2 to 8: the input activation
      of every matrix product and convolution whose weight is a :class:`QArray` is
      also power-quantized at this width, with a scale taken from the activation at
      run time (data-free). This is simulated: the products run in floating point on
      the decoded values, which gives what an integer power-domain pipeline would
      compute. See :mod:`pqjax.activations`.
    act_granularity: ``"tensor"``, one activation scale per product input; or
      ``"token"``, one per token of a matrix product, per pixel of a convolution.
    act_exponent: the activations' power exponent; ``None`` uses the exponent of the
      weight each activation meets (the paper's choice). ``1.0`` is uniform.

  Raises:
    ValueError: ``act_bits``, ``act_granularity`` or ``act_exponent`` is invalid.
  """
  check_options(act_granularity, act_exponent)
  if act_bits is not None:
    config = ActivationConfig(
      bits=act_bits, granularity=act_granularity, exponent=act_exponent
    )
    return quantize_inputs(apply_fn, config)

  @functools.wraps(apply_fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    args = tuple(_decode_arg(a) for a in args)
    kwargs = {k: _decode_arg(v) for k, v in kwargs.items()}
    return apply_fn(*args, **kwargs)

  return wrapped
