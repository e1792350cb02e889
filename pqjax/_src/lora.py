"""LoRA adapters on a frozen quantized base (QLoRA), trained with optax.

``pqjax.lora.init`` replaces selected :class:`QArray` leaves by
:class:`LoraArray` nodes: the QArray and a low-rank adapter ``a (K, rank)``,
``b (rank, N)``, the weight they stand for being ``W + a @ b * scale``.
:func:`pqjax.wrap` runs a model on such a tree, computing each product as
``x @ W + ((x @ a) @ b) * scale`` with the base read as a plain QArray's, and
gradients reaching ``a`` and ``b`` but not the base. :func:`split` and :func:`merge`
separate what trains from what does not (an optimiser then sees only the
adapters); :func:`mask` marks the adapters for ``optax.masked`` and
``optax.multi_transform``; :func:`fold` adds the adapters into the weights and
quantizes them again, for serving.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike, DTypeLike

from pqjax._src.core.leaves import KeyPath, PyTree, path_str
from pqjax._src.core.qarray import (
  LoraArray,
  QArray,
  check_adapter,
  is_lora,
  is_stored,
)
from pqjax._src.quantize import quantize

# ``filter(path, leaf) -> bool``: whether to attach an adapter to a leaf.
AdapterFilter = Callable[[str, Any], bool]


def _default_filter(path: str, leaf: Any) -> bool:
  del path
  return isinstance(leaf, QArray)


def _leaf_name(path: tuple[Any, ...]) -> str:
  """A leaf's path as ``a/b/kernel``; in a Flax NNX state (``nnx.state(model)``) the
  variable's ``value`` attribute is left out, as :func:`pqjax.nnx.quantize` names
  parameters, so filters and the float tree match either form."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == 'value':
    path = path[:-1]
  return path_str(path)


def init(
  params_q: PyTree,
  rank: int = 8,
  *,
  key: jax.Array,
  alpha: float | None = None,
  filter: AdapterFilter | None = None,
  dtype: DTypeLike = jnp.float32,
  init: Literal['gaussian', 'residual'] = 'gaussian',
  params: PyTree = None,
) -> PyTree:
  """Attaches a LoRA adapter to each selected quantized leaf.

  Each selected :class:`QArray` of ``(K, N)`` view (:attr:`QArray.matrix_shape`)
  becomes a :class:`LoraArray` holding it and ``a (*layers, K, rank)``,
  ``b (*layers, rank, N)``: one adapter per layer of a leaf with layer axes. ``b``
  is zeros, so the adapted model starts as the quantized one; ``a`` is Gaussian
  with standard deviation ``1 / sqrt(K)``, so ``x @ a`` keeps the scale of ``x``.

  Args:
    params_q: a tree from :func:`pqjax.quantize`, or the parameters of a model from
      :func:`pqjax.nnx.quantize` (:func:`pqjax.nnx.params`, or its
      ``nnx.state(model_q, nnx.Param)``; :func:`pqjax.nnx.load_params` or
      ``nnx.update`` puts the result back into the model).
    rank: the adapters' rank, 1 or more.
    key: a JAX random key for ``a``; each leaf gets its own, in tree order.
    alpha: the adapters' multiplier is ``alpha / rank``; ``None`` (default) takes
      ``alpha = rank``, a multiplier of 1.
    filter: ``filter(path, leaf) -> bool`` picks the leaves (``path``:
      ``a/b/kernel``, without NNX's ``value``); it is called on every leaf, a
      QArray whole. Default: every QArray. A leaf it picks must be a QArray.
    dtype: the adapters' floating dtype (float32 by default, for training).
    init: ``"gaussian"`` (above), or ``"residual"``: ``a @ b * scale`` is the
      best rank-``rank`` approximation (SVD) of each leaf's quantization error
      ``W - dequantize(W_q)``, so the adapted model starts closer to the float one
      (data-free, as LoftQ's first step).
    params: the float tree ``params_q`` was quantized from; needed by
      ``init="residual"`` alone.

  Returns:
    ``params_q`` with each selected QArray replaced by a :class:`LoraArray`.

  Raises:
    ValueError: ``rank`` is below 1, ``alpha`` is not a finite number, ``dtype`` is
      not floating, or a picked leaf is not a QArray (its path named).
  """
  if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
    raise ValueError(f'rank must be an int >= 1, got {rank!r}')
  rank = int(rank)
  alpha = float(rank if alpha is None else alpha)
  if not math.isfinite(alpha):
    raise ValueError(f'alpha must be finite, got {alpha}')
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'dtype must be floating, got {np.dtype(dtype).name}')
  if init not in ('gaussian', 'residual'):
    raise ValueError(f'init must be "gaussian" or "residual", got {init!r}')
  if (init == 'residual') != (params is not None):
    raise ValueError('init="residual" needs the float params, and only it takes them')
  pick = _default_filter if filter is None else filter
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_q, is_leaf=is_stored)
  floats = _floats_by_path(params) if params is not None else {}
  chosen = []
  for i, (path, leaf) in enumerate(flat):
    if not pick(_leaf_name(path), leaf):
      continue
    if isinstance(leaf, LoraArray):
      raise ValueError(f'{_leaf_name(path)}: already has an adapter')
    if not isinstance(leaf, QArray):
      what = type(leaf).__name__
      raise ValueError(
        f'{_leaf_name(path)}: selected for an adapter but not quantized ({what});'
        ' adapters sit on QArray leaves'
      )
    chosen.append(i)
  leaves = [leaf for _, leaf in flat]
  if chosen:
    keys = jax.random.split(key, len(chosen))
    for i, k in zip(chosen, keys):
      name = _leaf_name(flat[i][0])
      if init == 'residual':
        if name not in floats:
          raise ValueError(f'{name}: no float leaf of that path in params')
        leaves[i] = _residual(name, leaves[i], floats[name], rank, alpha / rank, dtype)
      else:
        leaves[i] = _attach(leaves[i], rank, k, alpha / rank, dtype)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _floats_by_path(params: PyTree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_stored)[0]
  return {_leaf_name(p): x for p, x in flat}


