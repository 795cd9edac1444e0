"""The LDM-style convolutional VAE of SimFlow (arXiv 2512.04084), NHWC, any number of channels.

SimFlow's change to the VAE: the encoder predicts only the posterior mean, and the latent fed
to the decoder and to the flow is x = mu + sigma_bar * eps with a FIXED sigma_bar.
Shapes: images (B, H, W, C) in [-1, 1] (H, W divisible by f = 2 ** (len(ch_mult) - 1)) ->
mu, latents (B, H/f, W/f, z_channels) float32 -> decoded images (B, H, W, out_channels)
float32, unbounded (no tanh). PRESETS holds named sizes (VAE(**PRESETS[n], out_channels=C)).

Parameters live under params['encoder'] and params['decoder'] (the trainer freezes them by those
names). Posterior modes: 'fixed' (SimFlow: the encoder predicts mu only, latents = mu + sigma_bar*eps),
'learned' (the encoder predicts mu and log-variance), 'fixed_ln' (fixed, with mu layer-normalised
over channels without scale or bias). Convolutions run in `dtype`; mu, logvar and images are float32.
"""
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

POSTERIORS = ("fixed", "learned", "fixed_ln")

PRESETS = {
    # Paper scale (INFERRED from the authors' run names): 256 px -> 16x16x64.
    "f16d64": dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_mid=True, z_channels=64),
    # Small presets for CPU runs (32 px digits -> 8x8 or 16x16 latents).
    "f4d4": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_mid=True, z_channels=4),
    "f4d8": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_mid=True, z_channels=8),
    "f2d4": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_mid=True, z_channels=4),
}


class Posterior(flax.struct.PyTreeNode):
  mu: jax.Array                  # (B, h, w, c) float32
  logvar: Optional[jax.Array]    # (B, h, w, c) float32, or None in the fixed modes


def sample_latents(posterior: Posterior, rng: jax.Array, sigma_bar: float) -> jax.Array:
  """Reparameterised draw: mu + std * eps; std = sigma_bar (fixed modes) or exp(logvar / 2)."""
  eps = jax.random.normal(rng, posterior.mu.shape, jnp.float32)
  std = sigma_bar if posterior.logvar is None else jnp.exp(0.5 * posterior.logvar)
  return posterior.mu + std * eps


def group_norm(channels: int, dtype: Any, name: str) -> nn.GroupNorm:
  """GroupNorm with the largest group count <= 32 that divides `channels` (epsilon 1e-6)."""
  groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype, name=name)


def _conv(features: int, dtype: Any, name: str, kernel: int = 3, **kw) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=dtype, name=name, **kw)


