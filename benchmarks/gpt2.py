"""A GPT-2-small-shaped Flax decoder with a KV cache, for the run-time benchmarks.

12 blocks, d = 768, 12 heads, an MLP of 3072, a 50257-word vocabulary with an untied
output head and 1024 positions: 163M parameters. ``scan=True`` stacks the blocks
under ``nn.scan`` (their parameters get a leading layer axis), as large JAX models
are written. The weights are random (no download): shapes, not values, set the run
time and memory.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
  vocab: int = 50257
  positions: int = 1024
  d: int = 768
  heads: int = 12
  layers: int = 12
  mlp: int = 3072


# The context the benchmarks serve: a 256-position cache.
SMALL = Config(positions=256)


class Block(nn.Module):
  """Pre-norm attention over a KV cache, then an MLP."""

  config: Config

  @nn.compact
  def __call__(
    self, x: jax.Array, cache: jax.Array, pos: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    c = self.config
    b, t, _ = x.shape
    hd = c.d // c.heads
    h = nn.LayerNorm(name='ln1')(x)
    qkv = nn.Dense(3 * c.d, name='qkv')(h).reshape(b, t, 3, c.heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    cache = jax.lax.dynamic_update_slice(
      cache, jnp.stack([k, v]).astype(cache.dtype), (0, 0, pos, 0, 0)
    )
    keys, values = cache[0], cache[1]
    scores = jnp.einsum('bthd,bshd->bhts', q, keys) / math.sqrt(hd)
    visible = jnp.arange(cache.shape[2])[None, :] <= pos + jnp.arange(t)[:, None]
    scores = jnp.where(visible[None, None], scores, jnp.finfo(scores.dtype).min)
    att = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum('bhts,bshd->bthd', att, values).reshape(b, t, c.d)
    x = x + nn.Dense(c.d, name='proj')(o)
    h = nn.LayerNorm(name='ln2')(x)
    x = x + nn.Dense(c.d, name='out')(jax.nn.gelu(nn.Dense(c.mlp, name='fc')(h)))
    return x, cache


class ScanBlock(nn.Module):
  config: Config

  @nn.compact
  def __call__(
    self, x: jax.Array, cache: jax.Array, pos: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    return Block(self.config, name='block')(x, cache, pos)


class GPT(nn.Module):
  """``(tokens (B, T), cache, pos) -> (logits, cache)``.

  The cache holds each layer's keys and values, ``(2, B, P, H, hd)``: a tuple of one
  array a layer, or with ``scan`` one array with a leading layer axis.
  """

  config: Config = SMALL
  scan: bool = False

  @nn.compact
  def __call__(
    self, tokens: jax.Array, cache: jax.Array, pos: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    c = self.config
    t = tokens.shape[1]
    x = nn.Embed(c.vocab, c.d, name='wte')(tokens)
    x = x + nn.Embed(c.positions, c.d, name='wpe')(pos + jnp.arange(t))[None]
    if self.scan:
      blocks = nn.scan(
        ScanBlock,
        variable_axes={'params': 0},
        split_rngs={'params': True},
        in_axes=(0, nn.broadcast),
        length=c.layers,
      )
      x, cache = blocks(c, name='blocks')(x, cache, pos)
    else:
      layers = []
      for i in range(c.layers):
        x, layer = Block(c, name=f'block{i}')(x, cache[i], pos)
        layers.append(layer)
      cache = tuple(layers)
    x = nn.LayerNorm(name='ln_f')(x)
    return nn.Dense(c.vocab, name='head')(x), cache


def empty_cache(
  config: Config, batch: int, scan: bool, dtype: jnp.dtype = jnp.float32
) -> jax.Array | tuple[jax.Array, ...]:
  hd = config.d // config.heads
  layer = (2, batch, config.positions, config.heads, hd)
  if scan:
    return jnp.zeros((config.layers, *layer), dtype)
  return tuple(jnp.zeros(layer, dtype) for _ in range(config.layers))


def init(model: GPT, batch: int = 1) -> dict:
  """Random parameters of ``model``, without running its whole forward pass."""
  tokens = jnp.zeros((batch, 1), jnp.int32)
  cache = empty_cache(model.config, batch, model.scan)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), tokens, cache, jnp.int32(0))
  )
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree_util.tree_leaves(shapes))))

  def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return jnp.ones(s.shape, s.dtype)
    if 'bias' in name:
      return jnp.zeros(s.shape, s.dtype)
    return 0.02 * jax.random.normal(next(keys), s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)['params']
