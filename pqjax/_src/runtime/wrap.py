"""``wrap``: run a model's apply function on quantized parameters."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from pqjax._src.core.leaves import path_str
from pqjax._src.core.qarray import LoraArray, QArray, contains_qarray, is_stored
from pqjax._src.runtime import activations, rewrite
from pqjax._src.runtime import products as products_lib
from pqjax._src.runtime.weights import Adapter, Weight


def _weight(q: QArray | LoraArray, path: tuple[Any, ...]) -> Weight:
  # '<argument index>/params/...' or '<keyword>/...'.
  name = path_str(path)
  if isinstance(q, LoraArray) and q.a is None and q.b is None:
    q = q.base  # the frozen half of lora.split: the base alone
  if isinstance(q, LoraArray):
    # The base is frozen: no gradient reaches its scales (nor its exponent and
    # table) through the decode or the product; ``a`` and ``b`` get theirs.
    base = jax.tree_util.tree_map(jax.lax.stop_gradient, q.base)
    adapter = Adapter(a=q.a, b=q.b, scale=q.scale)
    return Weight(q=base, path=name, dtype=np.dtype(base.dtype), adapter=adapter)
  return Weight(q=q, path=name, dtype=np.dtype(q.dtype))


def _options(
  act_bits: Any, act_granularity: Any, act_exponent: Any, products_path: Any
) -> products_lib.Options:
  activations.check_granularity(act_granularity)
  activations.check_exponent(act_exponent)
  config = None
  if act_bits is not None:
    config = activations.ActivationConfig(
      bits=act_bits, granularity=act_granularity, exponent=act_exponent
    )
  return products_lib.Options(
    path=products_lib.check_path(products_path), activations=config
  )


def wrap(
  apply_fn: Callable[..., Any],
  *,
  act_bits: int | None = None,
  act_granularity: activations.ActGranularity = 'tensor',
  act_exponent: float | None = None,
  products: products_lib.ProductPath = 'auto',
) -> Callable[..., Any]:
  """Returns ``apply_fn`` taking quantized parameters.

  The returned function has ``apply_fn``'s signature. Every :class:`QArray` found in
  its positional and keyword arguments stays encoded until it is used: ``apply_fn``
  is traced, and each use of a quantized weight in its program is computed from the
  codes (see :mod:`pqjax._src.runtime.rewrite`). A product with few rows reads the
  packed codes inside the product and never writes the float weight; a larger one
  decodes the weight just before it; an embedding lookup decodes only the rows it
  takes; a weight stacked over a ``scan`` is decoded one layer per step. Everything
  else (other collections, rngs, ``mutable=``, keyword arguments) passes through.
  A :class:`LoraArray` (a QArray with a LoRA adapter, :func:`pqjax.lora.init`)
  stands for ``W + a @ b * scale``: a product of it is ``x @ W``, computed as a
  plain QArray's, plus ``((x @ a) @ b) * scale``; gradients reach ``a``, ``b`` and
  the activations, never the base's scales.
  It traces and compiles under ``jax.jit``; without quantized arguments it calls
  ``apply_fn`` as it is.

  Args:
    apply_fn: any function of pytrees, e.g. a Flax ``Module.apply``.
    act_bits: ``None`` (default) quantizes weights only. 2 to 8: the input
      activation of every matrix product and convolution whose weight is a
      :class:`QArray` is also power-quantized at this width, with a scale taken from
      the activation at run time (data-free). This is simulated (the products run in
      floating point on the decoded values); its derivative is the straight-through
      estimator.
    act_granularity: ``"tensor"``, one activation scale per product input; or
      ``"token"``, one per token of a matrix product, per pixel of a convolution.
    act_exponent: the activations' power exponent; ``None`` uses the exponent of the
      weight each activation meets (the paper's choice). ``1.0`` is uniform.
    products: how products of quantized weights are computed: ``"auto"`` (codes
      read inside the product for few rows, by the native kernel on CPU where it is
      built, else in XLA; decode then multiply otherwise), ``"native"`` (the native
      CPU kernel wherever the product's form allows it; an error where it is not
      built or the backend is not a CPU), ``"fused"`` (codes read inside the
      product in XLA wherever its form allows), ``"decode"`` (always decode, then
      multiply) or ``"kernel"`` (the Pallas kernel; interpreted on CPU, for tests).
      All give the same outputs up to the order of float summation.

  Returns:
    A function with ``apply_fn``'s signature.

  Raises:
    ValueError: an activation option or ``products`` is invalid (when called:
      ``"native"`` where the native kernel cannot run).
  """
  options = _options(act_bits, act_granularity, act_exponent, products)

  @functools.wraps(apply_fn)
  def wrapped(*args: Any, **kwargs: Any) -> Any:
    if not contains_qarray((args, kwargs)):
      return apply_fn(*args, **kwargs)
    rewriter = rewrite.Rewriter(options)
    return rewrite.run(apply_fn, args, kwargs, rewriter, is_stored, _weight)

  setattr(wrapped, _WRAPPED, (apply_fn, options))
  return wrapped


# The attribute of a wrapped function holding ``(apply_fn, options)``.
_WRAPPED = '__pqjax_wrapped__'


def quantized_products(
  apply_fn: Callable[..., Any], *args: Any, **kwargs: Any
) -> list[products_lib.Product]:
  """The products of quantized weights in ``apply_fn``, and how each is computed.

  Called with the arguments of ``apply_fn`` (quantized parameters included); traces
  only, computes nothing.

  Args:
    apply_fn: the function to inspect: a function returned by :func:`wrap` (its
      options apply), or any function (:func:`wrap`'s defaults apply).
    *args: its positional arguments.
    **kwargs: its keyword arguments.

  Returns:
    One :class:`Product` per use of a quantized weight by a product or a lookup, in
    program order.
  """
  fn, options = getattr(apply_fn, _WRAPPED, (apply_fn, products_lib.Options()))
  rewriter = rewrite.Rewriter(options)
  jax.eval_shape(lambda: rewrite.run(fn, args, kwargs, rewriter, is_stored, _weight))
  return rewriter.seen
