"""Exponent search: a coarse grid, then golden-section inside the best bracket.

The reconstruction error ``E(a) = ||W - W_hat(a)||^2`` is locally convex with a single
minimum for real weight distributions, but rounding makes it slightly ragged and a
bracket far from the minimum can hold a shallow local one. The coarse grid picks the
bracket around the best grid point; golden-section then narrows it. The result is the
best of the golden-section point and the best grid point, so the search never returns
worse than the grid.

Everything runs inside ``jax.jit``, for a whole stack of equal-shape layers at once
(``jax.vmap`` over the layer axis).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from pqjax import power

_INV_PHI = (5 ** 0.5 - 1) / 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
  """Settings of the exponent search.

  Attributes:
    lo: smallest exponent considered.
    hi: largest exponent considered. ``a = 1`` is uniform quantization; ``a < 1``
      puts more levels near zero, ``a > 1`` near the block maximum.
    grid: points of the coarse grid over ``[lo, hi]``.
    iters: golden-section steps inside the bracket; the bracket shrinks by 0.618
      each step, so 24 steps narrow ``2 (hi - lo) / (grid - 1)`` about 100000 times.
  """

  lo: float = 0.05
  hi: float = 2.0
  grid: int = 24
  iters: int = 24

  def __post_init__(self):
    if not 0 < self.lo < self.hi:
      raise ValueError(f'search range must satisfy 0 < lo < hi, got ({self.lo}, {self.hi})')
    if self.grid < 3 or self.iters < 1:
      raise ValueError(f'grid must be >= 3 and iters >= 1, got {self.grid}, {self.iters}')


def minimise(f: Callable[[jax.Array], jax.Array], shape: tuple[int, ...],
             config: SearchConfig) -> jax.Array:
  """Minimises an elementwise objective ``f: a -> E`` over ``a`` of ``shape``.

  Each element of ``a`` is an independent 1-D problem (one per layer), so all of
  them are solved with the same number of evaluations of ``f``.
  """
  grid = jnp.linspace(config.lo, config.hi, config.grid, dtype=jnp.float32)
  errs = jax.lax.map(lambda g: f(jnp.full(shape, g, jnp.float32)), grid)
  best = jnp.argmin(errs, axis=0)
  a_grid = grid[best]
  e_grid = jnp.min(errs, axis=0)
  lo = grid[jnp.maximum(best - 1, 0)]
  hi = grid[jnp.minimum(best + 1, config.grid - 1)]

  c = hi - _INV_PHI * (hi - lo)
  d = lo + _INV_PHI * (hi - lo)
  state = (lo, hi, c, d, f(c), f(d))

  def step(_, s):
    lo, hi, c, d, fc, fd = s
    left = fc < fd
    lo = jnp.where(left, lo, c)
    hi = jnp.where(left, d, hi)
    p = jnp.where(left, hi - _INV_PHI * (hi - lo), lo + _INV_PHI * (hi - lo))
    fp = f(p)
    c, d, fc, fd = (jnp.where(left, p, d), jnp.where(left, c, p),
                    jnp.where(left, fp, fd), jnp.where(left, fc, fp))
    return lo, hi, c, d, fc, fd

  _, _, c, d, fc, fd = jax.lax.fori_loop(0, config.iters, step, state)
  a_gs = jnp.where(fc <= fd, c, d)
  e_gs = jnp.minimum(fc, fd)
  return jnp.where(e_gs <= e_grid, a_gs, a_grid)


def prepare(w: jax.Array, nk: int, ncol: int) -> tuple[jax.Array, jax.Array]:
  """Block scales and normalised magnitudes of one ``(K, N)`` layer."""
  w3 = power.block_view(w, nk)
  scale = power.block_absmax(w3, ncol)
  return power.normalise(w3, scale), scale


def _layer_errors(stack: jax.Array, nk: int, ncol: int, bits: int
                  ) -> Callable[[jax.Array], jax.Array]:
  x, scale = jax.vmap(functools.partial(prepare, nk=nk, ncol=ncol))(stack)
  err = jax.vmap(functools.partial(power.block_error, bits=bits))
  return lambda a: err(x, scale, a)


@functools.partial(jax.jit, static_argnames=('nk', 'ncol', 'bits', 'config'))
def search_layers(stack: jax.Array, *, nk: int, ncol: int, bits: int,
                  config: SearchConfig) -> jax.Array:
  """Exponent of each layer of a ``(L, K, N)`` stack: shape ``(L,)``."""
  f = _layer_errors(stack, nk, ncol, bits)
  return minimise(f, (stack.shape[0],), config)


@functools.partial(jax.jit, static_argnames=('blocks', 'bits', 'config'))
def search_global(stacks: Sequence[jax.Array], *, blocks: Sequence[tuple[int, int]],
                  bits: int, config: SearchConfig) -> jax.Array:
  """One exponent for all layers of all stacks, minimising the summed error."""
  fs = [_layer_errors(s, nk, ncol, bits) for s, (nk, ncol) in zip(stacks, blocks)]

  def total(a):
    return sum(jnp.sum(f(jnp.full((s.shape[0],), a))) for f, s in zip(fs, stacks))

  return minimise(total, (), config)


@functools.partial(jax.jit, static_argnames=('nk', 'ncol', 'bits'))
def encode_layers(stack: jax.Array, alpha: jax.Array, *, nk: int, ncol: int, bits: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Packed codes ``(L, rows, N)`` and scales ``(L, nk, ncol)`` of a layer stack."""

  def one(w, a):
    w3 = power.block_view(w, nk)
    scale = power.block_absmax(w3, ncol)
    q = power.encode(w3, scale, a, bits).reshape(w.shape)
    return power.pack(q, bits), scale[:, 0, :]

  return jax.vmap(one)(stack, alpha)
