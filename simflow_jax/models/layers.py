"""Transformer layers for the flow: causal attention with an explicit KV cache, MLP, adaLN.

Two modes share every parameter:
  dense   (cache is None): h is the whole sequence (B, T, W); causal mask.
  decode  (cache given):   h holds S consecutive tokens (B, S, W) at positions
                           pos .. pos+S-1; their keys and values are written into the
                           cache and they attend to the positions <= their own.
The cache is one block's: a tuple of one {'k', 'v'} per layer, that travels as a loop
carry (a pytree argument and result, never module state), so a token loop updates it in
place (a separate buffer per layer: XLA writes each without a copy):
  k: (B, H, Dh, T)   keys stored transposed: q @ k needs no transpose
  v: (B, H, T, Dh)
Decode mode runs the layers unrolled (LayerStack(scan=False)); models/inverse.py
unstacks scanned layer parameters once per block for it.
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
  """A zeroed KV cache: `depth` times {'k': (B, H, Dh, T), 'v': (B, H, T, Dh)}."""
  assert width % head_dim == 0, f"width {width} must be a multiple of head_dim {head_dim}"
  heads = width // head_dim
  return tuple({"k": jnp.zeros((batch, heads, head_dim, seq_len), dtype),
                "v": jnp.zeros((batch, heads, seq_len, head_dim), dtype)} for _ in range(depth))


class CausalAttention(nn.Module):
  width: int
  head_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cache=None, pos=None):
    heads = self.width // self.head_dim
    dense = lambda name: nn.DenseGeneral((heads, self.head_dim), dtype=self.dtype, name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, S, H, Dh)
    q = q * jnp.asarray(self.head_dim ** -0.5, q.dtype)
    s = x.shape[1]
    if cache is None:
      mask = jnp.tril(jnp.ones((s, s), bool))  # (S, S): query i sees keys j <= i
      logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    else:
      # Write first, then read: the read is the buffer's last use before the next write.
      k = jax.lax.dynamic_update_slice(
          cache["k"], jnp.transpose(k, (0, 2, 3, 1)).astype(cache["k"].dtype), (0, 0, 0, pos))  # (B, H, Dh, T)
      v = jax.lax.dynamic_update_slice(
          cache["v"], jnp.transpose(v, (0, 2, 1, 3)).astype(cache["v"].dtype), (0, 0, pos, 0))  # (B, H, T, Dh)
      cache = {"k": k, "v": v}
      k = k.astype(q.dtype)
      mask = jnp.arange(k.shape[-1])[None, :] <= pos + jnp.arange(s)[:, None]         # (S, T)
      if s == 1:  # a matrix-vector product: multiply-and-reduce reads the cache once, no copy
        logits = jnp.sum(jnp.transpose(q, (0, 2, 3, 1)) * k, axis=2)[:, :, None, :]  # (B, H, 1, T)
      else:
        logits = jnp.einsum("bshd,bhdt->bhst", q, k)
    logits = jnp.where(mask[None, None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)  # (B, H, S, T)
    if cache is None:
      out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    elif s == 1:
      out = jnp.sum(weights[:, :, 0, :, None] * v.astype(self.dtype), axis=2)[:, None]  # (B, 1, H, Dh)
    else:
      out = jnp.einsum("bhst,bhtd->bshd", weights, v.astype(self.dtype))  # (B, S, H, Dh)
    out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, name="out")(out)
    return out, cache


class Mlp(nn.Module):
  width: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True  # tanh GELU; False = exact (erf) GELU

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width * self.mlp_ratio, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=self.approximate_gelu)
    return nn.Dense(self.width, dtype=self.dtype, name="fc2")(x)


class TransformerLayer(nn.Module):
  """Pre-norm layer. With adaln, LayerNorms have no affine and a zero-initialised
  Dense(cond) gives shift/scale/gate (DiT adaLN-Zero), so a fresh layer is the identity.
  `carry = (h, cond, pos, capture)`; `cache` is this layer's (decode mode) or None."""
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  adaln: bool = False
  dtype: Dtype = jnp.float32
  ln_eps: float = 1e-6
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, carry, cache=None):
    h, cond, pos, capture = carry
    ln = lambda name: nn.LayerNorm(epsilon=self.ln_eps, use_scale=not self.adaln,
                                   use_bias=not self.adaln, dtype=jnp.float32, name=name)
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
    m_out = Mlp(self.width, self.mlp_ratio, self.dtype, self.approximate_gelu, name="mlp")(
        m_in.astype(self.dtype))
    h = h + (g2[:, None, :] * m_out if self.adaln else m_out).astype(h.dtype)
    if capture is not None:  # (index, value): keep h after layer `capture_at`
      index, value = capture
      capture = (index - 1, jnp.where(index == 1, h, value))
    return (h, cond, pos, capture), cache


class LayerStack(nn.Module):
  """`depth` TransformerLayers; stacked with nn.scan (params get a leading layer axis)
  or unrolled. `capture_at=n` also returns the hidden state after the n-th layer.
  Decode mode (a cache given) needs the unrolled stack."""
  depth: int
  width: int
  head_dim: int = 64
  mlp_ratio: int = 4
  adaln: bool = False
  dtype: Dtype = jnp.float32
  scan: bool = True
  remat: bool = False
  ln_eps: float = 1e-6
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, h, cond, cache=None, pos=None, capture_at: Optional[int] = None):
    layer_cls = TransformerLayer
    if self.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not self.scan)
    kw = dict(width=self.width, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
              adaln=self.adaln, dtype=self.dtype, ln_eps=self.ln_eps,
              approximate_gelu=self.approximate_gelu)
    if capture_at is not None:
      assert 1 <= capture_at <= self.depth, f"capture layer {capture_at} not in [1, {self.depth}]"
      capture = (jnp.asarray(capture_at, jnp.int32), jnp.zeros_like(h))
    else:
      capture = None
    carry = (h, cond, pos, capture)
    if self.scan:
      assert cache is None, "decode mode runs the layers unrolled: use LayerStack(scan=False)"
      stack = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                      length=self.depth)(**kw, name="layers")
      carry, _ = stack(carry, None)
    else:
      new_cache = []
      for i in range(self.depth):
        carry, layer_cache = layer_cls(**kw, name=f"layer_{i}")(carry, None if cache is None else cache[i])
        new_cache.append(layer_cache)
      cache = None if cache is None else tuple(new_cache)
    h, _, _, capture = carry
    return h, cache, (None if capture is None else capture[1])
