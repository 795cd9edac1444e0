"""Decoder robustness to latent noise and latent interpolation (SimFlow paper, Fig. 3).

Decode mu + s * eps for a sweep of noise scales s and measure PSNR (and LPIPS) against
the input images; decode linear interpolations between two images' latent means. The
encoder / decoder are pure callables supplied (and jitted) by the caller. Images are NHWC
float in [-1, 1] (N, H, W, C); latents are whatever the encoder returns, (N, h, w, c) here.
Definitions: docs/evaluation.md.
"""
from typing import Callable, Optional, Sequence

import jax
import numpy as np

PSNR_MAX_DB = 100.0  # identical images: the MSE is floored at 1e-10, so PSNR <= 100 dB


def psnr(a, b) -> float:
  """Peak signal-to-noise ratio in dB of images in [-1, 1], with data range 1.

  Both inputs are clipped to [-1, 1] and mapped to [0, 1] by (x + 1) / 2; then
  PSNR = 10 log10(1 / max(MSE, 1e-10)) per image (MSE over H, W, C), so
  identical images give exactly PSNR_MAX_DB = 100 dB instead of inf. For a batch
  (N, H, W, C) the result is the mean of the N per-image values; a single image
  (H, W, C) gives its own value.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim not in (3, 4):
    raise ValueError(f"psnr needs two images (H, W, C) or batches (N, H, W, C) of the same "
                     f"shape, got {a.shape} and {b.shape}")
  a = (np.clip(a, -1.0, 1.0) + 1.0) / 2.0
  b = (np.clip(b, -1.0, 1.0) + 1.0) / 2.0
  mse = np.square(a - b).mean(axis=(-3, -2, -1))  # (N,) or ()
  return float(np.mean(-10.0 * np.log10(np.maximum(mse, 1e-10))))


def noise_robustness(encode_mu: Callable, decode: Callable, images, sweep: Sequence[float],
                     rng: jax.Array, lpips: Optional[Callable] = None) -> list[dict]:
  """PSNR (and LPIPS) of decode(mu + s * eps) against `images`, for each s in `sweep`.

  mu = encode_mu(images); eps ~ N(0, 1) with mu's shape is drawn ONCE from `rng`
  and shared by every s (common random numbers: the curve varies only with s).
  `lpips`, if given, is called as lpips(decoded, images) on [-1, 1] NHWC images
  and returns per-image distances (or their mean); its mean is reported.
  Returns [{"s": s, "psnr": dB, "lpips": d (only with lpips)}, ...] in sweep order.
  `sweep` comes from the robustness evaluator's noise_sweep (config.evals).
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be a batch (N, H, W, C), got shape {images.shape}")
  mu = encode_mu(images)
  eps = jax.random.normal(rng, np.shape(mu), dtype=np.asarray(mu).dtype)
  results = []
  for s in sweep:
    decoded = np.asarray(decode(mu + s * eps))
    if decoded.shape != images.shape:
      raise ValueError(f"decode returned shape {decoded.shape}, expected {images.shape}")
    row = {"s": float(s), "psnr": psnr(decoded, images)}
    if lpips is not None:
      row["lpips"] = float(np.mean(np.asarray(lpips(decoded, images))))
    results.append(row)
  return results


def interpolate(encode_mu: Callable, decode: Callable, img_a, img_b, num: int = 8) -> np.ndarray:
  """Decodes (1 - t) mu_a + t mu_b for t = linspace(0, 1, num); returns (num, H, W, C).

  img_a, img_b: single images (H, W, C) or (1, H, W, C). The end points are
  exactly decode(mu_a) and decode(mu_b).
  """
  if num < 2:
    raise ValueError(f"interpolate needs num >= 2 frames, got {num}")
  a = np.asarray(img_a)
  b = np.asarray(img_b)
  a = a[None] if a.ndim == 3 else a
  b = b[None] if b.ndim == 3 else b
  if a.shape != b.shape or a.ndim != 4 or a.shape[0] != 1:
    raise ValueError(f"img_a and img_b must be single images (H, W, C) of the same shape, "
                     f"got {np.shape(img_a)} and {np.shape(img_b)}")
  mu = np.asarray(encode_mu(np.concatenate([a, b], axis=0)))  # (2, h, w, c)
  t = np.linspace(0.0, 1.0, num, dtype=mu.dtype).reshape((num,) + (1,) * (mu.ndim - 1))
  latents = (1 - t) * mu[0:1] + t * mu[1:2]  # (num, h, w, c)
  return np.asarray(decode(latents))
