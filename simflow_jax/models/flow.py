"""The autoregressive affine flow (TarFlow / STARFlow style; SimFlow arXiv 2512.04084, TarFlow arXiv 2412.06329).

Data -> noise through K blocks; block k permutes the tokens (odd k: reversed), predicts
(log_sigma_t, b_t) for token t from the tokens before it with a causal transformer, and
maps z_t = (x_t - b_t) exp(-log_sigma_t), logdet = -sum(log_sigma). docs/flow.md gives the
block maths, every option (the shift side, final LayerNorm, GELU form, null class,
learned prior std) and how they map to TarFlow and STARFlow.
Tokens are (B, T, D); `labels` (B,) may be None for an unconditional flow; the null
class is `num_classes`. Parameters and KV caches are arguments, never module state.
The inverse (noise -> data) is models/inverse.py, built on Flow.block_params (one dense
causal pass), Flow.block_decode (S tokens against a KV cache, layers.init_kv_cache) and
Flow.from_prior.
"""
from typing import Any, Optional, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from simflow_jax.models import layers

SOFTPLUS_SHIFT = 0.5413248546129181  # softplus(SOFTPLUS_SHIFT) == 1: a fresh block is the identity
# Choices of the flow options (validated by models/build.py:validate_config).
CONDS = ("adaln", "add", "none")
COND_BLOCKS = ("all", "deep")
TOKEN0S = ("shift", "start_token")
SCALES = ("exp", "softplus")
SHIFT_SIDES = ("input", "output")
GELUS = ("tanh", "exact")
NULL_CLASSES = ("learned", "mean")


