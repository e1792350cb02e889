"""Fitting each layer's exponent and clip ratio: on binned statistics, then exactly.

Each layer's search is independent of the others' (unless the exponent is shared):
it runs on a few layers at a time, by programs of one width each
(:func:`search_each_width`, :func:`estimate_each_width`) that depend on no layer's
shape and no count of layers, so that another tree or another budget compiles no
search. A shared exponent sums the errors of every layer, in one program for the
whole tree. The exact refinement takes each layer's width as a value.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pqjax._src.core import grid as grid_lib
from pqjax._src.core import operator
from pqjax._src.search.config import Plan, SearchConfig
from pqjax._src.search.objective import stats_error
from pqjax._src.search.optimiser import alternate, minimise
from pqjax._src.search.stats import (
  coarsen,
  grid_bins,
  layer_binary_exponent,
  normalise,
  prepare_stack,
  stack,
  sum_weights,
)


@functools.partial(jax.jit, static_argnames=('bits', 'grid', 'plan', 'config'))
def search_stats(
  stats: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  bits: int,
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  """Exponent and clip ratio of each layer from binned stats ``(L, 2, bins, 2)``.

  ``alpha`` and ``clip`` ``(L,)`` are kept where ``plan`` does not search them.
  ``exponents`` ``(L,)``: each layer's stats are normalised by ``2 ** (2 e)``
  (:func:`stats.normalise`), which a shared exponent's summed error undoes.
  """
  coarse = coarsen(stats, max(1, stats.shape[2] // grid_bins(bits)))
  return minimise(
    lambda a, c: stats_error(stats, a, c, bits, grid),
    alpha,
    clip,
    plan,
    config,
    lambda a, c: stats_error(coarse, a, c, bits, grid),
    weights=sum_weights(exponents),
  )


# Under a bit budget every layer's error is estimated at every candidate width: a
# shorter search (a grid of 8 exponents by 4 clip ratios, one round of a few
# golden-section steps) on bins only as fine as the width's levels need, then the
# error at its result on the full bins. On MiniLM these errors are within 2% of the
# full search's on average, at each width from 2 to 8 bits, for half its time.


def estimate_config(config: SearchConfig) -> SearchConfig:
  """The shorter schedule of :func:`width_errors`, in ``config``'s ranges."""
  return dataclasses.replace(
    config,
    exponent_points=min(config.exponent_points, 8),
    clip_points=min(config.clip_points, 4),
    iters=min(config.iters, 6),
    clip_iters=min(config.clip_iters, 5),
    rounds=1,
  )


