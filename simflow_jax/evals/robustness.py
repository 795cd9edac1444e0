"""Decoder robustness to latent noise, latent interpolation, and evaluation figures.

DESIGN.md section 8 (paper Fig. 3): decode mu + s * noise for a sweep of s and
measure PSNR (and LPIPS) against the input images; decode linear
interpolations between two images' latent means. The encoder / decoder are pure
callables supplied (and jitted) by the caller. Also writes the figures of the
evaluation: the robustness curve, a bar chart of latent statistics, and image
grids (PNG via Pillow). Matplotlib is used through its object API
(matplotlib.figure.Figure, Agg canvas), so no pyplot state or display is needed.

Public API:
  psnr(a, b) -> float
  noise_robustness(encode_mu, decode, images, sweep, rng, lpips=None) -> list[dict]
  interpolate(encode_mu, decode, img_a, img_b, num=8) -> (num, H, W, C) numpy
  save_image_grid(images, path, nrow=8, padding=2)
  plot_robustness(results, path)
  plot_latent_stats(stats_dict, path)

Images are NHWC float in [-1, 1].
"""
import math
import os
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

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
  `sweep` comes from config.eval.noise_sweep.
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


def _to_uint8(images) -> np.ndarray:
  x = np.clip(np.asarray(images, np.float64), -1.0, 1.0)
  return np.round((x + 1.0) * 127.5).astype(np.uint8)


def save_image_grid(images, path: str, nrow: int = 8, padding: int = 2) -> None:
  """Writes images (N, H, W, C) in [-1, 1], C in {1, 3}, as one PNG grid.

  `nrow` images per row (torchvision's convention), ceil(N / nrow) rows;
  `padding` black pixels around and between the tiles, so the PNG is
  (rows * (H + padding) + padding) high and (cols * (W + padding) + padding)
  wide, cols = min(nrow, N). Grayscale for C = 1, RGB for C = 3.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
    raise ValueError(f"save_image_grid needs images (N >= 1, H, W, C in {{1, 3}}), "
                     f"got shape {images.shape}")
  if nrow < 1 or padding < 0:
    raise ValueError(f"nrow must be >= 1 and padding >= 0, got {nrow}, {padding}")
  n, h, w, c = images.shape
  cols = min(nrow, n)
  rows = math.ceil(n / nrow)
  grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
  tiles = _to_uint8(images)
  for k in range(n):
    y = padding + (k // nrow) * (h + padding)
    x = padding + (k % nrow) * (w + padding)
    grid[y:y + h, x:x + w] = tiles[k]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)  # uint8: mode L or RGB


def plot_robustness(results: Sequence[Mapping[str, float]], path: str) -> None:
  """Plots PSNR (and LPIPS on a second axis, if present) against the noise scale s."""
  if not results:
    raise ValueError("plot_robustness needs at least one result row from noise_robustness")
  s = [r["s"] for r in results]
  fig = Figure(figsize=(5, 3.5))
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(s, [r["psnr"] for r in results], "o-", color="tab:blue", label="PSNR")
  ax.set_xlabel("noise scale s (decode mu + s * eps)")
  ax.set_ylabel("PSNR (dB)", color="tab:blue")
  if all("lpips" in r for r in results):
    ax2 = ax.twinx()
    ax2.plot(s, [r["lpips"] for r in results], "s--", color="tab:red", label="LPIPS")
    ax2.set_ylabel("LPIPS", color="tab:red")
  ax.set_title("Decoder robustness to latent noise")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)


def plot_latent_stats(stats_dict: Mapping, path: str) -> None:
  """Bar charts of latent statistics, one panel per statistic.

  stats_dict: either one result of latent_stats.latent_statistics ({stat: value})
  or several, keyed by a label ({label: {stat: value}}, e.g. one per training
  variant), drawn as one bar per label in every panel. NaN values draw no bar.
  """
  if not stats_dict:
    raise ValueError("plot_latent_stats needs a non-empty dict of statistics")
  if all(isinstance(v, Mapping) for v in stats_dict.values()):
    groups = {str(k): dict(v) for k, v in stats_dict.items()}
  else:
    groups = {"latents": dict(stats_dict)}
  names = list(next(iter(groups.values())))
  if any(list(g) != names for g in groups.values()):
    raise ValueError("every label in plot_latent_stats must have the same statistics")
  labels = list(groups)
  fig = Figure(figsize=(3.2 * len(names), 3.2))
  for i, name in enumerate(names):
    ax = fig.add_subplot(1, len(names), i + 1)
    ax.bar(range(len(labels)), [groups[label][name] for label in labels],
           color=[f"C{j % 10}" for j in range(len(labels))])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_title(name.replace("_", " "))
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
