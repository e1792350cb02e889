"""The power grid: its levels, the thresholds between them, and decoding tables.

A block with scale ``s`` (its absolute maximum ``m``, or ``c * m`` when clipping) is
mapped into the power domain with an exponent ``a > 0``. Each side of a grid has
levels ``s * (k / d) ** (1 / a)`` for code magnitudes ``k = 0..d``:

- ``"symmetric"``, the paper's: ``d = qmax = 2 ** (bits - 1) - 1`` on both sides,
  ``2 ** bits - 1`` levels, rounding in the power domain::

      q = sign(w) * round(qmax * (|w| / s) ** a)
      w_hat = sign(q) * s * (|q| / qmax) ** (1 / a)

- ``"full"``: all ``2 ** bits`` codes, ``d = 2 ** (bits - 1)`` below zero and
  ``qmax`` above (the two's-complement range, zero exact); each weight takes its
  nearest level.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 8

Grid = Literal['symmetric', 'full']
GRIDS: tuple[Grid, ...] = ('symmetric', 'full')


def check_bits(bits: object, name: str = 'bits') -> int:
  """``bits`` as an int in ``MIN_BITS..MAX_BITS``; a ValueError naming it otherwise."""
  if (
    isinstance(bits, bool)
    or not isinstance(bits, (int, np.integer))
    or not MIN_BITS <= bits <= MAX_BITS
  ):
    raise ValueError(f'{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}')
  return int(bits)


def check_grid(grid: object) -> Grid:
  if grid not in GRIDS:
    raise ValueError(f'grid must be "symmetric" or "full", got {grid!r}')
  return grid


def qmax(bits: int) -> int:
  """Largest code magnitude of the symmetric sign-magnitude grid."""
  return 2 ** (bits - 1) - 1


def steps(bits: int, grid: str) -> tuple[int, int]:
  """``(d_neg, d_pos)``: each side's levels are ``(k / d) ** (1 / a)``, k = 0..d.

  The symmetric grid is the paper's: ``2 qmax + 1`` levels, one code unused. The
  full grid uses all ``2 ** bits`` codes: the negative side gets the extra level,
  so signed codes span the two's-complement range ``[-2 ** (bits - 1), qmax]``.
  """
  qm = qmax(bits)
  return (qm + 1, qm) if grid == 'full' else (qm, qm)


def num_levels(bits: int, grid: str) -> int:
  return sum(steps(bits, grid)) + 1


def zero_code(table_size: int) -> int:
  """Table index of the level 0, which signed code 0 decodes to."""
  return table_size // 2


def level_magnitude(
  k: jax.Array, alpha: jax.Array | float, d: jax.Array | int
) -> jax.Array:
  """Normalised level ``(k / d) ** (1 / alpha)`` of code magnitude ``k``."""
  return jnp.power(k.astype(jnp.float32) / d, 1.0 / alpha)


def side_thresholds(alpha: jax.Array, d: int, grid: str) -> jax.Array:
  """Magnitudes from which codes ``1..d`` of one side are chosen, ascending."""
  k = jnp.arange(1, d + 1)
  if grid == 'full':
    return (level_magnitude(k - 1, alpha, d) + level_magnitude(k, alpha, d)) / 2
  return jnp.power((k - 0.5) / d, 1.0 / alpha)


def thresholds(alpha: jax.Array, bits: int, grid: str) -> jax.Array:
  """Signed thresholds between consecutive levels, ascending: ``num_levels - 1``."""
  d_neg, d_pos = steps(bits, grid)
  return jnp.concatenate(
    [-side_thresholds(alpha, d_neg, grid)[::-1], side_thresholds(alpha, d_pos, grid)]
  )


def decode_table(alpha: float, bits: int, grid: str = 'symmetric') -> np.ndarray:
  """Decoded level of each code, in code order: ``table[q + zero_code]``.

  Computed on the host in float64 and rounded once to float32, so every level is
  the correctly rounded value of the formula, whatever the backend's ``pow``.
  """
  d_neg, d_pos = steps(bits, grid)
  k = np.arange(-d_neg, d_pos + 1, dtype=np.float64)
  d = np.where(k < 0, d_neg, d_pos)
  a = float(np.float32(alpha))
  return (np.sign(k) * (np.abs(k) / d) ** (1.0 / a)).astype(np.float32)
