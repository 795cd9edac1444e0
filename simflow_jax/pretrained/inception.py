"""The FID InceptionV3 (`inception-2015-12-05`) as a Flax linen module.

One job: turn images into the Inception features that FID, sFID, Inception Score and
precision/recall are computed from, the way the TF1 graph behind the ADM evaluator (and
torch-fidelity's faithful PyTorch port of it) computes them.

Input: float images (B, H, W, 3) (or (B, H, W, 1), repeated to RGB) with values in
[0, 255], i.e. a uint8 image cast to float, any H and W. The network first resizes to
299 x 299 with TF1's `resize_bilinear` (align_corners=False, no half-pixel centres: the
ResizeBilinear node of the TF graph that ADM feeds, reproduced by torch-fidelity's
`interpolate_bilinear_2d_like_tensorflow1x`; pytorch-fid's F.interpolate differs from
it), then maps [0, 255] to [-1, 1) by (x - 128) / 128 like the graph's Sub/Mul nodes.

Output: a dict of float32 arrays
  'pool':            (B, 2048) pool_3 features (FID, precision/recall).
  'logits_unbiased': (B, 1008) pool @ W without the bias: the logits whose softmax the
                     Inception Score uses (ADM, improved-gan and torch-fidelity all
                     drop the bias).
  'logits':          (B, 1008) pool @ W + b, the classifier's full logits.
  'spatial':         (B, 2023) sFID features: TF's `mixed_6/conv:0` (the ReLU output of
                     the 1x1 branch of Mixed_6d, (B, 17, 17, 192)), first 7 channels,
                     flattened in (h, w, c) order exactly as ADM's evaluator does.

Parameters use the PyTorch state_dict names (`Mixed_6d/branch1x1/conv/kernel`, ...).
Each BatchNorm is stored folded into a per-channel affine map:
  scale = gamma / sqrt(running_var + 1e-3),  bias = beta - running_mean * scale.

Weights: scripts/convert_inception.py writes the msgpack that load_inception_params reads;
`to_inception_range` turns [-1, 1] images into the [0, 255] values of a uint8 export.
"""
import functools
import os
from typing import Callable

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7]
FEATURE_KEYS = ("pool", "logits_unbiased", "logits", "spatial")

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URLS = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
    # The same tensors under torch-fidelity's file name.
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth",
)
CONVERT_COMMAND = (
    f"python scripts/convert_inception.py --pth /path/to/{WEIGHTS_FILENAME} "
    "--out /path/to/inception_fid.msgpack")


