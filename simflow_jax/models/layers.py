"""Transformer layers for the flow: causal attention with an explicit KV cache, MLP, adaLN.

Two modes share every parameter:
  dense   (cache is None): h is the whole sequence (B, T, W); causal mask.
  decode  (cache given):   h holds S consecutive tokens (B, S, W) at cache slots
                           pos .. pos+S-1; their keys and values are written into the
                           cache and they attend to the slots <= their own.
The cache is one block's: a tuple of one dict per layer that travels as a loop carry (a
pytree argument and result, never module state), split into a finished prefix and a
window that the loop writes in place (XLA updates a carried buffer without a copy):
  prefix_k, prefix_v: (B, H, P, Dh)   slots 0 .. P-1, all finished (read only)
  k, v:               (B, H, L, Dh)   slots P .. P+L-1, written at pos - P
P is static (the prefix's shape), so a query reads the P finished slots and its window,
never the empty slots after it: a token loop split into windows (next_kv_window between
them) costs per step the causal work rounded up to its window, not the whole sequence.
Decode mode runs the layers unrolled (LayerStack(scan=False)); models/inverse.py
unstacks scanned layer parameters once per block for it.
Softmax and normalisation statistics run in float32 whatever the compute dtype.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
ATTENTION_CHUNKS = 4  # query chunks of the dense causal attention (causal_attention) ...
MIN_ATTENTION_CHUNK = 64  # ... of at least this many queries each


def modulate(x, shift, scale):
  """adaLN modulation; shift/scale are (B, W), x is (B, T, W)."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _filled(shape, fill, dtype):
  """An array of `shape` (B, ...) holding `fill`: a scalar or one value per example (B,)."""
  fill = jnp.asarray(fill, dtype)
  return jnp.broadcast_to(fill.reshape((-1,) + (1,) * (len(shape) - 1)), shape)


