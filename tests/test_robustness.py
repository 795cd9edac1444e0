"""Tests of noise robustness and interpolation (evals/robustness.py) and the figure helpers
(evals/figures.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from simflow_jax.evals import figures
from simflow_jax.evals import robustness as rb


def _identity(x):
  return jnp.asarray(x)


def _encode(x):
  """A non-trivial linear 'encoder': 2x2 average pooling then scaling, (N, H/2, W/2, C)."""
  n, h, w, c = x.shape
  return 3.0 * jnp.asarray(x).reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _decode(z):
  return jnp.repeat(jnp.repeat(z / 3.0, 2, axis=1), 2, axis=2)


def test_psnr_known_values():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3))
  assert rb.psnr(x, x) == rb.PSNR_MAX_DB == 100.0
  zero = np.zeros((8, 8, 1))
  # An offset of 0.2 in [-1, 1] is 0.1 in [0, 1]: MSE 0.01, PSNR 20 dB.
  assert rb.psnr(zero, zero + 0.2) == pytest.approx(20.0, abs=1e-9)
  # A batch gives the mean of per-image PSNRs: offsets 0.2 and 0.02 -> 20 and 40 dB.
  batch = np.stack([zero, zero])
  assert rb.psnr(batch, batch + np.array([0.2, 0.02])[:, None, None, None]) == pytest.approx(30.0)
  # Values are clipped to [-1, 1] first.
  assert rb.psnr(np.ones((4, 4, 1)), 1.5 * np.ones((4, 4, 1))) == 100.0
  with pytest.raises(ValueError, match="same shape"):
    rb.psnr(zero, np.zeros((8, 8, 3)))


def test_noise_robustness_identity_autoencoder():
  images = np.zeros((8, 32, 32, 3), np.float32)  # mid-grey: small noise is not clipped
  sweep = (0.0, 0.05, 0.1, 0.2, 0.4)
  res = rb.noise_robustness(_identity, _identity, images, sweep, jax.random.key(0))
  assert [r["s"] for r in res] == list(sweep)
  assert res[0]["psnr"] == 100.0
  psnrs = [r["psnr"] for r in res]
  assert all(a > b for a, b in zip(psnrs, psnrs[1:]))
  # Unclipped Gaussian noise of std s in [-1, 1] is s / 2 in [0, 1]: PSNR = -20 log10(s / 2).
  assert res[2]["psnr"] == pytest.approx(-20 * math.log10(0.05), abs=0.1)
  assert "lpips" not in res[0]


def test_noise_robustness_with_lpips_and_shared_noise():
  images = np.random.default_rng(0).uniform(-0.5, 0.5, (4, 8, 8, 1)).astype(np.float32)

  def fake_lpips(x, y):  # per-image mean absolute difference
    return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))
  sweep = (0.0, 0.3, 0.6)
  res = rb.noise_robustness(_encode, _decode, images, sweep, jax.random.key(1), lpips=fake_lpips)
  # 2x2 pooling is lossy, so s = 0 is the reconstruction error, not perfect.
  recon = np.asarray(_decode(_encode(images)))
  assert res[0]["psnr"] == pytest.approx(rb.psnr(recon, images))
  assert res[0]["lpips"] == pytest.approx(float(np.mean(np.abs(recon - images))), rel=1e-6)
  assert res[0]["lpips"] < res[1]["lpips"] < res[2]["lpips"]
  again = rb.noise_robustness(_encode, _decode, images, sweep, jax.random.key(1), lpips=fake_lpips)
  assert again == res  # deterministic given rng


def test_interpolation_endpoints_and_midpoint():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (8, 8, 1)).astype(np.float32)
  b = rng.uniform(-1, 1, (8, 8, 1)).astype(np.float32)
  frames = rb.interpolate(_encode, _decode, a, b, num=5)
  assert frames.shape == (5, 8, 8, 1)
  # Batched XLA ops may round differently from batch-of-1 calls: compare to 1 ulp-ish.
  np.testing.assert_allclose(frames[0], np.asarray(_decode(_encode(a[None])))[0], atol=1e-6)
  np.testing.assert_allclose(frames[-1], np.asarray(_decode(_encode(b[None])))[0], atol=1e-6)
  # The latents handed to decode start and end exactly at mu_a and mu_b.
  seen = []
  rb.interpolate(_encode, lambda z: seen.append(np.asarray(z)) or _decode(z), a, b, num=5)
  mu = np.asarray(_encode(np.stack([a, b])))
  np.testing.assert_array_equal(seen[0][0], mu[0])
  np.testing.assert_array_equal(seen[0][-1], mu[1])
  mid = _decode(0.5 * (_encode(a[None]) + _encode(b[None])))[0]
  np.testing.assert_allclose(frames[2], np.asarray(mid), atol=1e-6)
  # Also accepts (1, H, W, C) inputs.
  np.testing.assert_array_equal(rb.interpolate(_encode, _decode, a[None], b[None], num=5), frames)
  with pytest.raises(ValueError, match="num >= 2"):
    rb.interpolate(_encode, _decode, a, b, num=1)


def test_save_image_grid_grayscale_size_and_values(tmp_path):
  images = -np.ones((10, 8, 6, 1), np.float32)
  images[0] = 1.0
  images[1] = 0.0
  path = str(tmp_path / "sub" / "grid.png")
  figures.save_image_grid(images, path, nrow=4, padding=2)
  with Image.open(path) as im:
    assert im.mode == "L"
    assert im.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)  # (width, height): 4 columns, 3 rows
    arr = np.asarray(im)
  assert np.all(arr[2:10, 2:8] == 255)  # tile 0 is white
  assert np.all(arr[2:10, 10:16] == 128)  # tile 1 is mid-grey: round(127.5)
  assert np.all(arr[:2] == 0)  # padding is black


def test_save_image_grid_rgb_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 5, 7, 3)).astype(np.float32) / 127.5 - 1.0
  path = str(tmp_path / "rgb.png")
  figures.save_image_grid(images, path, nrow=8, padding=0)
  with Image.open(path) as im:
    assert im.mode == "RGB" and im.size == (3 * 7, 5)
    arr = np.asarray(im)
  expected = np.round((images + 1) * 127.5).astype(np.uint8)  # (3, 5, 7, 3)
  np.testing.assert_array_equal(arr, np.concatenate(list(expected), axis=1))
  with pytest.raises(ValueError, match="C in"):
    figures.save_image_grid(np.zeros((2, 4, 4, 2)), path)


def test_plots_write_pngs(tmp_path):
  res = [{"s": 0.0, "psnr": 40.0, "lpips": 0.01}, {"s": 1.0, "psnr": 20.0, "lpips": 0.2}]
  figures.plot_robustness(res, str(tmp_path / "robust.png"))
  stats = {"spectral_entropy": 0.9, "high_freq_ratio": 0.5, "total_variation": 1.0,
           "lag1_autocorrelation": 0.1}
  figures.plot_latent_stats(stats, str(tmp_path / "stats_one.png"))
  two = {"end_to_end": stats, "frozen_vae": dict(stats, total_variation=float("nan"))}
  figures.plot_latent_stats(two, str(tmp_path / "stats_two.png"))
  for name, size in (("robust.png", (500, 350)), ("stats_one.png", (1280, 320)),
                     ("stats_two.png", (1280, 320))):
    with Image.open(tmp_path / name) as im:
      assert im.format == "PNG" and im.size == size
      assert np.asarray(im.convert("L")).std() > 0  # something was drawn
  with pytest.raises(ValueError, match="same statistics"):
    figures.plot_latent_stats({"a": stats, "b": {"total_variation": 1.0}}, str(tmp_path / "x.png"))
