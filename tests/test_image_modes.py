"""Every image bit depth and mode an ImageFolder can hold decodes to the right 8-bit values
(simflow_jax/data/preprocess.py decode_8bit) or is refused naming the file and its mode:
16-bit greyscale scaled by >> 8 (not clipped), 1-bit, palette with and without transparency,
LA / RGBA composited on white, CMYK; float (F) and unconvertible modes refused."""
import numpy as np
import pytest
from PIL import Image

from simflow_jax.data import preprocess, sources

RAMP16 = (np.arange(64 * 8, dtype=np.uint32).reshape(8, 64) * 128).astype(np.uint16)  # 0..65408


def _folder(tmp_path, name, image, ext="png", **save_kwargs):
  """A one-image ImageFolder (train/a/name.ext); returns its root and the file's path."""
  folder = tmp_path / name / "train" / "a"
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f"{name}.{ext}"
  image.save(path, **save_kwargs)
  return str(tmp_path / name), str(path)


def _decode(tmp_path, name, image, channels=1, **kwargs):
  root, path = _folder(tmp_path, name, image, **kwargs)
  src = sources.ImageFolderSource(root, "train", channels)
  return src[0]["image"], path


@pytest.mark.parametrize("channels", [1, 3])
def test_16bit_png_is_scaled_not_clipped(tmp_path, channels):
  image = Image.fromarray(RAMP16)  # mode I;16
  assert image.mode == "I;16"
  got, _ = _decode(tmp_path, "ramp16", image, channels)
  expect = (RAMP16 >> 8).astype(np.uint8)
  assert got.shape == (8, 64, channels) and got.dtype == np.uint8
  for c in range(channels):
    np.testing.assert_array_equal(got[..., c], expect)
  assert got.min() == 0 and got.max() == 255 and got.mean() > 100  # clipping gave ~all 255


def test_16bit_big_endian(tmp_path):
  image = Image.frombytes("I;16B", (64, 8), RAMP16.astype(">u2").tobytes())
  got = np.asarray(preprocess.decode_8bit(image, "L", "big.png"))
  np.testing.assert_array_equal(got, (RAMP16 >> 8).astype(np.uint8))


def test_32bit_integer_mode_I(tmp_path):
  image = Image.fromarray(RAMP16.astype(np.int32))  # mode I, as older Pillow opens 16-bit PNGs
  assert image.mode == "I"
  np.testing.assert_array_equal(np.asarray(preprocess.decode_8bit(image, "L")),
                                (RAMP16 >> 8).astype(np.uint8))
  too_big = Image.fromarray(np.full((2, 2), 70000, np.int32))
  with pytest.raises(preprocess.UnsupportedImageError, match=r"big\.png: mode I .*0\.\.65535"):
    preprocess.decode_8bit(too_big, "L", "big.png")


def test_1bit(tmp_path):
  bits = np.zeros((8, 8), bool)
  bits[:, 4:] = True
  got, _ = _decode(tmp_path, "bits", Image.fromarray(bits))
  np.testing.assert_array_equal(got[..., 0], np.where(bits, 255, 0).astype(np.uint8))


def test_palette_without_and_with_transparency(tmp_path):
  index = np.array([[0, 1], [2, 0]], np.uint8)
  palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
  image = Image.fromarray(index, "P")
  image.putpalette(palette)
  got, _ = _decode(tmp_path, "pal", image, channels=3)
  np.testing.assert_array_equal(got, [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 0, 0]]])
  # Index 0 transparent: composited on white.
  got, _ = _decode(tmp_path, "pal_t", image, channels=3, transparency=0)
  np.testing.assert_array_equal(got, [[[255, 255, 255], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]])


def test_alpha_is_composited_on_white(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[..., 0] = 200                       # red 200 ...
  rgba[..., 3] = [[255, 0], [128, 255]]    # opaque, transparent, half
  got, _ = _decode(tmp_path, "rgba", Image.fromarray(rgba, "RGBA"), channels=3)
  expect_half = [round((200 * 128 + 255 * 127) / 255), round(255 * 127 / 255), round(255 * 127 / 255)]
  np.testing.assert_array_equal(got[0, 0], [200, 0, 0])
  np.testing.assert_array_equal(got[0, 1], [255, 255, 255])
  np.testing.assert_allclose(got[1, 0], expect_half, atol=1)
  la = np.stack([np.full((2, 2), 40, np.uint8), np.array([[255, 0], [0, 255]], np.uint8)], -1)
  got, _ = _decode(tmp_path, "la", Image.fromarray(la, "LA"), channels=1)
  np.testing.assert_array_equal(got[..., 0], [[40, 255], [255, 40]])


def test_cmyk_jpeg(tmp_path):
  cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no black, full magenta + yellow: red
  got, _ = _decode(tmp_path, "cmyk", cmyk, channels=3, ext="jpg", quality=100)
  assert got.shape == (8, 8, 3)
  assert got[..., 0].min() > 230 and got[..., 1:].max() < 25


def test_float_and_unconvertible_modes_are_refused_by_name():
  with pytest.raises(preprocess.UnsupportedImageError, match=r"x/f\.tif: mode F"):
    preprocess.decode_8bit(Image.new("F", (2, 2), 0.5), "L", "x/f.tif")
  with pytest.raises(preprocess.UnsupportedImageError, match=r"x/lab\.png: images of mode LAB"):
    preprocess.decode_8bit(Image.new("LAB", (2, 2)), "L", "x/lab.png")


def test_refused_image_in_a_folder_names_file_and_mode(tmp_path, monkeypatch):
  root, path = _folder(tmp_path, "ramp16", Image.fromarray(RAMP16))
  src = sources.ImageFolderSource(root, "train", 1)
  # A 16-bit file whose values Pillow reports outside 0..65535 stands for any refused mode.
  real = Image.open
  monkeypatch.setattr(sources.Image, "open", lambda p: real(p) if p != path else
                      _Opened(Image.fromarray(np.full((2, 2), -5, np.int32))))
  with pytest.raises(sources.UnreadableImageError) as info:
    src[0]
  assert path in str(info.value) and "mode I" in str(info.value) and "skip_unreadable" in str(info.value)


class _Opened:
  def __init__(self, image):
    self.image = image

  def __enter__(self):
    return self.image

  def __exit__(self, *exc):
    return False
