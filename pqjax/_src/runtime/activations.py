"""Activation quantization: fake-quantize the inputs of the products of quantized weights.

``wrap(apply_fn, act_bits=b)`` runs ``apply_fn`` with every quantized weight decoded, and
passes the other operand of every matrix product (``dot_general``) and convolution
(``conv_general_dilated``) that consumes a quantized weight through the power quantizer
(encode, then decode) at ``b`` bits::

    m = max |x|  (per tensor, or per token)          qmax = 2 ** (b - 1) - 1
    x_hat = sign(x) * m * (round(qmax * (|x| / m) ** a) / qmax) ** (1 / a)

with ``a`` the weight's exponent (the paper's choice) or a given one. The scale is taken
from the activation itself at run time, so no calibration data is needed.

The quantization is simulated: the products then run in floating point on the decoded
weights and decoded activations, which gives the outputs an integer pipeline on
power-domain codes would compute; no JAX backend computes sums of power-domain products
natively.

Mechanism: the function that decodes the weights and calls ``apply_fn`` is traced to a
jaxpr, in which the decoded weights are inputs. The jaxpr is then evaluated again,
equation by equation. A weight stays marked through the layout operations that keep its
values (reshape, transpose, dtype conversion, broadcast, slice, ...) and into nested
programs (``jit``, remat, custom JVP/VJP rules, ``scan``, ``cond``); a product with one
marked operand gets its other operand fake-quantized. Everything else is re-bound as it
was. Gathers (embedding lookups) are not products and are left alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core

from pqjax._src.core import grid, operator
from pqjax._src.core.leaves import is_array, path_str
from pqjax._src.core.qarray import is_qarray

GRANULARITIES = ('tensor', 'token')

# Primitives whose first operand's values reach the output unchanged, only moved,
# cast or repeated: a weight seen through them is still the weight.
LAYOUT_PRIMITIVES = frozenset(
  {
    'reshape',
    'transpose',
    'convert_element_type',
    'broadcast_in_dim',
    'squeeze',
    'expand_dims',
    'copy',
    'copy_p',
    'reduce_precision',
    'rev',
    'slice',
    'dynamic_slice',
    'sharding_constraint',
    'mesh_cast',
    'reshard',
    'pvary',
    'device_put',
    'optimization_barrier',
  }
)
PRODUCT_PRIMITIVES = frozenset({'dot_general', 'conv_general_dilated'})
# Call-like primitives: one inner program whose inputs are the equation's inputs.
CALL_JAXPR_PARAMS = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
  'remat2': 'jaxpr',
  'checkpoint': 'jaxpr',
  'custom_jvp_call': 'call_jaxpr',
  'custom_vjp_call': 'call_jaxpr',
  'custom_vjp_call_jaxpr': 'fun_jaxpr',
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActivationConfig:
  """How the inputs of quantized products are quantized.

  Attributes:
    bits: code width of the activations, 2 to 8.
    granularity: ``"tensor"``, one scale (absolute maximum) for the whole input of a
      product; or ``"token"``, one per row of the input: per token of a matrix product
      (the maximum over the contracted axes), per pixel of a convolution (over its
      input channels).
    exponent: the power exponent; ``None`` takes each weight's exponent.
  """

  bits: int
  granularity: str = 'tensor'
  exponent: float | None = None

  def __post_init__(self):
    if (
      isinstance(self.bits, bool)
      or not isinstance(self.bits, int)
      or not grid.MIN_BITS <= self.bits <= grid.MAX_BITS
    ):
      raise ValueError(
        f'act_bits must be None or an integer in {grid.MIN_BITS}..'
        f'{grid.MAX_BITS}, got {self.bits!r}'
      )
    check_options(self.granularity, self.exponent)


def check_options(granularity: Any, exponent: Any) -> None:
  """Raises a ValueError naming a bad activation granularity or exponent."""
  if granularity not in GRANULARITIES:
    raise ValueError(
      f'act_granularity must be one of {GRANULARITIES}, got {granularity!r}'
    )
  if exponent is not None and (
    isinstance(exponent, bool)
    or not isinstance(exponent, (int, float))
    or not 0 < exponent < float('inf')
  ):
    raise ValueError(
      f'act_exponent must be None or a positive finite number, got {exponent!r}'
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class Product:
  """One product whose activation input is quantized.

  Attributes:
    primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
    weight: path of the quantized leaf it consumes, ``<argument index>/...`` for
      positional arguments and ``<keyword>/...`` for keyword ones.
    activation_shape: shape of the quantized input.
    weight_shape: shape of the weight operand as the product sees it.
  """

  primitive: str
  weight: str
  activation_shape: tuple[int, ...]
  weight_shape: tuple[int, ...]


def fake_quantize(
  x: jax.Array, alpha: jax.Array | float, bits: int, axes: Sequence[int] | None = None
) -> jax.Array:
  """Power-quantizes ``x`` and decodes it back, with absmax scales over ``axes``.

  ``axes=None`` gives one scale for the tensor. Computed in float32, returned in the
  dtype of ``x``. A block of zeros stays zero.
  """
  xf = x.astype(jnp.float32)
  m = jnp.max(jnp.abs(xf), axis=None if axes is None else tuple(axes), keepdims=True)
  safe = jnp.where(m > 0, m, 1.0)
  k = operator.encode_magnitude(jnp.abs(xf) / safe, alpha, bits)
  mag = operator.decode_magnitude(k, alpha, bits) * m
  return jnp.where(xf < 0, -mag, mag).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Mark:
  """A value that is a quantized weight: its exponent and leaf path."""

  alpha: jax.Array
  path: str


def _token_axes(eqn: core.JaxprEqn, operand: int) -> tuple[int, ...]:
  """Axes of the activation operand that one row (token or pixel) spans."""
  if eqn.primitive.name == 'dot_general':
    (contract_lhs, contract_rhs), _ = eqn.params['dimension_numbers']
    return tuple((contract_lhs, contract_rhs)[operand])
  dims = eqn.params['dimension_numbers']
  return ((dims.lhs_spec, dims.rhs_spec)[operand][1],)


def _bind(eqn: core.JaxprEqn, invals: list[Any]) -> list[Any]:
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # older JAX: (subfuns, params)
    subfuns, params = params
    invals = [*subfuns, *invals]
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _unsupported(eqn: core.JaxprEqn, marks: list[_Mark | None]) -> ValueError:
  paths = sorted({m.path for m in marks if m is not None})
  return ValueError(
    f'activation quantization cannot follow the quantized weight(s) {paths} into'
    f' primitive {eqn.primitive.name!r}; decode them before it (pqjax.dequantize) or'
    ' quantize without activations'
  )


@dataclasses.dataclass
class _Rewriter:
  """Evaluates a jaxpr, fake-quantizing the activation inputs of marked products."""

  config: ActivationConfig
  products: list[Product]

  def eval(
    self,
    jaxpr: core.Jaxpr,
    consts: Sequence[Any],
    args: Sequence[Any],
    marks: Sequence[_Mark | None],
  ) -> tuple[list[Any], list[_Mark | None]]:
    env: dict[Any, Any] = {}
    mark_of: dict[Any, _Mark] = {}

    def read(v: Any) -> Any:
      return v.val if isinstance(v, core.Literal) else env[v]

    def mark(v: Any) -> _Mark | None:
      return None if isinstance(v, core.Literal) else mark_of.get(v)

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    mark_of.update((v, m) for v, m in zip(jaxpr.invars, marks) if m is not None)
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      inmarks = [mark(v) for v in eqn.invars]
      if any(m is not None for m in inmarks):
        outs, outmarks = self.eqn(eqn, invals, inmarks)
      else:
        outs, outmarks = _bind(eqn, invals), []
      env.update(zip(eqn.outvars, outs))
      mark_of.update((v, m) for v, m in zip(eqn.outvars, outmarks) if m is not None)
    return [read(v) for v in jaxpr.outvars], [mark(v) for v in jaxpr.outvars]

  def eqn(
    self, eqn: core.JaxprEqn, invals: list[Any], marks: list[_Mark | None]
  ) -> tuple[list[Any], list[_Mark | None]]:
    name = eqn.primitive.name
    if name in LAYOUT_PRIMITIVES:
      outs = _bind(eqn, invals)
      if len(outs) > 1 and len(outs) == len(invals):  # one output per operand
        return outs, list(marks)
      return outs, [marks[0]] + [None] * (len(outs) - 1)
    if name in PRODUCT_PRIMITIVES:
      return self.product(eqn, invals, marks), []
    if name in CALL_JAXPR_PARAMS:
      inner = eqn.params[CALL_JAXPR_PARAMS[name]]
      if isinstance(inner, core.ClosedJaxpr):
        return self.eval(inner.jaxpr, inner.consts, invals, marks)
      return self.eval(inner, [], invals, marks)
    if name == 'scan':
      return self.scan(eqn, invals, marks), []
    if name == 'cond':
      return self.cond(eqn, invals, marks), []
    if any(core.jaxprs_in_params(eqn.params)):
      raise _unsupported(eqn, marks)
    # Any other use of a weight (a gather, arithmetic) is not a product of it.
    return _bind(eqn, invals), []

  def product(
    self, eqn: core.JaxprEqn, invals: list[Any], marks: list[_Mark | None]
  ) -> list[Any]:
    if marks[0] is not None and marks[1] is not None:
      return _bind(eqn, invals)  # two weights: no activation to quantize
    act = 0 if marks[1] is not None else 1
    weight = marks[1 - act]
    assert weight is not None
    x = invals[act]
    alpha = weight.alpha if self.config.exponent is None else self.config.exponent
    axes = None if self.config.granularity == 'tensor' else _token_axes(eqn, act)
    invals = list(invals)
    invals[act] = fake_quantize(x, alpha, self.config.bits, axes)
    self.products.append(
      Product(
        primitive=eqn.primitive.name,
        weight=weight.path,
        activation_shape=tuple(x.shape),
        weight_shape=tuple(invals[1 - act].shape),
      )
    )
    return _bind(eqn, invals)

  def scan(
    self, eqn: core.JaxprEqn, invals: list[Any], marks: list[_Mark | None]
  ) -> list[Any]:
    p = eqn.params
    nc, ncarry = p['num_consts'], p['num_carry']
    if any(m is not None for m in marks[nc : nc + ncarry]):
      raise _unsupported(eqn, marks)
    body: core.ClosedJaxpr = p['jaxpr']
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
      outs, _ = self.eval(body.jaxpr, body.consts, [*consts, *carry, *x], marks)
      return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(
      step, init, xs, length=p['length'], reverse=p['reverse'], unroll=p['unroll']
    )
    return [*carry, *ys]

  def cond(
    self, eqn: core.JaxprEqn, invals: list[Any], marks: list[_Mark | None]
  ) -> list[Any]:
    if marks[0] is not None:
      raise _unsupported(eqn, marks)

    def branch(jaxpr: core.ClosedJaxpr, *ops: Any) -> list[Any]:
      return self.eval(jaxpr.jaxpr, jaxpr.consts, ops, marks[1:])[0]

    return lax.switch(
      invals[0],
      [functools.partial(branch, b) for b in eqn.params['branches']],
      *invals[1:],
    )


def _run(
  apply_fn: Callable[..., Any],
  config: ActivationConfig,
  products: list[Product],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Any:
  """Calls ``apply_fn`` on decoded weights, its quantized products' inputs rewritten."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
    (args, kwargs), is_leaf=is_qarray
  )
  # Arrays become inputs of the traced program; anything else (flags, names, modules)
  # stays a Python value, as in a direct call.
  dynamic = [i for i, (_, x) in enumerate(leaves) if is_qarray(x) or is_array(x)]
  inputs = [
    leaves[i][1].dequantize() if is_qarray(leaves[i][1]) else leaves[i][1]
    for i in dynamic
  ]
  # The path drops the (args, kwargs) level: '0/params/...' or 'name/...'.
  marks = [
    _Mark(alpha=leaves[i][1].alpha, path=path_str(leaves[i][0][1:]))
    if is_qarray(leaves[i][1])
    else None
    for i in dynamic
  ]
  out_tree = []

  def flat_fn(*values: Any) -> list[Any]:
    filled = [x for _, x in leaves]
    for i, v in zip(dynamic, values):
      filled[i] = v
    a, k = jax.tree_util.tree_unflatten(treedef, filled)
    out, tree = jax.tree_util.tree_flatten(apply_fn(*a, **k))
    out_tree.append(tree)
    return out

  closed = jax.make_jaxpr(flat_fn)(*inputs)
  outs, _ = _Rewriter(config, products).eval(closed.jaxpr, closed.consts, inputs, marks)
  return jax.tree_util.tree_unflatten(out_tree[0], outs)


def quantize_inputs(
  apply_fn: Callable[..., Any], config: ActivationConfig
) -> Callable[..., Any]:
  """``apply_fn`` on quantized weights, with the inputs of their products quantized.

  See the module docstring for the quantizer and the mechanism; ``pqjax.wrap(apply_fn,
  act_bits=...)`` is the public entry point.
  """

  @functools.wraps(apply_fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    return _run(apply_fn, config, [], args, kwargs)

  return wrapped


def quantized_products(
  apply_fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> list[Product]:
  """The products whose activation input ``wrap(apply_fn, act_bits=...)`` quantizes.

  Called with the arguments of ``apply_fn`` (quantized parameters included); traces
  only, computes nothing.
  """
  products: list[Product] = []
  config = ActivationConfig(bits=grid.MAX_BITS)
  jax.eval_shape(lambda: _run(apply_fn, config, products, args, kwargs))
  return products
