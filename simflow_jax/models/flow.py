"""The autoregressive affine flow (TarFlow / STARFlow style; DESIGN.md section 4).

Data -> noise, block k of K:
  1. permute the token sequence (identity for even k, reversal for odd k);
  2. the causal transformer reads s = [s_0, x_0, ..., x_{T-2}] (s_0 a learned start
     token, or zeros in `shift` mode) and predicts (a_t, b_t) for token t from x_<t;
     in `shift` mode token 0 gets a = b = 0 and passes through unchanged;
  3. log_sigma = a (`exp`) or log softplus(a + 0.5413) with soft clip (`softplus`);
     z_t = (x_t - b_t) * exp(-log_sigma_t);  logdet = -sum(log_sigma);
  4. undo the permutation.
proj_out is zero-initialised, so a fresh flow is the identity with logdet 0.

Public API (all pure: parameters and KV caches are arguments, never module state):
  patchify(latents, p) -> tokens (B, T, p*p*c);  unpatchify(tokens, p, h, w) -> latents
  Flow.from_config(flow_cfg, latent_hw, latent_channels, num_classes)
  flow.apply(v, x_tokens, labels)                       -> (z, logdet (B,))          forward
  flow.apply(v, x_tokens, labels, capture=(k, n))       -> (z, logdet, hidden)       + REPA hidden
  forward(flow, params, x, labels)                      -> (z, logdet)
  inverse(flow, params, z, labels, method, guide)       -> x   method: cached | dense
  block_logdets(flow, params, x, labels)                -> (K, B) per-block log-dets
Block-level pieces used by the sampler (sample.py): Flow.block_params (dense pass),
Flow.block_step (one cached token), Flow.init_cache, plus `affine_params`.
`labels` may be None for an unconditional flow; the null class is `num_classes`.
A `guide(log_sigma, b, t) -> (log_sigma, b)` callable combines a doubled batch
[conditional; null class] (2B, D) at token t into one stream (B, D)
(classifier-free guidance, sample.py).
"""
from typing import Any, Callable, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from simflow_jax.models import layers

SOFTPLUS_SHIFT = 0.5413248546129181  # softplus(SOFTPLUS_SHIFT) == 1: a fresh block is the identity