def resize_bilinear_tf1(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """TF1 `tf.image.resize_bilinear(align_corners=False)` of (B, H, W, C) images.

  Source coordinate of output pixel i is i * (in / out) (no half-pixel offset), computed
  in float32; the four neighbours are interpolated along x first, then along y, in the
  same operation order as TF1 and torch-fidelity.
  """
  _, in_h, in_w, _ = images.shape
  out_h, out_w = size

  def coords(in_size, out_size):
    src = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (src - lo.astype(np.float32)).astype(np.float32)

  y_lo, y_hi, dy = coords(in_h, out_h)
  x_lo, x_hi, dx = coords(in_w, out_w)
  top, bottom = images[:, y_lo], images[:, y_hi]  # (B, out_h, W, C) each
  dx = dx[None, None, :, None]
  top = top[:, :, x_lo] + (top[:, :, x_hi] - top[:, :, x_lo]) * dx  # (B, out_h, out_w, C)
  bottom = bottom[:, :, x_lo] + (bottom[:, :, x_hi] - bottom[:, :, x_lo]) * dx
  return top + (bottom - top) * dy[None, :, None, None]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class FoldedBatchNorm(nn.Module):
  """Inference BatchNorm folded to x * scale + bias (see the module docstring)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    return x * scale + bias


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm -> ReLU, with PyTorch's symmetric integer padding."""
  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False,
                precision=self.precision, name="conv")(x)
    x = FoldedBatchNorm(name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TF's average pool ignores the zero padding (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b/5c/5d)."""
  pool_features: int
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(64, 1, name="branch1x1")(x)
    branch5x5 = conv(48, 1, name="branch5x5_1")(x)
    branch5x5 = conv(64, 5, padding=2, name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """35x35 -> 17x17 reduction block (Mixed_6a)."""
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(384, 3, strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b..6e). Returns (output, branch1x1): Mixed_6d's branch1x1 is
  TF's `mixed_6/conv`, the sFID layer."""
  channels_7x7: int
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name="branch1x1")(x)
    branch7x7 = conv(c7, 1, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, 1, name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    out = jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)
    return out, branch1x1


class InceptionD(nn.Module):
  """17x17 -> 8x8 reduction block (Mixed_7a)."""
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch3x3 = conv(192, 1, name="branch3x3_1")(x)
    branch3x3 = conv(320, 3, strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
    branch_pool = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b with an average pool branch, Mixed_7c with a MAX pool branch:
  the TF graph's quirk that pytorch-fid's FIDInceptionE_2 reproduces)."""
  pool: str  # 'avg' | 'max'
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(BasicConv2d, precision=self.precision)
    branch1x1 = conv(320, 1, name="branch1x1")(x)
    branch3x3 = conv(384, 1, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
    ], axis=-1)
    branch3x3dbl = conv(448, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl),
    ], axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"InceptionE.pool must be 'avg' or 'max', got {self.pool!r}")
    branch_pool = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class Logits(nn.Module):
  """The 2048 -> 1008 classifier; returns (unbiased logits, logits)."""
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], NUM_LOGITS))
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,))
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased, unbiased + bias


class InceptionV3(nn.Module):
  """FID InceptionV3: (B, H, W, 3 or 1) float images in [0, 255] -> feature dict.

  `precision` is the conv/matmul precision; HIGHEST (the default) keeps float32 accuracy
  on TPU, where the default would round the operands to bfloat16 and shift FID.
  """
  precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(
          f"InceptionV3 expects NHWC images (B, H, W, 3) or (B, H, W, 1) in [0, 255], got "
          f"shape {images.shape}; convert [-1, 1] images with to_inception_range first.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB, (B, H, W, 3)
    x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))  # (B, 299, 299, 3)
    x = (x - 128.0) / 128.0

    conv = functools.partial(BasicConv2d, precision=self.precision)
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)  # (B, 149, 149, 32)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)  # (B, 147, 147, 32)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)  # (B, 147, 147, 64)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # (B, 73, 73, 64)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)  # (B, 73, 73, 80)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)  # (B, 71, 71, 192)
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # (B, 35, 35, 192)

    p = self.precision
    x = InceptionA(32, precision=p, name="Mixed_5b")(x)  # (B, 35, 35, 256)
    x = InceptionA(64, precision=p, name="Mixed_5c")(x)  # (B, 35, 35, 288)
    x = InceptionA(64, precision=p, name="Mixed_5d")(x)  # (B, 35, 35, 288)
    x = InceptionB(precision=p, name="Mixed_6a")(x)  # (B, 17, 17, 768)
    x, _ = InceptionC(128, precision=p, name="Mixed_6b")(x)
    x, _ = InceptionC(160, precision=p, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, precision=p, name="Mixed_6d")(x)  # (B, 17, 17, 192)
    x, _ = InceptionC(192, precision=p, name="Mixed_6e")(x)  # (B, 17, 17, 768)
    x = InceptionD(precision=p, name="Mixed_7a")(x)  # (B, 8, 8, 1280)
    x = InceptionE("avg", precision=p, name="Mixed_7b")(x)  # (B, 8, 8, 2048)
    x = InceptionE("max", precision=p, name="Mixed_7c")(x)  # (B, 8, 8, 2048)

    pool = jnp.mean(x, axis=(1, 2))  # (B, 2048)
    logits_unbiased, logits = Logits(precision=p, name="fc")(pool)  # (B, 1008) each
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS]  # (B, 17, 17, 7)
    spatial = spatial.reshape(spatial.shape[0], -1)  # (B, 2023), (h, w, c) order
    return {"pool": pool, "logits_unbiased": logits_unbiased, "logits": logits,
            "spatial": spatial}


def _missing_weights_message(path: str) -> str:
  return (
      f"FID Inception weights not found at {path!r}. Download the standard PyTorch file "
      f"{WEIGHTS_FILENAME} (from {WEIGHTS_URLS[0]} ; torch-fidelity publishes the same "
      f"weights at {WEIGHTS_URLS[1]}), then convert it once with:\n  {CONVERT_COMMAND}\n"
      "and point config.eval.inception_weights at the .msgpack file. Nothing is downloaded "
      "at run time.")


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {k: v.shape for k, v in flax.traverse_util.flatten_dict(shapes["params"]).items()}


def check_inception_params(params: dict) -> None:
  """Raises ValueError unless `params` has exactly InceptionV3's names and shapes."""
  expected = _expected_shapes()
  got = {k: tuple(np.shape(v)) for k, v in flax.traverse_util.flatten_dict(params).items()}
  problems = [f"missing {'/'.join(k)}" for k in sorted(expected.keys() - got.keys())]
  problems += [f"unexpected {'/'.join(k)}" for k in sorted(got.keys() - expected.keys())]
  problems += [f"{'/'.join(k)}: shape {got[k]}, expected {expected[k]}"
               for k in sorted(expected.keys() & got.keys()) if got[k] != expected[k]]
  if problems:
    raise ValueError(
        f"Inception params do not fit InceptionV3 ({len(problems)} problems, first: "
        f"{problems[:5]}); re-create the file with:\n  {CONVERT_COMMAND}")


def load_inception_params(path: str) -> dict:
  """Reads converted InceptionV3 params (a msgpack of the 'params' tree)."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(_missing_weights_message(path))
  with open(path, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  check_inception_params(params)
  return params


def to_inception_range(images: jax.Array) -> jax.Array:
  """[-1, 1] images -> integer-valued floats in [0, 255]: (x + 1) * 127.5 rounded half up,
  the values a uint8 sample export (`clamp(127.5 * x + 128, 0, 255).to(uint8)` in
  DiT/SiT) holds."""
  return jnp.clip(jnp.floor(127.5 * images + 128.0), 0.0, 255.0)


def make_feature_fn(params: dict, batch_size: int = 200,
                    precision: jax.lax.Precision | None = jax.lax.Precision.HIGHEST,
                    ) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """Returns fn(images (N, H, W, C) in [0, 255], any N) -> {FEATURE_KEYS: numpy (N, ...)}.

  Runs a jitted forward on batches of `batch_size` (the last batch is zero-padded so
  one compilation serves every batch of a given image size).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  model = InceptionV3(precision=precision)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  params = jax.device_put(params)

  def feature_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
      raise ValueError(f"expected a non-empty (N, H, W, C) image array, got {images.shape}")
    step = min(batch_size, images.shape[0])
    chunks = []
    for start in range(0, images.shape[0], step):
      batch = images[start:start + step].astype(np.float32)
      count = batch.shape[0]
      if count < step:
        batch = np.concatenate([batch, np.zeros((step - count,) + batch.shape[1:], np.float32)])
      out = apply(params, batch)
      chunks.append({k: np.asarray(out[k])[:count] for k in FEATURE_KEYS})
    return {k: np.concatenate([c[k] for c in chunks]) for k in FEATURE_KEYS}

  return feature_fn