def init_kv_cache(depth: int, batch: int, window: int, width: int, head_dim: int,
                  dtype: Dtype = jnp.float32, fill=0.0) -> tuple:
  """A KV cache with an empty prefix and a window of `window` slots, `depth` times
  {'prefix_k', 'prefix_v': (B, H, 0, Dh), 'k', 'v': (B, H, window, Dh)}, filled with
  `fill`: zero, or per example (B,) zeros computed from the data, which orders the
  allocation after that data exists (models/inverse.py)."""
  assert width % head_dim == 0, f"width {width} must be a multiple of head_dim {head_dim}"
  shape = (batch, width // head_dim, window, head_dim)
  empty = (batch, width // head_dim, 0, head_dim)
  return tuple({"prefix_k": jnp.zeros(empty, dtype), "prefix_v": jnp.zeros(empty, dtype),
                "k": _filled(shape, fill, dtype), "v": _filled(shape, fill, dtype)} for _ in range(depth))


def next_kv_window(cache: tuple, window: int, fill=0.0) -> tuple:
  """The cache for the next window: the finished window appended to the prefix (one copy
  per window) and a window of `window` slots after it, filled with `fill` (as above)."""
  def advance(layer):
    k, v = layer["k"], layer["v"]  # (B, H, L, Dh)
    fresh = _filled((*k.shape[:2], window, k.shape[3]), fill, k.dtype)
    return {"prefix_k": jnp.concatenate([layer["prefix_k"], k], axis=2),
            "prefix_v": jnp.concatenate([layer["prefix_v"], v], axis=2), "k": fresh, "v": fresh}
  return tuple(advance(layer) for layer in cache)


def attention_chunks(seq_len: int, chunks: int = 0) -> int:
  """How many query chunks causal_attention uses for `seq_len` tokens: `chunks`, or by
  default ATTENTION_CHUNKS of at least MIN_ATTENTION_CHUNK queries (short sequences run
  as one chunk, where splitting only adds small ops); lowered until it divides seq_len."""
  n = chunks if chunks > 0 else min(ATTENTION_CHUNKS, seq_len // MIN_ATTENTION_CHUNK)
  n = max(1, min(n, seq_len))
  while seq_len % n:
    n -= 1
  return n


def causal_attention(q, k, v, dtype: Dtype, chunks: int = 0):
  """Dense causal attention: q, k, v (B, S, H, Dh) -> (B, S, H, Dh).

  The queries go in equal chunks (attention_chunks): chunk i attends
  to the keys of chunks 0..i only, so the fully masked blocks of the (S, S) logits are
  never computed (5/8 of them are, with 4 chunks) and each chunk's logits stay small.
  The same maths as one masked softmax, with less work and smaller intermediates
  (its speed: docs/performance.md)."""
  s = q.shape[1]
  chunks = attention_chunks(s, chunks)
  c = s // chunks
  outs = []
  for i in range(chunks):
    end = (i + 1) * c  # chunk i: queries i*c .. end-1, keys 0 .. end-1
    mask = jnp.arange(end)[None, :] <= i * c + jnp.arange(c)[:, None]  # (c, end): key j <= query
    logits = jnp.einsum("bqhd,bkhd->bhqk", q[:, i * c:end], k[:, :end]).astype(jnp.float32)
    logits = jnp.where(mask[None, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)  # (B, H, c, end)
    outs.append(jnp.einsum("bhqk,bkhd->bqhd", weights, v[:, :end]))
  return jnp.concatenate(outs, axis=1) if chunks > 1 else outs[0]


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
      out = causal_attention(q, k, v, self.dtype)
    else:
      p = cache["prefix_k"].shape[2]  # static: slots < p are finished, the window starts at p
      # Write first, then read: the read is the buffer's last use before the next write.
      write = lambda buf, new: jax.lax.dynamic_update_slice(
          buf, jnp.transpose(new, (0, 2, 1, 3)).astype(buf.dtype), (0, 0, pos - p, 0))
      kw, vw = write(cache["k"], k), write(cache["v"], v)  # (B, H, L, Dh)
      cache = {**cache, "k": kw, "v": vw}
      # A softmax over [prefix; window] from per-part statistics: no concatenated copy.
      scores = lambda kk: jnp.einsum("bshd,bhld->bhsl", q, kk.astype(q.dtype)).astype(jnp.float32)
      read = lambda e, vv: jnp.einsum("bhsl,bhld->bhsd", e.astype(self.dtype), vv.astype(self.dtype))
      mask = p + jnp.arange(kw.shape[2])[None, :] <= pos + jnp.arange(s)[:, None]  # (S, L)
      logits = jnp.where(mask[None, None], scores(kw), jnp.finfo(jnp.float32).min)  # (B, H, S, L)
      top = jnp.max(logits, axis=-1, keepdims=True)
      if p:  # every query sees the whole prefix
        prefix_logits = scores(cache["prefix_k"])  # (B, H, S, P)
        top = jnp.maximum(top, jnp.max(prefix_logits, axis=-1, keepdims=True))
      e = jnp.exp(logits - top)
      total, out = jnp.sum(e, axis=-1, keepdims=True), read(e, vw)  # (B, H, S, 1), (B, H, S, Dh)
      if p:
        e = jnp.exp(prefix_logits - top)
        total, out = total + jnp.sum(e, axis=-1, keepdims=True), out + read(e, cache["prefix_v"])
      out = jnp.transpose(out / total.astype(out.dtype), (0, 2, 1, 3))  # (B, S, H, Dh)
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
  scan_unroll: int = 2  # layers per scan iteration (lax.scan's unroll): same params and maths

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
                      length=self.depth, unroll=min(self.scan_unroll, self.depth))(**kw, name="layers")
      carry, _ = stack(carry, None)
    else:
      new_cache = []
      for i in range(self.depth):
        carry, layer_cache = layer_cls(**kw, name=f"layer_{i}")(carry, None if cache is None else cache[i])
        new_cache.append(layer_cache)
      cache = None if cache is None else tuple(new_cache)
    h, _, _, capture = carry
    return h, cache, (None if capture is None else capture[1])