def patchify(latents: jax.Array, p: int) -> jax.Array:
  """(B, h, w, c) -> (B, T=(h/p)(w/p), p*p*c) in raster order."""
  b, h, w, c = latents.shape
  assert h % p == 0 and w % p == 0, f"latent {h}x{w} not divisible by patch size {p}"
  return einops.rearrange(latents, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """(B, T, p*p*c) -> (B, h, w, c); the inverse of patchify."""
  return einops.rearrange(tokens, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
                          h=h // p, w=w // p, p1=p, p2=p)


def affine_params(o: jax.Array, scale: str, soft_clip: float):
  """Raw proj_out output (..., 2D) -> (log_sigma, b), float32."""
  o = o.astype(jnp.float32)
  if scale == "softplus" and soft_clip > 0:
    o = soft_clip * jnp.tanh(o / soft_clip)
  a, b = jnp.split(o, 2, axis=-1)
  if scale == "exp":
    return a, b
  return jnp.log(jax.nn.softplus(a + SOFTPLUS_SHIFT)), b


class FlowBlock(nn.Module):
  """One autoregressive affine block. `reverse` flips the token order."""
  seq_len: int
  token_dim: int
  width: int
  depth: int
  reverse: bool
  head_dim: int = 64
  mlp_ratio: int = 4
  cond: str = "none"          # adaln | add | none
  num_classes: int = 0
  token0: str = "shift"       # shift | start_token
  scale: str = "exp"          # exp | softplus
  soft_clip: float = 4.0
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: bool = False

  def setup(self):
    self.proj_in = nn.Dense(self.width, dtype=self.dtype, name="proj_in")
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.width))
    if self.token0 == "start_token":
      self.start = self.param("start_token", nn.initializers.normal(0.02), (self.width,))
    if self.cond != "none":
      self.class_embed = nn.Embed(self.num_classes + 1, self.width,
                                  embedding_init=nn.initializers.normal(0.02), name="class_embed")
    self.stack = layers.LayerStack(self.depth, self.width, self.head_dim, self.mlp_ratio,
                                   adaln=self.cond == "adaln", dtype=self.dtype,
                                   scan=self.scan_layers, remat=self.remat, name="transformer")
    self.final_norm = nn.LayerNorm(use_scale=self.cond != "adaln", use_bias=self.cond != "adaln",
                                   dtype=jnp.float32, name="final_norm")
    if self.cond == "adaln":
      self.final_mod = nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="final_adaln")
    self.proj_out = nn.Dense(2 * self.token_dim, kernel_init=nn.initializers.zeros,
                             dtype=jnp.float32, name="proj_out")

  def _cond(self, labels, batch):
    if self.cond == "none":
      return jnp.zeros((batch, self.width), jnp.float32)
    assert labels is not None, "a class-conditional flow needs labels"
    return self.class_embed(labels)  # (B, W)

  def _start(self, batch):
    if self.token0 == "start_token":
      return jnp.broadcast_to(self.start, (batch, 1, self.width))
    return jnp.zeros((batch, 1, self.width), jnp.float32)

  def _head(self, h, c, first_position):
    """Hidden (B, S, W) -> (log_sigma, b) (B, S, D). `first_position` marks position 0."""
    h = self.final_norm(h)
    if self.cond == "adaln":
      shift, scale = jnp.split(self.final_mod(nn.silu(c)), 2, axis=-1)
      h = layers.modulate(h, shift, scale)
    log_sigma, b = affine_params(self.proj_out(h), self.scale, self.soft_clip)
    if self.token0 == "shift":  # token 0 passes through unchanged
      keep = jnp.logical_not(first_position)[None, :, None]
      log_sigma, b = log_sigma * keep, b * keep
    return log_sigma, b

  def block_params(self, x, labels, capture_at: Optional[int] = None):
    """Dense causal pass over x (B, T, D) given IN BLOCK ORDER.
    Returns (log_sigma, b) (B, T, D) for every token, and the hidden state after
    layer `capture_at` (B, T, W) in block order (None unless asked)."""
    bsz, t, _ = x.shape
    assert t == self.seq_len, f"expected {self.seq_len} tokens, got {t}"
    c = self._cond(labels, bsz)
    # s = [start, x_0, ..., x_{T-2}]: position t predicts token t from x_<t.
    s = jnp.concatenate([self._start(bsz), self.proj_in(x[:, :-1])], axis=1)  # (B, T, W)
    s = s + self.pos_embed[None]
    if self.cond == "add":
      s = s + c[:, None, :]
    h, _, hidden = self.stack(s.astype(self.dtype), c, capture_at=capture_at)
    log_sigma, b = self._head(h, c, jnp.arange(t) == 0)
    return log_sigma, b, hidden

  def __call__(self, x, labels, capture_at: Optional[int] = None):
    """x (B, T, D) in natural order -> (z, logdet (B,), hidden in natural order or None)."""
    x_blk = jnp.flip(x, 1) if self.reverse else x
    log_sigma, b, hidden = self.block_params(x_blk, labels, capture_at)
    z = (x_blk.astype(jnp.float32) - b) * jnp.exp(-log_sigma)
    logdet = -jnp.sum(log_sigma, axis=(1, 2))
    if self.reverse:
      z = jnp.flip(z, 1)
      hidden = None if hidden is None else jnp.flip(hidden, 1)
    return z, logdet, hidden

  def block_step(self, x_prev, t, cache, labels):
    """One cached token in block order: feeds s_t (start if t == 0 else x_{t-1}, (B, D))
    and returns (log_sigma_t, b_t) (B, D) for token t, and the updated cache."""
    bsz = x_prev.shape[0]
    c = self._cond(labels, bsz)
    s = jnp.where(t == 0, self._start(bsz), self.proj_in(x_prev[:, None, :]))  # (B, 1, W)
    s = s + jax.lax.dynamic_slice_in_dim(self.pos_embed, t, 1, axis=0)[None]
    if self.cond == "add":
      s = s + c[:, None, :]
    h, cache, _ = self.stack(s.astype(self.dtype), c, cache=cache, pos=t)
    log_sigma, b = self._head(h, c, (t == 0)[None])
    return log_sigma[:, 0], b[:, 0], cache


