"""The program rewrite behind ``wrap``: quantized weights are decoded where they are used.

The function to run is traced to a jaxpr in which each quantized leaf is an input of
its decoded shape. The jaxpr is then evaluated again, equation by equation, inside
the caller's trace (``jax.jit``, ``jax.grad``, ``jax.vmap`` work as usual), with each
quantized leaf carried as a :class:`~pqjax._src.runtime.weights.Weight`:

- operations that only move, cast or slice values (reshape, transpose, dtype
  conversion...) are recorded on the weight and replayed after decoding;
- a matrix product or convolution of a weight goes to :mod:`.products`, which reads
  the codes directly for a few rows, or decodes the weight tied to the activation;
- a row lookup in an embedding table (``jnp.take``, ``table[ids]``) decodes only the
  rows it gathers;
- nested programs are followed: ``jit`` and ``closed_call`` are inlined, remat keeps
  its policy around the rewritten body, and ``scan``, ``while`` and ``cond`` are
  rebuilt with the weights' codes as inputs, so a stacked weight is decoded inside
  the loop body one layer per step, and a loop-invariant weight once per step
  where it is used;
- any other use decodes the weight, tied to that operation's other inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax
from jax.extend import core

from pqjax._src.core.leaves import is_array
from pqjax._src.runtime import products
from pqjax._src.runtime.binding import bind
from pqjax._src.runtime.weights import Packed, Weight, as_layers, fields, rebuild

# Primitives whose first operand's values reach the output only moved, cast or
# repeated: a weight seen through them is recorded, not decoded.
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
  }
)
CASTS = frozenset({'convert_element_type', 'copy', 'copy_p', 'reduce_precision'})
# Call-like primitives whose one inner program is inlined.
INLINED = {
  'jit': 'jaxpr',
  'pjit': 'jaxpr',
  'closed_call': 'call_jaxpr',
  'core_call': 'call_jaxpr',
}
REMAT = frozenset({'remat2', 'checkpoint', 'remat'})

Value = Any  # an array, a tracer, or a Weight


def _swaps_last_axes(eqn: core.JaxprEqn) -> bool:
  """Whether ``eqn`` is a transpose of the last two axes only."""
  if eqn.primitive.name != 'transpose':
    return False
  perm = tuple(eqn.params['permutation'])
  n = len(perm)
  return n >= 2 and perm == (*range(n - 2), n - 1, n - 2)


def _is_weight(x: Any) -> bool:
  return isinstance(x, Weight)


def _first_array(values: Sequence[Value]) -> jax.Array | None:
  """An operand to tie a decode to: the first that is not a weight."""
  return next((v for v in values if not _is_weight(v) and hasattr(v, 'shape')), None)


@dataclasses.dataclass
class Rewriter:
  """Evaluates jaxprs with quantized weights decoded at their uses.

  Attributes:
    options: how products are computed (see :class:`products.Options`).
    seen: every product of a quantized weight met, in program order.
  """

  options: products.Options
  seen: list[products.Product] = dataclasses.field(default_factory=list)

  def eval(
    self, jaxpr: core.Jaxpr, consts: Sequence[Any], args: Sequence[Value]
  ) -> list[Value]:
    """The outputs of ``jaxpr`` on ``args``; weights may flow through to outputs."""
    env: dict[Any, Value] = {}

    def read(v: Any) -> Value:
      return v.val if isinstance(v, core.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      if any(_is_weight(v) for v in invals):
        outs = self.equation(eqn, invals)
      else:
        outs = bind(eqn, invals)
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def arrays(self, values: Sequence[Value], tie: jax.Array | None = None) -> list[Any]:
    """``values`` with every weight decoded (tied to ``tie`` if given)."""
    return [v.decode(tie) if _is_weight(v) else v for v in values]

  def equation(self, eqn: core.JaxprEqn, invals: list[Value]) -> list[Value]:
    name = eqn.primitive.name
    if name in LAYOUT_PRIMITIVES and _is_weight(invals[0]):
      if not any(_is_weight(v) for v in invals[1:]):
        return [self.record(eqn, invals)]
    if name == 'optimization_barrier':
      # Weights pass through; the barrier orders the other values as before.
      rest = [i for i, v in enumerate(invals) if not _is_weight(v)]
      outs = list(invals)
      if rest:
        for i, o in zip(rest, lax.optimization_barrier([invals[i] for i in rest])):
          outs[i] = o
      return outs
    if name in products.PRODUCTS:
      outs, use = products.product(eqn, invals, self.options)
      self.seen += use
      return outs
    if name == 'gather':
      outs, use = products.gather(eqn, invals, self.options)
      self.seen += use
      return outs
    if name in INLINED:
      inner = eqn.params[INLINED[name]]
      if isinstance(inner, core.ClosedJaxpr):
        return self.eval(inner.jaxpr, inner.consts, invals)
      return self.eval(inner, [], invals)
    if name in REMAT:
      return self.remat(eqn, invals)
    if name == 'scan':
      return self.scan(eqn, invals)
    if name == 'while':
      return self.while_loop(eqn, invals)
    if name == 'cond':
      return self.cond(eqn, invals)
    # Anything else (custom derivatives, arithmetic, reductions...) sees the decoded
    # weight, decoded once it can run.
    return bind(eqn, self.arrays(invals, _first_array(invals)))

  def record(self, eqn: core.JaxprEqn, invals: list[Value]) -> Weight:
    weight, rest = invals[0], invals[1:]
    if _swaps_last_axes(eqn) and weight.casts_only:
      # W.T of a stored matrix reads the same codes: products keep their fast paths.
      q = weight.q
      if len(q.shape) - q.layer_axes == 2:
        return dataclasses.replace(weight, q=q.swapped())
    op = lambda w: bind(eqn, [w, *rest])[0]
    dtype = getattr(eqn.outvars[0].aval, 'dtype', None)
    return weight.then(op, cast=eqn.primitive.name in CASTS, dtype=dtype)

  # --- nested programs --------------------------------------------------------------

  def call(
    self,
    jaxpr: core.ClosedJaxpr,
    packs: Sequence[Packed | None],
    flat: Sequence[Any],
    sizes: Sequence[int],
  ) -> list[Any]:
    """Evaluates ``jaxpr`` on inputs given flat (weights as their fields); arrays out."""
    args, i = [], 0
    for pack, size in zip(packs, sizes):
      part = list(flat[i : i + size])
      args.append(part[0] if pack is None else rebuild(pack, part))
      i += size
    return self.arrays(self.eval(jaxpr.jaxpr, jaxpr.consts, args))

  def remat(self, eqn: core.JaxprEqn, invals: list[Value]) -> list[Value]:
    inner = eqn.params['jaxpr']
    closed = inner if isinstance(inner, core.ClosedJaxpr) else core.ClosedJaxpr(inner, ())
    packs, flat, sizes = _flatten(invals)
    body = functools.partial(self.call, closed, packs, sizes=sizes)
    fn = jax.checkpoint(
      lambda *xs: body(xs),
      prevent_cse=eqn.params.get('prevent_cse', True),
      policy=eqn.params.get('policy'),
    )
    return list(fn(*flat))

  def scan(self, eqn: core.JaxprEqn, invals: list[Value]) -> list[Value]:
    p = eqn.params
    nc, ncarry = p['num_consts'], p['num_carry']
    consts, init, xs = invals[:nc], invals[nc : nc + ncarry], invals[nc + ncarry :]
    init = self.arrays(init, _first_array(init))
    xs = [self.stacked(x, p['length']) if _is_weight(x) else x for x in xs]
    packs_c, flat_c, sizes_c = _flatten(consts)
    packs_x, flat_x, sizes_x = _flatten(xs, sliced=True)
    body: core.ClosedJaxpr = p['jaxpr']

    def step(carry: list[Any], x: list[Any]) -> tuple[list[Any], list[Any]]:
      outs = self.call(
        body,
        [*packs_c, *([None] * ncarry), *packs_x],
        [*flat_c, *carry, *x],
        [*sizes_c, *([1] * ncarry), *sizes_x],
      )
      return outs[:ncarry], outs[ncarry:]

    carry, ys = lax.scan(
      step,
      init,
      flat_x,
      length=p['length'],
      reverse=p['reverse'],
      unroll=p['unroll'],
    )
    return [*carry, *ys]

  def stacked(self, w: Weight, length: int) -> Value:
    """A weight scanned over: sliced per step where its storage allows it."""
    # A leaf quantized whole has one adapter over all its layers' rows: decoded.
    whole_adapter = w.adapter is not None and not w.q.layer_axes
    layers = as_layers(w.q, length) if w.casts_only and not whole_adapter else None
    if layers is None:
      return w.decode()
    return dataclasses.replace(w, q=layers)

  def while_loop(self, eqn: core.JaxprEqn, invals: list[Value]) -> list[Value]:
    p = eqn.params
    nc, nb = p['cond_nconsts'], p['body_nconsts']
    cond_consts, body_consts, init = invals[:nc], invals[nc : nc + nb], invals[nc + nb :]
    init = self.arrays(init, _first_array(init))
    packs_c, flat_c, sizes_c = _flatten(cond_consts)
    packs_b, flat_b, sizes_b = _flatten(body_consts)
    n = len(init)

    def cond_fn(carry: Any) -> Any:
      return self.call(
        p['cond_jaxpr'],
        [*packs_c, *([None] * n)],
        [*flat_c, *carry],
        [*sizes_c, *([1] * n)],
      )[0]

    def body_fn(carry: Any) -> Any:
      return self.call(
        p['body_jaxpr'],
        [*packs_b, *([None] * n)],
        [*flat_b, *carry],
        [*sizes_b, *([1] * n)],
      )

    return list(lax.while_loop(cond_fn, body_fn, list(init)))

  def cond(self, eqn: core.JaxprEqn, invals: list[Value]) -> list[Value]:
    index, ops = invals[0], invals[1:]
    if _is_weight(index):
      index = index.decode()
    packs, flat, sizes = _flatten(ops)
    branches = [
      functools.partial(lambda b, *xs: self.call(b, packs, xs, sizes), b)
      for b in eqn.params['branches']
    ]
    return list(lax.switch(index, branches, *flat))


def _flatten(
  values: Sequence[Value], sliced: bool = False
) -> tuple[list[Packed | None], list[Any], list[int]]:
  """Values as flat arrays for a program boundary: a weight becomes its fields."""
  packs: list[Packed | None] = []
  flat: list[Any] = []
  sizes: list[int] = []
  for v in values:
    if _is_weight(v):
      parts = fields(v)
      packs.append(Packed(v, sliced=sliced))
    else:
      parts = [v]
      packs.append(None)
    flat += parts
    sizes.append(len(parts))
  return packs, flat, sizes


def run(
  fn: Callable[..., Any],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
  rewriter: Rewriter,
  is_quantized: Callable[[Any], bool],
  weight_of: Callable[[Any, tuple[Any, ...]], Weight],
) -> Any:
  """``fn(*args, **kwargs)`` with its quantized leaves decoded where they are used.

  Arguments holding no quantized leaf are passed to ``fn`` as they are (the same
  objects); the others are rebuilt around the program's inputs.
  """
  holds = lambda x: any(
    is_quantized(v) for v in jax.tree_util.tree_leaves(x, is_leaf=is_quantized)
  )
  # Positions and keywords in separate dicts: a dict mixing int and str keys cannot
  # be flattened (its keys are sorted).
  chosen = (
    {i: a for i, a in enumerate(args) if holds(a)},
    {k: v for k, v in kwargs.items() if holds(v)},
  )
  leaves, treedef = jax.tree_util.tree_flatten_with_path(chosen, is_leaf=is_quantized)
  values = [x for _, x in leaves]
  # Arrays and quantized leaves become inputs of the traced program; anything else
  # (flags, names, modules) stays a Python value, as in a direct call.
  dynamic = [i for i, x in enumerate(values) if is_quantized(x) or is_array(x)]
  specs = [
    jax.ShapeDtypeStruct(values[i].shape, values[i].dtype)
    if is_quantized(values[i])
    else values[i]
    for i in dynamic
  ]
  out_info: list[Any] = []

  def flat_fn(*inputs: Any) -> list[Any]:
    filled = list(values)
    for i, v in zip(dynamic, inputs):
      filled[i] = v
    positional, keywords = jax.tree_util.tree_unflatten(treedef, filled)
    a = [positional.get(i, x) for i, x in enumerate(args)]
    k = {name: keywords.get(name, x) for name, x in kwargs.items()}
    out_leaves, out_tree = jax.tree_util.tree_flatten(fn(*a, **k))
    arrays = [i for i, x in enumerate(out_leaves) if is_array(x)]
    out_info.append((out_tree, out_leaves, arrays))
    return [out_leaves[i] for i in arrays]

  closed = jax.make_jaxpr(flat_fn)(*specs)
  inputs = [
    # Drop the path's first entry (positional or keyword): '0/params/...', 'decoder/...'.
    weight_of(values[i], leaves[i][0][1:]) if is_quantized(values[i]) else values[i]
    for i in dynamic
  ]
  outs = rewriter.arrays(rewriter.eval(closed.jaxpr, closed.consts, inputs))
  out_tree, out_leaves, arrays = out_info[0]
  result = list(out_leaves)
  for i, v in zip(arrays, outs):
    result[i] = v
  return jax.tree_util.tree_unflatten(out_tree, result)
