"""REPA / REPA-E representation alignment: projector, token matching, loss.

One job: map flow hidden states onto frozen-encoder (DINOv2) features and score
the match. The flow's hidden states at one layer, with the block's permutation
undone (raster token order), go through `match_tokens` onto the encoder's token
grid, through `Projector` to the encoder width, and `alignment_loss` compares them
with the encoder's patch tokens.

Shapes: flow hidden states (B, T, width) in raster order on an (h, w) token grid ->
match_tokens -> (B, th*tw, width) on the encoder's grid -> Projector (a 3-layer SiLU MLP,
REPA's build_mlp) -> (B, th*tw, out_dim); alignment_loss against the encoder's patch tokens
(B, th*tw, out_dim) is minus the token-mean cosine similarity, per example (B,).
"""
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp


class Projector(nn.Module):
  """Linear(hidden) -> SiLU -> Linear(hidden) -> SiLU -> Linear(out_dim), as in REPA."""
  hidden: int = 2048
  out_dim: int = 768
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    x = nn.silu(nn.Dense(self.hidden, dtype=self.dtype, name="fc2")(x))
    return nn.Dense(self.out_dim, dtype=self.dtype, name="fc3")(x)


def alignment_loss(projected: jax.Array, target: jax.Array, eps: float = 1e-12) -> jax.Array:
  """-mean_t cos(projected[b, t], target[b, t]) per example: (B, T, D) x2 -> (B,).

  Like REPA's loss (torch `F.normalize`: x / max(|x|, eps)), computed in float32.
  -1 when the two agree up to a positive scale, +1 when opposite. The caller
  stops gradients into `target` (the frozen encoder's features) if needed.
  """
  if projected.shape != target.shape or projected.ndim != 3:
    raise ValueError(f"alignment_loss needs two (B, T, D) arrays of one shape; got "
                     f"{projected.shape} and {target.shape} (use match_tokens / Projector).")

  def normalize(x):
    x = x.astype(jnp.float32)
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))

  cos = jnp.sum(normalize(projected) * normalize(target), axis=-1)  # (B, T)
  return -jnp.mean(cos, axis=-1)


def match_tokens(hidden: jax.Array, flow_grid_hw: tuple[int, int],
                 target_grid_hw: tuple[int, int]) -> jax.Array:
  """Resamples raster-ordered tokens (B, fh*fw, C) onto a (th, tw) grid -> (B, th*tw, C).

  - same grid: returned unchanged;
  - the flow grid an integer multiple of the target grid in both axes: exact
    average pooling over (fh/th) x (fw/tw) windows (e.g. 32x32 latent tokens ->
    16x16 DINOv2 grid: 2x2 mean);
  - otherwise (a coarser flow grid, or a non-integer ratio): bilinear resize
    (`jax.image.resize`, antialiased when shrinking, half-pixel centres).
  The function is generic over the channel width, so it can equally bring the
  encoder's targets onto a coarser flow grid (pool the targets instead of
  upsampling the flow tokens).
  """
  b, t, c = hidden.shape
  fh, fw = flow_grid_hw
  th, tw = target_grid_hw
  if t != fh * fw:
    raise ValueError(f"match_tokens: {t} tokens do not form the flow grid {flow_grid_hw}.")
  if (fh, fw) == (th, tw):
    return hidden
  if fh % th == 0 and fw % tw == 0:
    return einops.reduce(hidden, "b (h p w q) c -> b (h w) c", "mean",
                         h=th, p=fh // th, w=tw, q=fw // tw)
  grid = hidden.reshape(b, fh, fw, c)  # (B, fh, fw, C)
  grid = jax.image.resize(grid, (b, th, tw, c), method="linear", antialias=True)
  return grid.reshape(b, th * tw, c)  # (B, th*tw, C)
