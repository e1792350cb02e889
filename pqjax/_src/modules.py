"""Quantized Flax NNX models: module objects that run on their quantized parameters.

:func:`quantize` quantizes a model's :class:`flax.nnx.Param` values (each becomes a
:class:`QArray`) and gives every module of the copy a cached subclass of its class
whose listed methods (``__call__`` by default) run the original method under
:func:`pqjax.wrap`: the module splits itself, the method runs on the merged state
inside ``wrap``, and the state it changed (KV caches, batch statistics, rng counts)
is written back. NNX graphdefs record a module's class, so code that splits and
merges the model inside its own ``jax.jit`` (samplers, trainers) calls the
subclass, and runs quantized without knowing pqjax.

Inside the wrapped call the parameters are float arrays again (``wrap`` traces
the method on their decoded shapes); submodules then call their original methods.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import jax

from pqjax._src.core.leaves import PyTree
from pqjax._src.core.qarray import contains_qarray
from pqjax._src.core.qarray import dequantize as dequantize_tree
from pqjax._src.quantize import quantize as quantize_tree
from pqjax._src.runtime.activations import ActGranularity
from pqjax._src.runtime.products import ProductPath
from pqjax._src.runtime.wrap import wrap

if TYPE_CHECKING:
  from flax.nnx import Module, State

# Attribute of a quantized class naming its original class.
_BASE = '__pqjax_base__'


def _nnx() -> ModuleType:
  from flax import nnx

  return nnx


def _run_quantized(
  module: Module,
  method: Callable[..., Any],
  wrap_options: dict[str, Any],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Any:
  """``method(module, *args, **kwargs)`` under ``wrap``, its state changes kept."""
  nnx = _nnx()
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def pure(
    state: tuple[State, State], args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> tuple[Any, State]:
    m = nnx.merge(graphdef, *state)
    out = method(m, *args, **kwargs)
    return out, nnx.state(m, nnx.Not(nnx.Param))

  # One argument for all the state, so wrap rebuilds its variables inside the
  # traced call, where the method may update them.
  out, changed = wrap(pure, **wrap_options)((params, rest), args, kwargs)
  nnx.update(module, changed)
  return out


@functools.cache
def _quantized_class(
  cls: type, methods: tuple[str, ...], wrap_items: tuple[tuple[str, Any], ...]
) -> type:
  """``cls`` with ``methods`` running quantized; one class per (cls, options)."""
  wrap_options = dict(wrap_items)
  namespace: dict[str, Any] = {_BASE: cls, '__module__': cls.__module__}
  for name in methods:
    original = getattr(cls, name, None)
    if original is None:
      continue

    def method(
      self: Module, *args: Any, __original: Callable[..., Any] = original, **kwargs: Any
    ) -> Any:
      nnx = _nnx()
      if not contains_qarray(nnx.state(self, nnx.Param)):
        # Inside a wrapped call (parameters already float) or a dequantized model.
        return __original(self, *args, **kwargs)
      return _run_quantized(self, __original, wrap_options, args, kwargs)

    functools.update_wrapper(method, original)
    namespace[name] = method
  # Built by the class's own metaclass (NNX's), as a class statement would.
  return type(cls)(f'Quantized{cls.__name__}', (cls,), namespace)


def _set_classes(model: Module, make: Callable[[type], type]) -> None:
  for _, m in _nnx().iter_graph(model):
    if isinstance(m, _nnx().Module):
      m.__class__ = make(type(m))


def _fresh(state: State) -> State:
  """``state`` with new variable objects holding the same arrays: a split shares
  the model's variables, which the new model must not update."""
  return jax.tree_util.tree_map(lambda x: x, state)


def _base(cls: type) -> type:
  return getattr(cls, _BASE, cls)


def quantize(
  model: Module,
  bits: int | tuple[int, int] | None = None,
  *,
  methods: Sequence[str] = ('__call__',),
  act_bits: int | None = None,
  act_granularity: ActGranularity = 'tensor',
  act_exponent: float | None = None,
  products: ProductPath = 'auto',
  **options: Any,
) -> tuple[Module, PyTree]:
  """Quantizes an NNX model's parameters into a model that runs on them.

  Args:
    model: a :class:`flax.nnx.Module`; it is not changed.
    bits: as :func:`pqjax.quantize`.
    methods: the methods that run quantized, on every module of the model (those a
      module lacks are skipped): ``__call__`` by default; add ``"generate"``,
      ``"decode"`` or others a client calls.
    act_bits: as :func:`pqjax.wrap`.
    act_granularity: as :func:`pqjax.wrap`.
    act_exponent: as :func:`pqjax.wrap`.
    products: as :func:`pqjax.wrap`.
    **options: every option of :func:`pqjax.quantize`. Paths given to ``filter``,
      ``layer_axes``, ``output_axis`` and ``importance`` are the parameters' paths
      in the model, without NNX's ``value`` suffix (``layers/0/attn/q_proj/w``).

  Returns:
    ``(model_q, alphas)``: a new model object sharing the unquantized state with
    ``model``, its :class:`flax.nnx.Param` values :class:`QArray` where quantized,
    whose modules run quantized wherever they are called (directly, under
    ``nnx.jit``, after ``nnx.split``/``nnx.merge`` under ``jax.jit``); and the
    exponents, as :func:`pqjax.quantize` returns them, by parameter path.
  """
  wrap_options: dict[str, Any] = dict(
    act_bits=act_bits,
    act_granularity=act_granularity,
    act_exponent=act_exponent,
    products=products,
  )
  wrap(lambda: None, **wrap_options)  # checked before the quantization, not after
  nnx = _nnx()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pure_q, alphas = quantize_tree(nnx.to_pure_dict(params), bits, **options)
  params, rest = _fresh(params), _fresh(rest)
  nnx.replace_by_pure_dict(params, pure_q)
  model_q = nnx.merge(graphdef, params, rest)
  names, items = tuple(methods), tuple(sorted(wrap_options.items()))
  _set_classes(model_q, lambda cls: _quantized_class(_base(cls), names, items))
  return model_q, alphas


def dequantize(model_q: Module) -> Module:
  """A float model of the original classes from a quantized one (or any model).

  Returns:
    A new model object: each :class:`QArray` parameter decoded, other state shared.
  """
  nnx = _nnx()
  graphdef, params, rest = nnx.split(model_q, nnx.Param, ...)
  params, rest = _fresh(params), _fresh(rest)
  nnx.replace_by_pure_dict(params, dequantize_tree(nnx.to_pure_dict(params)))
  model = nnx.merge(graphdef, params, rest)
  _set_classes(model, _base)
  return model


def params(model: Module) -> dict[str, PyTree]:
  """The model's parameters as a nested dict (``QArray`` where quantized), the tree
  :func:`pqjax.save` writes and :func:`load_params` puts back."""
  nnx = _nnx()
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def load_params(model_q: Module, tree: PyTree) -> None:
  """Puts a parameter tree (from :func:`params`, saved and loaded) into ``model_q``."""
  nnx = _nnx()
  state = nnx.state(model_q, nnx.Param)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model_q, state)
