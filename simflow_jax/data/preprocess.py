"""Per-image preprocessing: ADM-style center crop and resize, flip, scaling to [-1, 1].

One job: turn a stored uint8 image into the model's input. Pure numpy + Pillow.

Decoding a file of any bit depth or mode to 8-bit 'L' or 'RGB' (decode_8bit): 16-bit
greyscale (modes I;16, I;16B, I;16L, and I, which is how a 16-bit PNG may open) is scaled to
8 bits by the top byte (value >> 8, i.e. 65535 -> 255, never clipped); 1-bit and palette
images are expanded; an alpha channel (LA, RGBA, PA, a palette or greyscale with a
transparent colour) is composited on WHITE; CMYK and YCbCr are converted by Pillow. Float
images (mode F), I values outside 0..65535 and modes Pillow cannot convert are refused
with an UnsupportedImageError naming the file and its mode.

Shapes: a stored uint8 image (H, W, C) -> center_crop_resize (guided-diffusion's
`center_crop_arr`: BOX halvings, then BICUBIC to the short side, then the centre crop)
-> uint8 (size, size, C) -> optional left-right flip -> to_float: float32 in [-1, 1]
(uint8 0 -> -1, 255 -> 1).
"""
import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


class UnsupportedImageError(ValueError):
  """An image whose bit depth or mode is not handled; the message names the file and mode."""


def decode_8bit(img: Image.Image, mode: str, path: str = "image") -> Image.Image:
  """`img` (any Pillow mode) as an 8-bit image of `mode` ('L' or 'RGB'); see the module doc."""
  source = img.mode
  if source in _SIXTEEN_BIT:
    values = np.asarray(img)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise UnsupportedImageError(
          f"{path}: mode {source} holds values in [{values.min()}, {values.max()}], outside the "
          "16-bit range 0..65535; save it as an 8- or 16-bit PNG or JPEG.")
    img = Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8), "L")
  elif source == "F":
    raise UnsupportedImageError(f"{path}: mode F (32-bit float) images are not supported; save it "
                                "as an 8- or 16-bit PNG or JPEG.")
  try:
    if source in _ALPHA or "transparency" in img.info and source in ("P", "L", "RGB"):
      rgba = img.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      img = Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert(mode)
  except ValueError as e:  # a mode Pillow cannot convert from (LAB, HSV, ...)
    raise UnsupportedImageError(f"{path}: images of mode {source} cannot be converted to {mode} "
                                f"({e}); save it as an RGB or greyscale PNG or JPEG.") from e


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
