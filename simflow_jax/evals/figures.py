"""Images and figures: uint8 pixels, PNG image grids, and the evaluation's plots.

Images are NHWC float in [-1, 1], (N, H, W, C) with C = 1 (grayscale) or 3 (RGB); their
pixels are round((x + 1) * 127.5) (`to_uint8`), the same in PNGs and in the ADM .npz export.
Matplotlib is used through its object API (matplotlib.figure.Figure, Agg canvas), so no
pyplot state or display is needed; PNG grids are written with Pillow.
"""
import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 round((x + 1) * 127.5), clipped to [0, 255] (float32
  arithmetic: the ADM export's pixels, kept identical across versions for resumed exports)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


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
  tiles = to_uint8(images)  # (N, H, W, C)
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
