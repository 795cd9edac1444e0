"""Transformer layers for the flow: causal attention with an explicit KV cache, MLP, adaLN.

Public API:
  TransformerLayer(width, head_dim, mlp_ratio, adaln, dtype)
    __call__(carry, cache) -> (carry, cache)   one layer; `carry = (h, cond, pos, capture)`
  LayerStack(depth, ..., scan, remat)
    __call__(h, cond, cache=None, pos=None, capture_at=None) -> (h, cache, captured)
  init_kv_cache(depth, batch, seq_len, width, head_dim, dtype) -> {'k', 'v'} of (L, B, T, H, Dh)

Two modes share every parameter:
  dense   (cache is None): h is the whole sequence (B, T, W); causal mask.
  decode  (cache given):   h is one token (B, 1, W) at position `pos`; its keys and
                           values are written into the cache (a pytree, returned, never
                           stored on the module) and it attends to positions <= pos.
Softmax and normalisation statistics run in float32 whatever the compute dtype.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def modulate(x, shift, scale):
  """adaLN modulation; shift/scale are (B, W), x is (B, T, W)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def init_kv_cache(depth: int, batch: int, seq_len: int, width: int, head_dim: int,
                  dtype: Dtype = jnp.float32) -> dict:
  """A zeroed KV cache for `depth` layers: {'k', 'v'} each (L, B, T, H, Dh)."""
  assert width % head_dim == 0, f"width {width} must be a multiple of head_dim {head_dim}"
  shape = (depth, batch, seq_len, width // head_dim, head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class CausalAttention(nn.Module):
  width: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, pos=None):
    heads = self.width // self.head_dim
    dense = lambda name: nn.DenseGeneral((heads, self.head_dim), dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, S, H, Dh)
    if cache is None:
      t = x.shape[1]
      mask = jnp.tril(jnp.ones((t, t), bool))  # (S, S): query i sees keys j <= i
    else:
      assert x.shape[1] == 1, f"decode mode takes one token at a time, got {x.shape[1]}"
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), pos, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), pos, axis=1)
      cache = {"k": k, "v": v}
      mask = (jnp.arange(k.shape[1]) <= pos)[None, :]  # (1, T): only filled positions
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k.astype(q.dtype)).astype(jnp.float32)
    logits = logits / jnp.sqrt(self.head_dim).astype(jnp.float32)
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v.astype(self.dtype))  # (B, S, H, Dh)
    out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return out, cache


class Mlp(nn.Module):
  width: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)


class TransformerLayer(nn.Module):
  """Pre-norm layer. With adaln, LayerNorms have no affine and a zero-initialised
  Dense(cond) gives shift/scale/gate (DiT adaLN-Zero), so a fresh layer is the identity."""
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  adaln: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, cache):
    h, cond, pos, capture = carry
    ln = lambda name: nn.LayerNorm(use_scale=not self.adaln, use_bias=not self.adaln,
                                   dtype=jnp.float32, name=name)
    if self.adaln:
      mod = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros, name="adaln")(nn.silu(cond))
      s1, c1, g1, s2, c2, g2 = jnp.split(mod, 6, axis=-1)  # each (B, W)
    a_in = ln("norm1")(h)
    a_in = modulate(a_in, s1, c1) if self.adaln else a_in
    a_out, cache = CausalAttention(self.width, self.head_dim, self.dtype, name="attn")(
        a_in.astype(self.dtype), cache, pos)
    h = h + (g1[:, None, :] * a_out if self.adaln else a_out).astype(h.dtype)
    m_in = ln("norm2")(h)
    m_in = modulate(m_in, s2, c2) if self.adaln else m_in
    m_out = Mlp(self.width, self.mlp_ratio, self.dtype, name="mlp")(m_in.astype(self.dtype))
    h = h + (g2[:, None, :] * m_out if self.adaln else m_out).astype(h.dtype)
    if capture is not None:  # (index, value): keep h after layer `capture_at`
      index, value = capture
      capture = (index - 1, jnp.where(index == 1, h, value))
    return (h, cond, pos, capture), cache


class LayerStack(nn.Module):
  """`depth` TransformerLayers; stacked with nn.scan (params get a leading layer axis)
  or unrolled. `capture_at=n` also returns the hidden state after the n-th layer."""
  depth: int
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  adaln: bool = False
  dtype: Dtype = jnp.float32
  scan: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, h, cond, cache=None, pos=None, capture_at: Optional[int] = None):
    layer_cls = TransformerLayer
    if self.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan)
    kw = dict(width=self.width, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
              adaln=self.adaln, dtype=self.dtype)
    if capture_at is not None:
      assert 1 <= capture_at <= self.depth, f"capture layer {capture_at} not in [1, {self.depth}]"
      capture = (jnp.asarray(capture_at, jnp.int32), jnp.zeros_like(h))
    else:
      capture = None
    carry = (h, cond, pos, capture)
    if self.scan:
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=0, length=self.depth)(**kw, name="layers")
      carry, cache = stack(carry, cache)
    else:
      new_cache = []
      for i in range(self.depth):
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
        carry, layer_cache = layer_cls(**kw, name=f"layer_{i}")(carry, layer_cache)
        new_cache.append(layer_cache)
      if cache is not None:
        cache = jax.tree.map(lambda *cs: jnp.stack(cs), *new_cache)
    h, _, _, capture = carry
    return h, cache, (None if capture is None else capture[1])
