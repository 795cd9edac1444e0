"""A Flax (linen) DINOv2 ViT: the frozen feature encoder of REPA / REPA-E.

One job: turn images into DINOv2's normalised patch tokens. The architecture is
the plain DINOv2 release (facebookresearch/dinov2 torch hub `dinov2_vit{s,b,l}14`,
Hugging Face `facebook/dinov2-{small,base,large}`): 14x14 patch conv, a cls token,
a learned position embedding for the 37x37 grid of the 518 px pre-training
resolution (bicubically resized to other grids), pre-norm blocks with LayerScale,
GELU MLP, and a final LayerNorm. The release checkpoints have no register tokens
(those are the separate `*_reg` models, not supported here); their `mask_token`
is only used by the pre-training masking and is dropped by the converter.

Shapes: `preprocess` maps [-1, 1] NHWC images (1 or 3 channels) to ImageNet-normalised
(B, size, size, 3); `DinoV2(**PRESETS[name])` maps (B, H, W, 3), H and W multiples of 14,
to patch tokens (B, H/14 * W/14, dim) in raster order (and the cls token with
return_cls=True). Presets: 'dinov2_s14', 'dinov2_b14', 'dinov2_l14', and 'tiny' (tests,
CPU demo, random weights). Bicubic resizing follows PyTorch's F.interpolate(mode='bicubic',
align_corners=False, antialias=False), as the references do for the position embedding.

Params are the inner 'params' collection: `model.apply({'params': params}, x)`.
Weights files come from scripts/convert_dinov2.py.
"""
import functools
from typing import Any