def shift_right(v: jax.Array) -> jax.Array:
  """(B, S, D) -> (B, S, D): v moved one token later; token 0 gets zeros, the last is dropped."""
  return jnp.pad(v[:, :-1], ((0, 0), (1, 0), (0, 0)))


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
  shift_side: str = "input"   # input | output (TarFlow): see docs/flow.md
  final_norm: bool = True     # LayerNorm before proj_out
  ln_eps: float = 1e-6
  gelu: str = "tanh"          # tanh | exact
  null_class: str = "learned"  # learned (an extra embedding row) | mean (of the class rows)
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: bool = False
  scan_unroll: int = 2

  def setup(self):
    self.proj_in = nn.Dense(self.width, dtype=self.dtype, name="proj_in")
    self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (self.seq_len, self.width))
    if self.token0 == "start_token":
      self.start = self.param("start_token", nn.initializers.normal(0.02), (self.width,))
    if self.cond != "none":
      rows = self.num_classes + (1 if self.null_class == "learned" else 0)
      self.class_embed = nn.Embed(rows, self.width, embedding_init=nn.initializers.normal(0.02),
                                  name="class_embed")
    self.stack = layers.LayerStack(self.depth, self.width, self.head_dim, self.mlp_ratio,
                                   adaln=self.cond == "adaln", dtype=self.dtype,
                                   scan=self.scan_layers, remat=self.remat, ln_eps=self.ln_eps,
                                   scan_unroll=self.scan_unroll,
                                   approximate_gelu=self.gelu == "tanh", name="transformer")
    if self.final_norm:
      self.norm_out = nn.LayerNorm(epsilon=self.ln_eps, use_scale=self.cond != "adaln",
                                   use_bias=self.cond != "adaln", dtype=jnp.float32, name="final_norm")
    if self.cond == "adaln":
      self.final_mod = nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros, name="final_adaln")
    self.proj_out = nn.Dense(2 * self.token_dim, kernel_init=nn.initializers.zeros,
                             dtype=jnp.float32, name="proj_out")

  def _cond(self, labels, batch):
    if self.cond == "none":
      return jnp.zeros((batch, self.width), jnp.float32)
    assert labels is not None, "a class-conditional flow needs labels"
    if self.null_class == "learned":
      return self.class_embed(labels)  # (B, W)
    table = self.class_embed(jnp.arange(self.num_classes))  # (num_classes, W)
    null = labels == self.num_classes
    return jnp.where(null[:, None], jnp.mean(table, axis=0)[None], table[jnp.where(null, 0, labels)])

  def _start(self, batch):
    if self.token0 == "start_token":
      return jnp.broadcast_to(self.start, (batch, 1, self.width))
    return jnp.zeros((batch, 1, self.width), jnp.float32)

  def _head(self, h, c, first_position):
    """Hidden (B, S, W) -> (log_sigma, b) (B, S, D). `first_position` marks position 0
    (input-side shift: the parameters of token 0 there are zeroed in `shift` mode)."""
    if self.final_norm:
      h = self.norm_out(h)
    if self.cond == "adaln":
      shift, scale = jnp.split(self.final_mod(nn.silu(c)), 2, axis=-1)
      h = layers.modulate(h, shift, scale)
    log_sigma, b = affine_params(self.proj_out(h), self.scale, self.soft_clip)
    if self.token0 == "shift" and self.shift_side == "input":  # token 0 passes through unchanged
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
    if self.shift_side == "output":
      # s = [x_0, ..., x_{T-1}]: position t reads x_t and predicts token t + 1.
      s = self.proj_in(x)  # (B, T, W)
    else:
      # s = [start, x_0, ..., x_{T-2}]: position t predicts token t from x_<t.
      s = jnp.concatenate([self._start(bsz), self.proj_in(x[:, :-1])], axis=1)  # (B, T, W)
    s = s + self.pos_embed[None]
    if self.cond == "add":
      s = s + c[:, None, :]
    h, _, hidden = self.stack(s.astype(self.dtype), c, capture_at=capture_at)
    log_sigma, b = self._head(h, c, jnp.arange(t) == 0)
    if self.shift_side == "output":  # token 0 is the identity; the last output is unused
      log_sigma, b = shift_right(log_sigma), shift_right(b)
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

  def decode(self, x_in, pos, cache, labels):
    """S tokens at block-order positions pos .. pos+S-1 against the KV cache.
    x_in (B, S, D) holds the tokens one position earlier (x_{pos-1} .. x_{pos+S-2}; at
    position 0 the start token is fed instead). Returns (log_sigma, b) (B, S, D) for
    tokens pos .. pos+S-1, and the cache with their keys and values written."""
    bsz, s_len, _ = x_in.shape
    c = self._cond(labels, bsz)
    if self.shift_side == "output":
      return self._decode_output_shift(x_in, pos, cache, c)
    position = pos + jnp.arange(s_len)
    s = jnp.where((position == 0)[None, :, None], self._start(bsz), self.proj_in(x_in))  # (B, S, W)
    s = s + jax.lax.dynamic_slice_in_dim(self.pos_embed, pos, s_len, axis=0)[None]
    if self.cond == "add":
      s = s + c[:, None, :]
    h, cache, _ = self.stack(s.astype(self.dtype), c, cache=cache, pos=pos)
    log_sigma, b = self._head(h, c, position == 0)
    return log_sigma, b, cache

  def _decode_output_shift(self, x_in, pos, cache, c):
    """decode with the output-side shift: token t's parameters come from feeding x_{t-1}
    at position t - 1 (cache slot t - 1); token 0 is the identity. For pos > 0 the S
    inputs sit at positions pos-1 .. pos+S-2. For pos == 0 (traced) x_0 .. x_{S-2} sit at
    positions 0 .. S-2 and x_in[0] (no token) fills position S-1; that slot holds a
    placeholder only its own (dropped) query reads, and the next chunk, which starts at
    position S-1, overwrites it."""
    s_len = x_in.shape[1]
    first = pos == 0
    src = jnp.maximum(pos - 1, 0)  # position (and cache slot) of the first input
    x_in = jnp.where(first, jnp.roll(x_in, -1, axis=1), x_in)  # (B, S, D)
    s = self.proj_in(x_in) + jax.lax.dynamic_slice_in_dim(self.pos_embed, src, s_len, axis=0)[None]
    if self.cond == "add":
      s = s + c[:, None, :]
    h, cache, _ = self.stack(s.astype(self.dtype), c, cache=cache, pos=src)
    log_sigma, b = self._head(h, c, jnp.zeros((s_len,), bool))
    log_sigma = jnp.where(first, shift_right(log_sigma), log_sigma)
    b = jnp.where(first, shift_right(b), b)
    return log_sigma, b, cache


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
  shift_side: str = "input"
  final_norm: bool = True
  ln_eps: float = 1e-6
  gelu: str = "tanh"
  null_class: str = "learned"
  prior_std: bool = False     # a learned per-position prior std (T, D): prior_log_std
  dtype: Any = jnp.float32
  scan_layers: bool = True
  remat: bool = False
  scan_unroll: int = 2        # layers per nn.scan iteration (same parameters and results)

  @classmethod
  def from_config(cls, cfg, latent_hw: Sequence[int], latent_channels: int, num_classes: int) -> "Flow":
    h, w = latent_hw  # values checked once, by build.validate_config
    p = cfg.patch_size
    return cls(seq_len=(h // p) * (w // p), token_dim=p * p * latent_channels, width=cfg.width,
               layers_per_block=tuple(cfg.layers), head_dim=cfg.head_dim, mlp_ratio=cfg.mlp_ratio,
               cond=cfg.cond, cond_blocks=cfg.cond_blocks, num_classes=num_classes,
               token0=cfg.token0, scale=cfg.scale, soft_clip=cfg.soft_clip,
               shift_side=cfg.shift_side, final_norm=bool(cfg.final_norm), ln_eps=float(cfg.ln_eps),
               gelu=cfg.gelu, null_class=cfg.null_class, prior_std=bool(cfg.prior_std),
               dtype=jnp.dtype(cfg.dtype), scan_layers=cfg.scan_layers, remat=cfg.remat,
               scan_unroll=int(cfg.scan_unroll))

  @property
  def num_blocks(self) -> int:
    return len(self.layers_per_block)

  @property
  def cache_lag(self) -> int:
    """Decoding token t writes KV-cache slot t - cache_lag (clipped at 0): 0 with the
    input-side shift, 1 with the output-side shift (token t reads x_{t-1} at slot t-1)."""
    return 1 if self.shift_side == "output" else 0

  def block_cond(self, k: int) -> str:
    deep_only = self.cond_blocks == "deep" and k != self.num_blocks - 1
    return "none" if deep_only else self.cond

  def setup(self):
    self.blocks = [
        FlowBlock(self.seq_len, self.token_dim, self.width, depth, reverse=k % 2 == 1,
                  head_dim=self.head_dim, mlp_ratio=self.mlp_ratio, cond=self.block_cond(k),
                  num_classes=self.num_classes, token0=self.token0, scale=self.scale,
                  soft_clip=self.soft_clip, shift_side=self.shift_side, final_norm=self.final_norm,
                  ln_eps=self.ln_eps, gelu=self.gelu, null_class=self.null_class,
                  dtype=self.dtype, scan_layers=self.scan_layers, remat=self.remat,
                  scan_unroll=self.scan_unroll, name=f"block_{k}")
        for k, depth in enumerate(self.layers_per_block)]
    if self.prior_std:  # z <- z exp(-prior_log_std) after the last block: the prior is N(0, std^2)
      self.prior_log_std = self.param("prior_log_std", nn.initializers.zeros,
                                      (self.seq_len, self.token_dim))

  def __call__(self, x, labels, capture: Optional[tuple[int, int]] = None, per_block: bool = False):
    """x (B, T, D) -> (z (B, T, D) float32, logdet (B,) or (K, B) if per_block, hidden).
    hidden: with capture=(k, n), block k's hidden state after layer n (natural order), else None.
    With prior_std, z is divided by the prior std and its log-det is counted in block K-1's."""
    if capture is not None:
      cap_block = capture[0] % self.num_blocks
    hidden, logdets = None, []
    z = x.astype(jnp.float32)
    for k, block in enumerate(self.blocks):
      z, ld, h = block(z, labels, capture[1] if capture is not None and k == cap_block else None)
      logdets.append(ld)
      hidden = h if h is not None else hidden
    if self.prior_std:
      z = z * jnp.exp(-self.prior_log_std)[None]
      logdets[-1] = logdets[-1] - jnp.sum(self.prior_log_std)
    logdet = jnp.stack(logdets) if per_block else sum(logdets)
    return z, logdet, hidden

  # --- block-level methods for the inverse and the sampler (apply with method=...) ---
  def block_params(self, k: int, x_blk, labels):
    log_sigma, b, _ = self.blocks[k].block_params(x_blk, labels)
    return log_sigma, b

  def block_decode(self, k: int, x_in, pos, cache, labels):
    return self.blocks[k].decode(x_in, pos, cache, labels)

  def from_prior(self, z):
    """Standard-normal z (B, T, D) -> a draw of the prior N(0, std^2): the input of block K-1's inverse."""
    return z * jnp.exp(self.prior_log_std)[None] if self.prior_std else z


# ------------------------------------------------------------------------------------
# Pure functions over (flow, params); the inverse is in models/inverse.py.
# ------------------------------------------------------------------------------------
def forward(flow: Flow, params, x, labels):
  """x (B, T, D) -> (z (B, T, D), logdet (B,))."""
  z, logdet, _ = flow.apply({"params": params}, x, labels)
  return z, logdet


def block_logdets(flow: Flow, params, x, labels):
  """(K, B) log-determinant of each block's map (data -> noise)."""
  return flow.apply({"params": params}, x, labels, per_block=True)[1]