def estimate_bins(bits: int) -> tuple[int, int]:
  """Bins of the estimate's golden-section steps and of its grid, at ``bits``.

  Finer with more levels: 256 up to 4 bits, 512 at 5 and 6, 1024 at 7 and 8; the
  grid's as :func:`grid_bins`, 128 below 5 bits.
  """
  return 256 << max(0, (bits - 3) // 2), 128 if bits < 5 else grid_bins(bits)


@functools.partial(jax.jit, static_argnames=('widths', 'grid', 'plan', 'config'))
def width_errors(
  stats: jax.Array,
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  widths: tuple[int, ...],
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Estimated error of each layer at each width, and where it was found.

  From binned stats ``(L, 2, bins, 2)``: ``(errors, alphas, clips)``, each
  ``(len(widths), L)``. Like :func:`stats_error`, each error is the layer's less a
  constant of that layer, the same at every width. ``exponents`` as in
  :func:`search_stats`.
  """
  bins = stats.shape[2]
  weights = sum_weights(exponents)
  short = estimate_config(config)

  def at(bits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    fine_bins, grid_bins = estimate_bins(bits)
    fine = coarsen(stats, max(1, bins // fine_bins))
    coarse = coarsen(stats, max(1, bins // grid_bins))
    a, c = minimise(
      lambda a, c: stats_error(fine, a, c, bits, grid),
      alpha,
      clip,
      plan,
      short,
      lambda a, c: stats_error(coarse, a, c, bits, grid),
      weights=weights,
    )
    return stats_error(stats, a, c, bits, grid), a, c

  errors, alphas, clips = zip(*[at(b) for b in widths])
  return jnp.stack(errors), jnp.stack(alphas), jnp.stack(clips)


@functools.partial(jax.jit, static_argnames=('widths', 'grid', 'plan', 'config', 'warm'))
def search_widths(
  stats: Sequence[jax.Array],
  alpha: jax.Array,
  clip: jax.Array,
  exponents: jax.Array,
  *,
  widths: tuple[int, ...],
  grid: str,
  plan: Plan,
  config: SearchConfig,
  warm: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """The search of layers at several widths, in one program.

  ``stats[i]`` holds the layers at ``widths[i]``; ``alpha`` and ``clip`` are all
  layers', in that order. Without ``warm`` each layer is searched as
  :func:`search_stats` searches it at its width, and with ``plan.shared`` one
  exponent minimises the summed error of all. With ``warm`` the search starts from
  ``(alpha, clip)`` (a point of :func:`width_errors`), whose short search stands for
  the grid and the first round: one round of golden-section steps on the full
  bins, brackets one grid step either side. On MiniLM that ends within 0.3% of the
  full search's error at 5 bits and below it at 6 to 8, in half its time.
  """
  weights = sum_weights(exponents)
  sizes = [s.shape[0] for s in stats]
  offsets = np.cumsum([0] + sizes)
  cuts = list(zip(offsets[:-1], offsets[1:]))
  bins = stats[0].shape[2]
  coarse = [coarsen(s, max(1, bins // grid_bins(b))) for s, b in zip(stats, widths)]

  def objective(every: Sequence[jax.Array]):
    return lambda a, c: jnp.concatenate(
      [
        stats_error(s, a[lo:hi], c[lo:hi], b, grid)
        for s, b, (lo, hi) in zip(every, widths, cuts)
      ]
    )

  if warm:
    return alternate(
      objective(stats),
      alpha,
      clip,
      plan=plan,
      a_half=(config.hi - config.lo) / (config.exponent_points - 1),
      c_half=(1.0 - config.clip_lo) / (config.clip_points - 1),
      iters=config.iters,
      clip_iters=config.clip_iters,
      rounds=1,
      config=config,
      weights=weights,
    )
  return minimise(
    objective(stats), alpha, clip, plan, config, objective(coarse), weights=weights
  )


# Layers a program of :func:`search_each_width` or :func:`estimate_each_width`
# handles at once. Its programs then depend on the width alone, not on the tree nor
# on how many layers a budget gives each width: the first tree compiles them (~1 s
# each), and later budgets and trees with the same settings compile none. A last
# chunk is filled with empty layers; each layer's search is independent, so the
# results are those of one program for all layers, bit for bit. Measured on 40
# layers (MiniLM's count): the estimate at 7 widths takes 251 ms in chunks of 2,
# 189 in chunks of 4, 160 in chunks of 8 and 144 in one program (the calls'
# dispatch); the full search 130-141 ms at any of these sizes, 141 in one program.
CHUNK = 8


def _chunk_args(bins: int) -> tuple[jax.ShapeDtypeStruct, ...]:
  """Shapes of one chunk's statistics, exponents, clip ratios and scale exponents."""
  one = jax.ShapeDtypeStruct((CHUNK,), jnp.float32)
  return (
    jax.ShapeDtypeStruct((CHUNK, 2, bins, 2), jnp.float32),
    one,
    one,
    jax.ShapeDtypeStruct((CHUNK,), jnp.int32),
  )


# A program compiled ahead: what determines it (a key, so that several leaves alike
# compile it once), and its compilation.
Compilation = tuple[Hashable, Callable[[], object]]


def compilations(
  widths: Sequence[int], bins: int, *, grid: str, plan: Plan, config: SearchConfig
) -> list[Compilation]:
  """The compilations of :func:`search_each_width`'s program of each width."""
  stats, alpha, clip, exponents = _chunk_args(bins)

  def at(bits: int) -> object:
    return search_widths.lower(
      (stats,),
      alpha,
      clip,
      exponents,
      widths=(bits,),
      grid=grid,
      plan=plan,
      config=config,
      warm=True,
    ).compile()

  return [
    (('search', int(b), bins, grid, plan, config), functools.partial(at, int(b)))
    for b in widths
  ]


# Compilations run at once at most: each holds the memory of its compiler.
MAX_COMPILE_THREADS = 8


def compile_all(jobs: Sequence[Compilation]) -> None:
  """Compiles programs ahead (each then in JAX's cache), several at a time.

  XLA compiles outside Python's lock: on a machine of several cores the programs a
  bit budget compiles for later budgets cost little more time than one. A program
  compiled already is found in JAX's cache, in well under a millisecond.
  """
  todo = dict(jobs)
  if not todo:
    return
  # The threads lower under the caller's setting of 64-bit types, which is local to
  # its thread: the programs are then the ones its calls look up.
  x64 = bool(jax.config.read('jax_enable_x64'))

  def run(job: Callable[[], object]) -> object:
    with jax.enable_x64(x64):
      return job()

  workers = min(len(todo), os.cpu_count() or 1, MAX_COMPILE_THREADS)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for _ in pool.map(run, todo.values()):
      pass


def _chunks(
  stats: np.ndarray, alpha: np.ndarray, clip: np.ndarray, index: np.ndarray
) -> list[tuple[np.ndarray, tuple[jax.Array, ...]]]:
  """``index``'s layers in chunks of :data:`CHUNK`, each with its device arguments.

  A last short chunk is filled with empty layers (exponent and clip ratio 1). The
  scale exponents weigh only a shared exponent's summed error: none here.
  """
  out = []
  for lo in range(0, index.size, CHUNK):
    part = index[lo : lo + CHUNK]
    s = np.zeros((CHUNK, *stats.shape[1:]), np.float32)
    a, c = np.ones(CHUNK, np.float32), np.ones(CHUNK, np.float32)
    s[: part.size] = stats[part]
    a[: part.size] = alpha[part]
    c[: part.size] = clip[part]
    out.append((part, jax.device_put((s, a, c, np.zeros(CHUNK, np.int32)))))
  return out


def estimate_compilations(
  widths: Sequence[int], bins: int, *, grid: str, plan: Plan, config: SearchConfig
) -> list[Compilation]:
  """The compilations of :func:`estimate_each_width`'s program of each width."""

  def at(bits: int) -> object:
    return width_errors.lower(
      *_chunk_args(bins), widths=(bits,), grid=grid, plan=plan, config=config
    ).compile()

  return [
    (('estimate', int(b), bins, grid, plan, config), functools.partial(at, int(b)))
    for b in widths
  ]


def estimate_each_width(
  stats: np.ndarray,
  alpha: np.ndarray,
  clip: np.ndarray,
  *,
  widths: Sequence[int],
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """:func:`width_errors` of every layer, by programs of one width and chunk each.

  The programs depend on the width and the settings alone, not on the number of
  layers: a tree of other layers, or another budget, compiles none. Each layer's
  estimate is independent of the others' (not ``plan.shared``), so the results are
  those of one program for all layers.

  Args:
    stats: binned statistics of every layer ``(L, 2, bins, 2)``, on the host.
    alpha: each layer's starting exponent ``(L,)``.
    clip: each layer's starting clip ratio ``(L,)``.
    widths: the candidate widths.
    grid: the grid of levels.
    plan: what the search varies; not ``plan.shared``.
    config: the search settings.

  Returns:
    ``(errors, alphas, clips)``, each ``(len(widths), L)``, as host arrays.
  """
  assert not plan.shared
  chunks = _chunks(stats, alpha, clip, np.arange(stats.shape[0]))
  # Every call is dispatched before any result is read.
  found = [
    [
      width_errors(*args, widths=(int(b),), grid=grid, plan=plan, config=config)
      for _, args in chunks
    ]
    for b in widths
  ]
  out = np.zeros((3, len(widths), stats.shape[0]), np.float32)
  for i, row in enumerate(found):
    for (part, _), results in zip(chunks, row):
      for j, r in enumerate(results):
        out[j, i, part] = np.asarray(r)[0, : part.size]
  return out[0], out[1], out[2]


def search_each_width(
  stats: np.ndarray,
  alpha: np.ndarray,
  clip: np.ndarray,
  bits: np.ndarray,
  *,
  grid: str,
  plan: Plan,
  config: SearchConfig,
  warm: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
  """The search of each layer at its width, by programs of one width and chunk each.

  With ``warm``, :func:`search_widths`'s from each layer's point; without,
  :func:`search_stats`'s. The programs depend on the width and the settings alone,
  not on the number of layers: a tree of other layers compiles none.

  Args:
    stats: binned statistics of every layer ``(L, 2, bins, 2)``, on the host.
    alpha: each layer's starting exponent ``(L,)`` (with ``warm``, a point of
      :func:`width_errors`).
    clip: each layer's starting clip ratio ``(L,)``.
    bits: each layer's width ``(L,)``.
    grid: the grid of levels.
    plan: what the search varies; not ``plan.shared``, whose exponent is common to
      every layer.
    config: the search settings.
    warm: whether the search starts from ``(alpha, clip)``.

  Returns:
    The exponents and clip ratios ``(L,)`` found, as host arrays.
  """
  assert not plan.shared
  settings = dict(grid=grid, plan=plan, config=config)
  parts = []
  for b in np.unique(bits):
    for part, (s, a, c, e) in _chunks(stats, alpha, clip, np.flatnonzero(bits == b)):
      # Every call is dispatched before any result is read.
      if warm:
        found = search_widths((s,), a, c, e, widths=(int(b),), warm=True, **settings)
      else:
        found = search_stats(s, a, c, e, bits=int(b), **settings)
      parts.append((part, found))
  alpha, clip = np.array(alpha, np.float32), np.array(clip, np.float32)
  for part, (a, c) in parts:
    alpha[part], clip[part] = np.asarray(a)[: part.size], np.asarray(c)[: part.size]
  return alpha, clip


def needs_refine(size: int, config: SearchConfig) -> bool:
  """Whether layers of ``size`` weights get the exact refinement."""
  return config.refine_iters > 0 and size < config.refine_below


def layer_steps(bits: Sequence[int] | np.ndarray, grid: str) -> np.ndarray:
  """Each layer's ``(d_neg, d_pos)`` (:func:`grid.steps`) ``(L, 2)``, as float32."""
  return np.array([grid_lib.steps(int(b), grid) for b in bits], np.float32).reshape(-1, 2)


@functools.partial(jax.jit, static_argnames=('views', 'grid', 'plan', 'config'))
def refine_layers(
  groups: Sequence[Sequence[jax.Array]],
  alpha: jax.Array,
  clip: jax.Array,
  steps: jax.Array,
  order: jax.Array,
  *,
  views: Sequence[tuple[int, int, int, int]],
  grid: str,
  plan: Plan,
  config: SearchConfig,
) -> tuple[jax.Array, jax.Array]:
  """Exact refinement of ``(alpha, clip)``, one each per layer.

  ``views[i]`` is ``(K, N, nk, ncol)`` of group ``i``. The groups' layers, in order,
  are ``alpha[order]``: ``alpha`` and ``clip`` (and the results) may list them in
  any order, in which a shared exponent sums their errors. ``steps`` ``(L, 2)`` is
  each layer's ``(d_neg, d_pos)`` (:func:`layer_steps`), in the groups' order: a
  value, so that one program serves every choice of widths.
  """
  prepared = [
    prepare_stack(stack(g, k, n), nk, ncol) for g, (k, n, nk, ncol) in zip(groups, views)
  ]
  exponents = jnp.concatenate([layer_binary_exponent(scale) for _, scale in prepared])
  err = jax.vmap(functools.partial(operator.block_error, grid=grid))
  sizes = [xs.shape[0] for xs, _ in prepared]
  offsets = np.cumsum([0] + sizes)
  fs = []
  for (xs, scale), o, size in zip(prepared, offsets, sizes):
    e = exponents[o : o + size]
    d_neg, d_pos = (steps[o : o + size, i].reshape(-1, 1, 1, 1) for i in (0, 1))
    # As exact_inputs, with the layer's code ranges.
    x = jnp.abs(xs)
    fs.append(((x, jnp.log(x), jnp.where(xs < 0, d_neg, d_pos)), normalise(scale, e)))
  # Where each of the caller's layers is among the groups'.
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.size, dtype=order.dtype))

  def per_layer(a, c):
    a, c = a[order], c[order]
    errors = jnp.concatenate(
      [
        err(x, log_x, d, scale, a[o : o + s], c[o : o + s])
        for ((x, log_x, d), scale), o, s in zip(fs, offsets, sizes)
      ]
    )
    return errors[inverse]

  return alternate(
    per_layer,
    alpha,
    clip,
    plan=plan,
    a_half=config.refine_width,
    c_half=config.refine_clip_width,
    iters=config.refine_iters,
    clip_iters=config.refine_iters,
    rounds=1,
    config=config,
    weights=sum_weights(exponents[inverse]),
  )