def _leading_singular(m: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The ``r`` largest singular values of each ``(..., k, n)`` matrix and their
  vectors, ``(u (..., k, r), s (..., r), vt (..., r, n))``.

  From the eigenvectors of the smaller Gram matrix, in float64: as accurate as an
  SVD for the leading values (1e-15 relative on random matrices), and cheaper where
  only a few are wanted. MiniLM's 384 x 1536 kernels, one BLAS thread: 0.02 s
  against 0.09 s for NumPy's thin SVD; on a busy machine BLAS threads contend, and
  both took 2.3-2.6 s.
  """
  m = m.astype(np.float64)
  wide = m.shape[-2] <= m.shape[-1]
  short = m if wide else np.swapaxes(m, -1, -2)  # (..., small, large)
  values, vectors = np.linalg.eigh(short @ np.swapaxes(short, -1, -2))
  values, vectors = values[..., ::-1][..., :r], vectors[..., ::-1][..., :r]
  s = np.sqrt(np.maximum(values, 0.0))
  other = np.swapaxes(short, -1, -2) @ vectors / np.where(s > 0, s, 1.0)[..., None, :]
  u, v = (vectors, other) if wide else (other, vectors)
  return u, s, np.swapaxes(v, -1, -2)


def _residual(
  name: str, q: QArray, w: ArrayLike, rank: int, scale: float, dtype: DTypeLike
) -> LoraArray:
  """An adapter whose ``a @ b * scale`` is the rank-``rank`` SVD of ``w - W_q``."""
  if tuple(np.shape(w)) != q.shape:
    raise ValueError(f'{name}: float leaf of shape {np.shape(w)}, quantized {q.shape}')
  k, n = q.matrix_shape
  error = np.asarray(w, np.float32) - np.asarray(q.dequantize(), np.float32)
  if q.transposed:
    error = np.swapaxes(error, -1, -2)
  u, s, vt = _leading_singular(error.reshape(*q.layers, k, n), min(rank, k, n))
  r = s.shape[-1]
  root = np.sqrt(s[..., :r] / scale)
  a = np.zeros((*q.layers, k, rank), np.float32)
  b = np.zeros((*q.layers, rank, n), np.float32)
  a[..., :r] = u[..., :r] * root[..., None, :]
  b[..., :r, :] = root[..., :, None] * vt[..., :r, :]
  return LoraArray(base=q, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype), scale=scale)


def _attach(
  q: QArray, rank: int, key: jax.Array, scale: float, dtype: DTypeLike
) -> LoraArray:
  k, n = q.matrix_shape
  a = jax.random.normal(key, (*q.layers, k, rank), jnp.float32) / math.sqrt(k)
  b = jnp.zeros((*q.layers, rank, n), dtype)
  return LoraArray(base=q, a=a.astype(dtype), b=b, scale=scale)


def split(params_l: PyTree) -> tuple[PyTree, PyTree]:
  """Separates the adapters (what trains) from everything else (frozen).

  Args:
    params_l: a tree from :func:`init`.

  Returns:
    ``(adapters, frozen)``, both of ``params_l``'s structure: ``adapters`` holds
    each :class:`LoraArray`'s ``a`` and ``b`` (its ``base`` None) and None in place
    of every other leaf, so an optax optimiser and ``jax.grad`` see the adapter
    arrays alone; ``frozen`` holds each LoraArray's base (its ``a`` and ``b``
    None) and every other leaf as it is. :func:`merge` puts them back together.
  """

  def adapter(x: Any) -> Any:
    if isinstance(x, LoraArray):
      return LoraArray(base=None, a=x.a, b=x.b, scale=x.scale)  # type: ignore[arg-type]
    return None

  def rest(x: Any) -> Any:
    if isinstance(x, LoraArray):
      return LoraArray(base=x.base, a=None, b=None, scale=x.scale)  # type: ignore[arg-type]
    return x

  adapters = jax.tree_util.tree_map(adapter, params_l, is_leaf=is_stored)
  frozen = jax.tree_util.tree_map(rest, params_l, is_leaf=is_stored)
  return adapters, frozen


def merge(adapters: PyTree, frozen: PyTree) -> PyTree:
  """The tree :func:`split` separated: ``merge(*split(params_l))`` is ``params_l``.

  Args:
    adapters: the first tree of :func:`split`, possibly updated (trained).
    frozen: the second.

  Returns:
    The tree with each :class:`LoraArray` whole again.

  Raises:
    ValueError: the trees do not match (an adapter where ``frozen`` holds no
      LoraArray, or a scale that differs), or an adapter's shape or dtype does not
      fit its base; the leaf's path is named.
  """

  def join(path: KeyPath, ad: Any, fr: Any) -> Any:
    if ad is None:
      return fr
    name = _leaf_name(path)
    if not (isinstance(fr, LoraArray) and isinstance(fr.base, QArray)):
      raise ValueError(
        f'{name}: an adapter where the frozen tree holds {type(fr).__name__}, not'
        ' the base of a LoraArray'
      )
    if ad.scale != fr.scale:
      raise ValueError(f'{name}: adapter scale {ad.scale} is not the frozen {fr.scale}')
    try:
      check_adapter(fr.base, jnp.asarray(ad.a), jnp.asarray(ad.b))
    except ValueError as e:
      raise ValueError(f'{name}: {e}') from None
    return LoraArray(base=fr.base, a=ad.a, b=ad.b, scale=fr.scale)

  return jax.tree_util.tree_map_with_path(
    join, adapters, frozen, is_leaf=lambda x: x is None or is_lora(x)
  )


def mask(params_l: PyTree) -> PyTree:
  """A tree of bools marking the adapter arrays, for ``optax.masked``.

  Args:
    params_l: a tree from :func:`init`.

  Returns:
    A prefix of ``params_l``'s structure (as ``optax.masked`` and
    ``optax.multi_transform`` take it): each :class:`LoraArray` becomes one with
    ``a`` and ``b`` True and ``base`` False (one bool for the whole QArray); every
    other leaf, a QArray whole, False.
  """

  def one(x: Any) -> Any:
    if isinstance(x, LoraArray):
      return LoraArray(base=False, a=True, b=True, scale=x.scale)  # type: ignore[arg-type]
    return False

  return jax.tree_util.tree_map(one, params_l, is_leaf=is_stored)


def fold(params_l: PyTree, **quantize_options: Any) -> PyTree:
  """Adds each adapter into its weight and quantizes the result again.

  Each :class:`LoraArray` is decoded with its adapter added
  (:meth:`LoraArray.dequantize`) and quantized by :func:`pqjax.quantize`, exactly
  as ``pqjax.quantize`` quantizes that float array with the same options. Options
  not given follow the base: its ``bits`` (unless ``bits_per_weight`` is given),
  its ``layer_axes`` and its output axis (-2 for a ``transposed`` base); other
  options take :func:`pqjax.quantize`'s defaults. Leaves without an adapter are
  returned as they are.

  Args:
    params_l: a tree from :func:`init`, trained.
    **quantize_options: options of :func:`pqjax.quantize` (``bits``,
      ``granularity``, ``bits_per_weight``...), applied to the adapted leaves.
      ``filter`` sees each adapted leaf's path; one it leaves out stays float.

  Returns:
    A tree without adapters: each LoraArray replaced by a QArray (a plain tree
    for :func:`pqjax.wrap`, checkpoints and serving).

  Raises:
    ValueError: an option is invalid (as :func:`pqjax.quantize` raises it).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params_l, is_leaf=is_stored)
  adapted = {_leaf_name(p): x for p, x in flat if isinstance(x, LoraArray)}
  if not adapted:
    return params_l
  floats = {name: x.dequantize() for name, x in adapted.items()}
  options = dict(quantize_options)
  options.setdefault('layer_axes', lambda name, _: adapted[name].base.layer_axes)
  options.setdefault(
    'output_axis', lambda name, _: -2 if adapted[name].base.transposed else -1
  )
  if 'bits' in options or 'bits_per_weight' in options:
    folded, _ = quantize(floats, **options)
  else:
    # Each leaf at its base's width: one quantize per width.
    folded = {}
    for bits in sorted({x.base.bits for x in adapted.values()}):
      part = {n: w for n, w in floats.items() if adapted[n].base.bits == bits}
      folded.update(quantize(part, bits, **options)[0])
  leaves = [folded[_leaf_name(p)] if isinstance(x, LoraArray) else x for p, x in flat]
  return jax.tree_util.tree_unflatten(treedef, leaves)
