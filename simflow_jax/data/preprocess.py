"""Per-image preprocessing: ADM-style center crop and resize, flip, scaling to [-1, 1].

One job: turn a stored uint8 image into the model's input. Pure numpy + Pillow.

Shapes: a stored uint8 image (H, W, C) -> center_crop_resize (guided-diffusion's
`center_crop_arr`: BOX halvings, then BICUBIC to the short side, then the centre crop)
-> uint8 (size, size, C) -> optional left-right flip -> to_float: float32 in [-1, 1]
(uint8 0 -> -1, 255 -> 1).
"""
import numpy as np
from PIL import Image


def center_crop_resize(img: np.ndarray, size: int) -> np.ndarray:
  """ADM center crop + resize of a uint8 HWC image (C = 1 or 3) to (size, size, C)."""
  if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(f"center_crop_resize wants a uint8 (H, W, 1|3) image, got {img.dtype} {img.shape}")
  if size <= 0:
    raise ValueError(f"image size must be positive, got {size}")
  if img.shape[:2] == (size, size):
    return img
  channels = img.shape[-1]
  pil = Image.fromarray(img[..., 0] if channels == 1 else img)  # (H, W) 'L' or (H, W, 3) 'RGB'
  while min(*pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  crop_y = (arr.shape[0] - size) // 2
  crop_x = (arr.shape[1] - size) // 2
  arr = arr[crop_y:crop_y + size, crop_x:crop_x + size]
  return arr.reshape(size, size, channels)  # (size, size, C); restores the axis of 'L' images


def random_flip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Flips an HWC image left-right with probability 1/2 (one draw from `rng`)."""
  return img[:, ::-1] if rng.random() < 0.5 else img


def to_float(img: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]: x / 127.5 - 1."""
  if img.dtype != np.uint8:
    raise ValueError(f"to_float wants uint8 pixels, got {img.dtype}")
  return img.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