class Flow(nn.Module):
  """K FlowBlocks; block K-1 is next to the Gaussian (runs first when sampling)."""
  seq_len: int
  token_dim: int
  width: int
  layers_per_block: Sequence[int]
  head_dim: int = 64
  mlp_ratio: int = 4
  cond: str = "adaln"
  cond_blocks: str = "all"    # all | deep (only the last block is conditioned)
  num_classes: int = 0
  token0: str = "shift"
  scale: str = "exp"
  soft_clip: float = 4.0
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: bool = False

  @classmethod
  def from_config(cls, cfg, latent_hw: Sequence[int], latent_channels: int, num_classes: int) -> "Flow":
    h, w = latent_hw
    p = cfg.patch_size
    if h % p or w % p:
      raise ValueError(f"flow.patch_size={p} must divide the latent size {h}x{w}")
    for name, value, allowed in (("cond", cfg.cond, ("adaln", "add", "none")),
                                 ("cond_blocks", cfg.cond_blocks, ("all", "deep")),
                                 ("token0", cfg.token0, ("shift", "start_token")),
                                 ("scale", cfg.scale, ("exp", "softplus"))):
      if value not in allowed:
        raise ValueError(f"flow.{name}={value!r} is not one of {allowed}")
    if cfg.width % cfg.head_dim:
      raise ValueError(f"flow.width={cfg.width} must be a multiple of flow.head_dim={cfg.head_dim}")
    return cls(seq_len=(h // p) * (w // p), token_dim=p * p * latent_channels, width=cfg.width,
               layers_per_block=tuple(cfg.layers), head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio,
               cond=cfg.cond, cond_blocks=cfg.cond_blocks, num_classes=num_classes,
               token0=cfg.token0, scale=cfg.scale, soft_clip=cfg.soft_clip,
               dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers, remat=cfg.remat)

  @property
  def num_blocks(self) -> int:
    return len(self.layers_per_block)

  def block_cond(self, k: int) -> str:
    deep_only = self.cond_blocks == "deep" and k != self.num_blocks - 1
    return "none" if deep_only else self.cond

  def setup(self):
    self.blocks = [
        FlowBlock(self.seq_len, self.token_dim, self.width, depth, reverse=k % 2 == 1,
                  head_dim=self.head_dim, mlp_ratio=self.mlp_ratio, cond=self.block_cond(k),
                  num_classes=self.num_classes, token0=self.token0, scale=self.scale,
                  soft_clip=self.soft_clip, dtype=self.dtype, scan_layers=self.scan_layers,
                  remat=self.remat, name=f"block_{k}")
        for k, depth in enumerate(self.layers_per_block)]

  def __call__(self, x, labels, capture: Optional[tuple[int, int]] = None, per_block: bool = False):
    """x (B, T, D) -> (z (B, T, D) float32, logdet (B,) or (K, B) if per_block, hidden).
    hidden: with capture=(k, n), block k's hidden state after layer n (natural order), else None."""
    if capture is not None:
      cap_block = capture[0] % self.num_blocks
    hidden, logdets = None, []
    z = x.astype(jnp.float32)
    for k, block in enumerate(self.blocks):
      z, ld, h = block(z, labels, capture[1] if capture is not None and k == cap_block else None)
      logdets.append(ld)
      hidden = h if h is not None else hidden
    logdet = jnp.stack(logdets) if per_block else sum(logdets)
    return z, logdet, hidden

  # --- block-level methods for the inverse and the sampler (apply with method=...) ---
  def block_params(self, k: int, x_blk, labels):
    log_sigma, b, _ = self.blocks[k].block_params(x_blk, labels)
    return log_sigma, b

  def block_step(self, k: int, x_prev, t, cache, labels):
    return self.blocks[k].block_step(x_prev, t, cache, labels)

  def init_cache(self, k: int, batch: int):
    return layers.init_kv_cache(self.layers_per_block[k], batch, self.seq_len, self.width,
                                self.head_dim, self.dtype)


# ------------------------------------------------------------------------------------
# Pure functions over (flow, params): forward, and the two inverses.
# ------------------------------------------------------------------------------------
Guide = Optional[Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]]


