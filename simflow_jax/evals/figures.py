"""Images and figures: uint8 pixels, PNG image grids, and the evaluation's plots.

Images are NHWC float in [-1, 1], (N, H, W, C) with C = 1 (grayscale) or 3 (RGB); their
pixels are round((x + 1) * 127.5) (`to_uint8`), the same in PNGs and in the ADM .npz export.
Plots (the evaluators' and the study's) use matplotlib through its object API
(matplotlib.figure.Figure, Agg canvas), so no pyplot state or display is needed; it is
imported inside the plotting functions, so image grids and the uint8 export (Pillow) work
without it. PNG grids are written with Pillow.
"""
import math
import os
from typing import Mapping, Sequence

import numpy as np
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


def _figure():
  from matplotlib.figure import Figure  # local: only the plots need matplotlib
  return Figure


def plot_robustness(results: Sequence[Mapping[str, float]], path: str) -> None:
  """Plots PSNR (and LPIPS on a second axis, if present) against the noise scale s."""
  if not results:
    raise ValueError("plot_robustness needs at least one result row from noise_robustness")
  s = [r["s"] for r in results]
  fig = _figure()(figsize=(5, 3.5))
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
  fig = _figure()(figsize=(3.2 * len(names), 3.2))
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


def plot_gen_fd(table: dict, path: str) -> None:
  """The study's generation FD per row, without and with guidance, with std error bars."""
  names = list(table)
  fig = _figure()(figsize=(1.0 + 0.9 * len(names), 4.0))
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(names))
  for off, key, label in ((-0.2, "gen_fd", "w/o guidance"), (0.2, "gen_fd_guided", "guided")):
    mean = [table[n]["metrics"][key]["mean"] or np.nan for n in names]
    std = [table[n]["metrics"][key]["std"] or 0.0 for n in names]
    ax.bar(x + off, mean, 0.4, yerr=std, capsize=3, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right")
  ax.set_ylabel("digit FD of samples (lower is better)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def plot_robustness_sweep(table: dict, path: str) -> None:
  """The study's Fig. 3a: decoder PSNR under latent noise, end-to-end fixed sigma_bar vs
  learnable variance, end to end and the stage-1 standard VAE (rows marked fig3a; rows of
  kind 'stage1' dashed)."""
  chosen = [n for n, e in table.items() if e.get("robustness") and e["fig3a"]]
  if not chosen:
    return
  fig = _figure()(figsize=(5.5, 3.8))
  ax = fig.add_subplot(1, 1, 1)
  for n in sorted(chosen, key=lambda k: table[k]["sigma_bar"] or 0.0):
    curve = table[n]["robustness"]
    label = table[n]["label"].replace("end-to-end / ", "")
    ax.errorbar([p["s"] for p in curve], [p["psnr"] for p in curve],
                yerr=[p["psnr_std"] or 0.0 for p in curve], marker="o", capsize=2, label=label,
                linestyle="--" if table[n].get("kind") == "stage1" else "-")
  ax.set_xlabel("noise scale s (decode mu + s * eps)")
  ax.set_ylabel("PSNR (dB)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