class ResBlock(nn.Module):
  """GroupNorm, swish, 3x3 conv, twice; 1x1 conv on the skip path when the width changes."""
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    h = _conv(self.features, self.dtype, "conv1")(nn.swish(group_norm(x.shape[-1], self.dtype, "norm1")(x)))
    h = _conv(self.features, self.dtype, "conv2")(nn.swish(group_norm(self.features, self.dtype, "norm2")(h)))
    if x.shape[-1] != self.features:
      x = _conv(self.features, self.dtype, "nin_shortcut", kernel=1)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all h*w positions (LDM's AttnBlock), residual."""
  dtype: Any

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = group_norm(c, self.dtype, "norm")(x).reshape(b, hgt * wid, c)  # (B, T, C)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(h) for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c ** -0.5
    attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # (B, T, T)
    h = nn.Dense(c, dtype=self.dtype, name="proj_out")(jnp.einsum("bqk,bkc->bqc", attn, v))
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """ResBlock, optional self-attention, ResBlock at the lowest resolution."""
  features: int
  attn: bool
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = ResBlock(self.features, self.dtype, name="block_1")(x)
    if self.attn:
      x = AttnBlock(self.dtype, name="attn_1")(x)
    return ResBlock(self.features, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
  """images (B, H, W, C) -> (B, H/f, W/f, out_features), float32."""
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_mid: bool
  out_features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    x = _conv(self.ch, self.dtype, "conv_in")(x)
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        x = ResBlock(self.ch * mult, self.dtype, name=f"down_{level}_block_{i}")(x)
      if level != len(self.ch_mult) - 1:
        # LDM's Downsample: pad right/bottom by one, 3x3 conv with stride 2.
        x = nn.Conv(x.shape[-1], (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                    name=f"down_{level}_downsample")(x)
    x = MidBlock(x.shape[-1], self.attn_mid, self.dtype, name="mid")(x)
    x = nn.swish(group_norm(x.shape[-1], self.dtype, "norm_out")(x))
    return _conv(self.out_features, self.dtype, "conv_out")(x).astype(jnp.float32)


class Decoder(nn.Module):
  """latents (B, h, w, z) -> images (B, h*f, w*f, out_channels), float32."""
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_mid: bool
  out_channels: int
  dtype: Any

  @nn.compact
  def __call__(self, z):
    x = _conv(self.ch * self.ch_mult[-1], self.dtype, "conv_in")(z.astype(self.dtype))
    x = MidBlock(x.shape[-1], self.attn_mid, self.dtype, name="mid")(x)
    for level in reversed(range(len(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):  # LDM's decoder has one block more per level.
        x = ResBlock(self.ch * self.ch_mult[level], self.dtype, name=f"up_{level}_block_{i}")(x)
      if level != 0:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest neighbour: (B, 2h, 2w, C)
        x = _conv(x.shape[-1], self.dtype, f"up_{level}_upsample")(x)
    x = nn.swish(group_norm(x.shape[-1], self.dtype, "norm_out")(x))
    return _conv(self.out_channels, self.dtype, "conv_out")(x).astype(jnp.float32)


def _layer_norm_channels(x, eps=1e-6):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.var(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


class VAE(nn.Module):
  """The autoencoder; see the module docstring."""
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_mid: bool
  z_channels: int
  out_channels: int
  posterior: str = "fixed"
  sigma_bar: float = 0.5
  dtype: Any = jnp.float32

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @classmethod
  def from_config(cls, vae_cfg, image_channels: int) -> "VAE":
    return cls(ch=vae_cfg.ch, ch_mult=tuple(vae_cfg.ch_mult), num_res_blocks=vae_cfg.num_res_blocks,
               attn_mid=vae_cfg.attn_mid, z_channels=vae_cfg.z_channels, out_channels=image_channels,
               posterior=vae_cfg.posterior, sigma_bar=vae_cfg.sigma_bar, dtype=jnp.dtype(vae_cfg.dtype))

  def setup(self):
    if self.posterior not in POSTERIORS:
      raise ValueError(f"vae.posterior={self.posterior!r}; choose one of {POSTERIORS}.")
    enc_out = 2 * self.z_channels if self.posterior == "learned" else self.z_channels
    self.encoder = Encoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.attn_mid, enc_out,
                           self.dtype)
    self.decoder = Decoder(self.ch, tuple(self.ch_mult), self.num_res_blocks, self.attn_mid,
                           self.out_channels, self.dtype)

  def encode(self, images) -> Posterior:
    f = self.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"VAE.encode wants NHWC images with H and W divisible by f={f}; got shape "
                       f"{images.shape}. Resize/crop the images or use fewer ch_mult levels.")
    h = self.encoder(images)
    if self.posterior == "learned":
      mu, logvar = jnp.split(h, 2, axis=-1)
      return Posterior(mu=mu, logvar=jnp.clip(logvar, -30.0, 20.0))  # LDM's clamp
    if self.posterior == "fixed_ln":
      h = _layer_norm_channels(h)
    return Posterior(mu=h, logvar=None)

  def decode(self, latents) -> jax.Array:
    return self.decoder(latents)

  def __call__(self, images, rng):
    posterior = self.encode(images)
    latents = sample_latents(posterior, rng, self.sigma_bar)
    return self.decode(latents), posterior, latents