from etils import epath
import flax.linen as nn
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PRESETS = {
    "dinov2_s14": dict(dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "dinov2_b14": dict(dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "dinov2_l14": dict(dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    # Random weights only: unit tests and the CPU demo.
    "tiny": dict(dim=64, depth=2, num_heads=2, mlp_dim=256),
}

# Where the official weights of each preset come from (for error messages).
_RELEASES = {
    "dinov2_s14": ("dinov2_vits14_pretrain.pth", "dinov2_vits14", "facebook/dinov2-small"),
    "dinov2_b14": ("dinov2_vitb14_pretrain.pth", "dinov2_vitb14", "facebook/dinov2-base"),
    "dinov2_l14": ("dinov2_vitl14_pretrain.pth", "dinov2_vitl14", "facebook/dinov2-large"),
}


def _check_preset(preset: str) -> None:
  if preset not in PRESETS:
    raise ValueError(f"Unknown DINOv2 preset {preset!r}; choose one of {sorted(PRESETS)}.")


# ---- PyTorch-compatible bicubic resize -------------------------------------------------------


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """PyTorch's cubic convolution weights for taps at offsets -1, 0, 1, 2 (shape (..., 4))."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def _bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
  """(out_size, in_size) matrix of torch bicubic resampling along one axis.

  Source coordinate of output i: (i + 0.5) * s - 0.5 with s = 1 / scale_factor when
  a scale factor is given (torch then uses it as is), else in_size / out_size; taps
  outside the input are clamped to the border (torch's `upsample_get_value_bounded`).
  """
  s = 1.0 / scale_factor if scale_factor else in_size / out_size
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * s - 0.5
  base = np.floor(src)
  w = _cubic_weights(src - base)  # (out, 4)
  idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), w.reshape(-1))
  return m.astype(np.float32)


def resize_bicubic_torch(x: jax.Array, out_hw: tuple[int, int],
                         scale_factors: tuple[float, float] | None = None) -> jax.Array:
  """Resizes (B, H, W, C) like `torch.nn.functional.interpolate(mode='bicubic')`.

  align_corners=False, antialias=False, cubic coefficient -0.75 (jax.image.resize
  differs: Keys a=-0.5 and antialiasing). `scale_factors` (sh, sw) reproduce torch's
  `scale_factor=` path, which maps coordinates with the given factors instead of
  out/in (the DINOv2 hub models pass (grid + 0.1) / 37).
  """
  _, h, w, _ = x.shape
  sh, sw = scale_factors if scale_factors is not None else (None, None)
  mh = jnp.asarray(_bicubic_matrix(h, out_hw[0], sh))  # (out_h, h)
  mw = jnp.asarray(_bicubic_matrix(w, out_hw[1], sw))  # (out_w, w)
  hp = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=hp)
  return jnp.einsum("pw,bowc->bopc", mw, x, precision=hp)


def preprocess(images: jax.Array, size: int = 224) -> jax.Array:
  """[-1, 1] NHWC images -> DINOv2 input (B, size, size, 3), float32.

  Exactly REPA's `preprocess_raw_image` for DINOv2: to [0, 1], ImageNet mean/std
  normalisation, then torch-style bicubic resize to `size` (align_corners=False,
  no antialiasing; see `resize_bicubic_torch`). REPA uses size = 224 * (res // 256),
  i.e. 224 for 256 px images -> a 16x16 token grid. Grayscale is repeated to RGB.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"preprocess expects NHWC images with 1 or 3 channels, got {images.shape}.")
  if size % 14:
    raise ValueError(f"size={size} must be a multiple of the DINOv2 patch size 14.")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)  # (B, H, W, 3)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = ((x + 1.0) * 0.5 - mean) / std
  return resize_bicubic_torch(x, (size, size))


def interpolate_pos_embed(pos_embed: jax.Array, grid_hw: tuple[int, int],
                          interpolate_offset: float = 0.0) -> jax.Array:
  """(1, 1 + M*M, dim) cls + square-grid position embedding -> (1, 1 + gh*gw, dim).

  Unchanged when the grid is already (M, M) (as both references skip it). Otherwise
  torch bicubic (align_corners=False, no antialias) on the patch part: with
  `interpolate_offset` 0 by output size (transformers' Dinov2Model), else by
  `scale_factor=(g + offset) / M` (facebookresearch/dinov2 hub models use 0.1).
  """
  _, n, dim = pos_embed.shape
  m = int(round(np.sqrt(n - 1)))
  if m * m != n - 1:
    raise ValueError(f"position embedding of {n} tokens is not cls + a square grid.")
  if tuple(grid_hw) == (m, m):
    return pos_embed
  cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
  patch_pos = patch_pos.reshape(1, m, m, dim)  # (1, M, M, dim)
  scale = None
  if interpolate_offset:
    scale = tuple((g + interpolate_offset) / m for g in grid_hw)
    if any(int(np.floor(m * s)) != g for s, g in zip(scale, grid_hw)):
      raise ValueError(f"interpolate_offset={interpolate_offset} does not give grid {grid_hw}.")
  patch_pos = resize_bicubic_torch(patch_pos, grid_hw, scale)  # (1, gh, gw, dim)
  patch_pos = patch_pos.reshape(1, grid_hw[0] * grid_hw[1], dim)
  return jnp.concatenate([cls_pos, patch_pos.astype(pos_embed.dtype)], axis=1)


# ---- the model ---------------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head self-attention with a fused qkv projection (hub layout)."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    head_dim = self.dim // self.num_heads
    qkv = nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, t, 3, self.num_heads, head_dim)  # (B, T, 3, heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(q, k, v)  # (B, T, heads, head_dim), scale head_dim**-0.5
    out = out.reshape(b, t, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, name="proj")(out)


class LayerScale(nn.Module):
  dim: int
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (self.dim,))
    return x * gamma.astype(x.dtype)


class Mlp(nn.Module):
  hidden: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(self.out, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
  """Pre-norm ViT block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
  dim: int
  num_heads: int
  mlp_dim: int
  ln_eps: float
  layerscale_init: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm1")(x)
    h = Attention(self.dim, self.num_heads, dtype=self.dtype, name="attn")(h)
    x = x + LayerScale(self.dim, self.layerscale_init, name="ls1")(h)
    h = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm2")(x)
    h = Mlp(self.mlp_dim, self.dim, dtype=self.dtype, name="mlp")(h)
    return x + LayerScale(self.dim, self.layerscale_init, name="ls2")(h)


class DinoV2(nn.Module):
  """DINOv2 ViT returning the final-LayerNorm patch tokens.

  Attributes:
    dim, depth, num_heads, mlp_dim: the ViT size (see PRESETS).
    patch_size: 14 for every release model.
    pos_grid: side of the learned position-embedding grid (37 = 518 px / 14).
    interpolate_offset: how the position embedding is resized to another grid.
      0.0 (default) is Hugging Face transformers' Dinov2Model (v5): torch bicubic
      with `size=(gh, gw)`, align_corners=False, no antialias. 0.1 is the
      facebookresearch/dinov2 torch hub model that REPA / REPA-E load (and older
      transformers releases): the same resize driven by
      `scale_factor=((gh + 0.1) / pos_grid, (gw + 0.1) / pos_grid)`.
    ln_eps: LayerNorm epsilon (1e-6 in DINOv2).
    layerscale_init: LayerScale value of a random init (converted weights override it).
    dtype: compute dtype; parameters are float32, the returned tokens are float32.
  """
  dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 14
  pos_grid: int = 37
  interpolate_offset: float = 0.0
  ln_eps: float = 1e-6
  layerscale_init: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, return_cls: bool = False):
    """x: (B, H, W, 3) from `preprocess` -> (B, T, dim) patch tokens [, (B, dim) cls]."""
    b, h, w, c = x.shape
    p = self.patch_size
    if c != 3 or h % p or w % p:
      raise ValueError(f"DinoV2 expects (B, H, W, 3) with H, W multiples of {p} (use preprocess); "
                       f"got {x.shape}.")
    grid_hw = (h // p, w // p)
    tokens = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                     name="patch_embed")(x.astype(self.dtype))
    tokens = tokens.reshape(b, grid_hw[0] * grid_hw[1], self.dim)  # (B, T, dim), raster order
    cls = self.param("cls_token", nn.initializers.truncated_normal(0.02), (1, 1, self.dim))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.dim)).astype(tokens.dtype), tokens],
                             axis=1)  # (B, 1 + T, dim)
    m = self.pos_grid
    pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02), (1, 1 + m * m, self.dim))
    pos = interpolate_pos_embed(pos, grid_hw, self.interpolate_offset)  # (1, 1 + T, dim)
    tokens = tokens + pos.astype(tokens.dtype)
    for i in range(self.depth):
      tokens = Block(self.dim, self.num_heads, self.mlp_dim, self.ln_eps, self.layerscale_init,
                     dtype=self.dtype, name=f"block_{i}")(tokens)
    tokens = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name="norm")(tokens)
    tokens = tokens.astype(jnp.float32)
    if return_cls:
      return tokens[:, 1:], tokens[:, 0]
    return tokens[:, 1:]


def make_dinov2(preset: str, **overrides) -> DinoV2:
  """DinoV2 for a preset; `overrides` replace fields (e.g. dtype, interpolate_offset)."""
  _check_preset(preset)
  return DinoV2(**{**PRESETS[preset], **overrides})


# ---- parameters --------------------------------------------------------------------------------


def _param_shapes(preset: str) -> dict:
  model = make_dinov2(preset)
  x = jax.ShapeDtypeStruct((1, 14, 14, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def init_random_dinov2_params(rng: jax.Array, preset: str = "tiny") -> dict:
  """Random DINOv2 parameters (meaningless features): for tests and the CPU demo."""
  model = make_dinov2(preset)
  return jax.jit(model.init)(rng, jnp.zeros((1, 14, 14, 3), jnp.float32))["params"]


def check_params(params: dict, preset: str) -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped parameter."""
  _check_preset(preset)
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_flatten_with_path(_param_shapes(preset))[0]}
  got = {jax.tree_util.keystr(k): np.shape(v)
         for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
  problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
  problems += [f"{k}: shape {got[k]}, preset {preset!r} needs {want[k]}"
               for k in sorted(want.keys() & got.keys()) if tuple(got[k]) != tuple(want[k])]
  if problems:
    raise ValueError(f"DINOv2 parameters do not match preset {preset!r} (converted for another "
                     f"preset?): " + "; ".join(problems[:10]) +
                     (f" ... ({len(problems)} problems)" if len(problems) > 10 else ""))


def _missing_weights_message(path: str, preset: str) -> str:
  pth, hub_name, hf_name = _RELEASES.get(preset, _RELEASES["dinov2_b14"])
  return (
      f"DINOv2 weights file not found: {path!r} (preset {preset!r}). Nothing downloads at run "
      f"time. On a machine with internet get the official weights: the torch hub release "
      f"`{pth}` of facebookresearch/dinov2 "
      f"(https://dl.fbaipublicfiles.com/dinov2/{hub_name}/{pth}) or the Hugging Face model "
      f"`{hf_name}` (model.safetensors); convert it with "
      f"`python scripts/convert_dinov2.py --input {pth} --output {preset}.msgpack "
      f"--preset {preset}` and set config.repa.weights to the .msgpack file. "
      f"(For tests and the CPU demo, preset 'tiny' uses init_random_dinov2_params.)")


def load_dinov2_params(path: str, preset: str) -> dict:
  """Reads a msgpack written by scripts/convert_dinov2.py and checks it against `preset`."""
  _check_preset(preset)
  if not path or not epath.Path(path).exists():
    raise FileNotFoundError(_missing_weights_message(path, preset))
  params = serialization.msgpack_restore(epath.Path(path).read_bytes())
  check_params(params, preset)
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