def forward(flow: Flow, params, x, labels):
  """x (B, T, D) -> (z (B, T, D), logdet (B,))."""
  z, logdet, _ = flow.apply({"params": params}, x, labels)
  return z, logdet


def block_logdets(flow: Flow, params, x, labels):
  """(K, B) log-determinant of each block's map (data -> noise)."""
  return flow.apply({"params": params}, x, labels, per_block=True)[1]


def _doubled(labels, num_classes, guide):
  """With guidance, the batch is [conditional; null class]."""
  if guide is None:
    return labels
  return jnp.concatenate([labels, jnp.full_like(labels, num_classes)])


def invert_block_cached(flow: Flow, params, k: int, z_blk, labels, guide: Guide = None):
  """Inverts block k token by token: lax.scan over t carrying (x_{t-1}, KV cache).
  z_blk (B, T, D) in block order -> x_blk (B, T, D) in block order."""
  bsz, t_len, d = z_blk.shape
  lab = _doubled(labels, flow.num_classes, guide)
  n = bsz if guide is None else 2 * bsz
  cache = flow.apply({"params": params}, k, n, method=Flow.init_cache)

  def step(carry, inputs):
    x_prev, cache = carry
    z_t, t = inputs
    feed = x_prev if guide is None else jnp.concatenate([x_prev, x_prev])
    log_sigma, b, cache = flow.apply({"params": params}, k, feed, t, cache, lab, method=Flow.block_step)
    if guide is not None:
      log_sigma, b = guide(log_sigma, b, t)
    x_t = z_t * jnp.exp(log_sigma) + b
    return (x_t, cache), x_t

  xs = (jnp.swapaxes(z_blk, 0, 1), jnp.arange(t_len))  # z: (T, B, D)
  _, x = jax.lax.scan(step, (jnp.zeros((bsz, d), jnp.float32), cache), xs)
  return jnp.swapaxes(x, 0, 1)  # (B, T, D)


def invert_block_dense(flow: Flow, params, k: int, z_blk, labels, guide: Guide = None):
  """Reference inverse: T full causal passes (O(T^2) work), no cache."""
  lab = _doubled(labels, flow.num_classes, guide)

  def body(t, x):
    feed = x if guide is None else jnp.concatenate([x, x])
    log_sigma, b = flow.apply({"params": params}, k, feed, lab, method=Flow.block_params)
    if guide is not None:
      log_sigma, b = guide(log_sigma[:, t], b[:, t], t)
    else:
      log_sigma, b = log_sigma[:, t], b[:, t]
    return x.at[:, t].set(z_blk[:, t] * jnp.exp(log_sigma) + b)

  return jax.lax.fori_loop(0, z_blk.shape[1], body, jnp.zeros_like(z_blk))


def inverse(flow: Flow, params, z, labels, method: str = "cached", guide_for_block=None):
  """z (B, T, D) -> x (B, T, D), deep block first. `guide_for_block(k)` returns the
  guide callable for block k (or None for no guidance there)."""
  invert = {"cached": invert_block_cached, "dense": invert_block_dense}[method]
  x = z.astype(jnp.float32)
  for k in reversed(range(flow.num_blocks)):
    guide = None if guide_for_block is None else guide_for_block(k)
    reverse = k % 2 == 1
    x_blk = jnp.flip(x, 1) if reverse else x
    x_blk = invert(flow, params, k, x_blk, labels, guide)
    x = jnp.flip(x_blk, 1) if reverse else x_blk
  return x
