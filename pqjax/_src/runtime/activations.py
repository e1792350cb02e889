"""Activation quantization: the inputs of products of quantized weights, power-quantized.

With ``wrap(apply_fn, act_bits=b)``, the other operand of every matrix product
(``dot_general``) and convolution (``conv_general_dilated``) that consumes a
quantized weight goes through the power quantizer, encode then decode, at ``b``
bits::

    m = max |x|  (per tensor, or per token)          qmax = 2 ** (b - 1) - 1
    x_hat = sign(x) * m * (round(qmax * (|x| / m) ** a) / qmax) ** (1 / a)

with ``a`` the weight's exponent (the paper's choice) or a given one. The scale is
taken from the activation itself at run time, so no calibration data is needed.

The quantization is simulated: the products then run in floating point on the
decoded values, which gives the outputs an integer pipeline on power-domain codes
would compute. Differentiating through it uses the straight-through estimator: the
rounding's derivative is taken as the identity, as in quantization-aware training.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core

from pqjax._src.core import grid, operator

ActGranularity = Literal['tensor', 'token']
GRANULARITIES: tuple[ActGranularity, ...] = ('tensor', 'token')


def check_exponent(exponent: object) -> float | None:
  """``None`` or a positive finite float; a ValueError naming ``act_exponent``."""
  if exponent is None:
    return None
  if isinstance(exponent, (int, float, np.integer, np.floating)) and not isinstance(
    exponent, bool
  ):
    value = float(exponent)
    if 0 < value and math.isfinite(value):
      return value
  raise ValueError(
    f'act_exponent must be None or a positive finite number, got {exponent!r}'
  )


def check_granularity(granularity: object) -> ActGranularity:
  if granularity == 'tensor' or granularity == 'token':
    return granularity
  raise ValueError(f'act_granularity must be one of {GRANULARITIES}, got {granularity!r}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationConfig:
  """How the inputs of quantized products are quantized.

  Attributes:
    bits: code width of the activations, 2 to 8.
    granularity: ``"tensor"``, one scale (absolute maximum) for the whole input of a
      product; or ``"token"``, one per row of the input: per token of a matrix
      product (the maximum over the contracted axes), per pixel of a convolution
      (over its input channels).
    exponent: the power exponent; ``None`` takes each weight's exponent.
  """

  bits: int
  granularity: ActGranularity = 'tensor'
  exponent: float | None = None

  def __post_init__(self) -> None:
    object.__setattr__(self, 'bits', grid.check_bits(self.bits, 'act_bits'))
    object.__setattr__(self, 'granularity', check_granularity(self.granularity))
    object.__setattr__(self, 'exponent', check_exponent(self.exponent))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _fake_quantize(
  x: jax.Array, alpha: Any, bits: int, axes: tuple[int, ...] | None
) -> jax.Array:
  xf = x.astype(jnp.float32)
  m = jnp.max(jnp.abs(xf), axis=axes, keepdims=True)
  safe = jnp.where(m > 0, m, 1.0)
  k = operator.encode_magnitude(jnp.abs(xf) / safe, alpha, bits)
  mag = operator.decode_magnitude(k, alpha, bits) * m
  return jnp.where(xf < 0, -mag, mag).astype(x.dtype)


@_fake_quantize.defjvp
def _straight_through(
  bits: int, axes: tuple[int, ...] | None, primals: Any, tangents: Any
) -> tuple[jax.Array, jax.Array]:
  x, alpha = primals
  return _fake_quantize(x, alpha, bits, axes), tangents[0]


def fake_quantize(
  x: jax.Array, alpha: jax.Array | float, bits: int, axes: Sequence[int] | None = None
) -> jax.Array:
  """Power-quantizes ``x`` and decodes it back, with absmax scales over ``axes``.

  ``axes=None`` gives one scale for the tensor. Computed in float32, returned in
  the dtype of ``x``. A block of zeros stays zero. The derivative with respect to
  ``x`` is the identity (straight-through); none flows to ``alpha``.
  """
  return _fake_quantize(
    x, jnp.asarray(alpha, jnp.float32), bits, None if axes is None else tuple(axes)
  )


def token_axes(eqn: core.JaxprEqn, operand: int) -> tuple[int, ...]:
  """Axes of the activation operand that one row (token or pixel) spans."""
  if eqn.primitive.name == 'dot_general':
    (contract_lhs, contract_rhs), _ = eqn.params['dimension_numbers']
    return tuple((contract_lhs, contract_rhs)[operand])
  dims = eqn.params['dimension_numbers']
  return ((dims.lhs_spec, dims.rhs_spec)[operand][1],)


def quantize_input(
  config: ActivationConfig | None,
  eqn: core.JaxprEqn,
  x: jax.Array,
  operand: int,
  alpha: jax.Array,
) -> jax.Array:
  """The activation operand of a quantized product, quantized if ``config`` asks."""
  if config is None:
    return x
  a: jax.Array | float
  if config.exponent is not None:
    a = config.exponent
  else:
    # A stacked weight used whole (outside a scan over its layers) has one exponent
    # per layer; its activation takes their mean.
    a = alpha if not jnp.ndim(alpha) else jnp.mean(alpha)
  axes = None if config.granularity == 'tensor' else token_axes(eqn, operand)
  return fake_quantize(x, a, config.bits, axes)
