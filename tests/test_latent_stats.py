"""Known-answer tests of the latent-space statistics (simflow_jax/evals/latent_stats.py)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from simflow_jax.evals import latent_stats as ls

H = W = 16


def _grid(h=H, w=W):
  return np.meshgrid(np.arange(h), np.arange(w), indexing="ij")


def _checkerboard(h=H, w=W):
  i, j = _grid(h, w)
  return np.where((i + j) % 2 == 0, 1.0, -1.0)[None, :, :, None]  # (1, h, w, 1)


def _sinusoid(h=H, w=W):
  """One period along each axis: power only in the four bins (+-1, 0), (0, +-1)."""
  i, j = _grid(h, w)
  return (np.sin(2 * np.pi * i / h) + np.cos(2 * np.pi * j / w))[None, :, :, None]


def test_checkerboard_known_answers():
  stats = ls.latent_statistics(_checkerboard())
  assert stats["spectral_entropy"] == pytest.approx(0.0, abs=1e-12)
  assert stats["high_freq_ratio"] == pytest.approx(1.0, abs=1e-12)
  assert stats["total_variation"] == pytest.approx(2.0, abs=1e-12)
  assert stats["lag1_autocorrelation"] == pytest.approx(-1.0, abs=1e-12)


def test_constant_map_documented_degenerate_values():
  const = np.full((3, 8, 8, 2), 0.1)
  stats = ls.latent_statistics(const)
  assert stats["total_variation"] == 0.0
  assert math.isnan(stats["spectral_entropy"])
  assert math.isnan(stats["high_freq_ratio"])
  assert math.isnan(stats["lag1_autocorrelation"])


def test_degenerate_channel_is_skipped_in_channel_mean():
  lat = np.concatenate([_checkerboard(), np.full((1, H, W, 1), 3.0)], axis=-1)  # (1, H, W, 2)
  stats = ls.latent_statistics(lat)
  assert stats["spectral_entropy"] == pytest.approx(0.0, abs=1e-12)
  assert stats["high_freq_ratio"] == pytest.approx(1.0, abs=1e-12)
  assert stats["lag1_autocorrelation"] == pytest.approx(-1.0, abs=1e-12)
  assert stats["total_variation"] == pytest.approx(1.0, abs=1e-12)  # mean of 2 and 0


def test_white_noise():
  noise = np.random.default_rng(0).standard_normal((64, H, W, 4))
  stats = ls.latent_statistics(noise, cutoff=0.5)
  assert abs(stats["lag1_autocorrelation"]) < 0.02
  assert stats["spectral_entropy"] > 0.99
  # Flat spectrum: the ratio is the fraction of non-DC FFT bins with r > 0.5 Nyquist.
  fy = np.fft.fftfreq(H)[:, None] / 0.5
  fx = np.fft.fftfreq(W)[None, :] / 0.5
  expected = np.sum(fy ** 2 + fx ** 2 > 0.25) / (H * W - 1)
  assert expected == pytest.approx(207 / 255)  # 48 non-DC bins lie inside the disk
  assert stats["high_freq_ratio"] == pytest.approx(expected, abs=0.02)
  # E|a - b| / std for independent standard normals is 2 / sqrt(pi).
  assert stats["total_variation"] == pytest.approx(2 / math.sqrt(math.pi), rel=0.02)


def test_low_frequency_sinusoid():
  stats = ls.latent_statistics(_sinusoid())
  assert stats["high_freq_ratio"] == pytest.approx(0.0, abs=1e-12)
  assert stats["spectral_entropy"] == pytest.approx(math.log(4) / math.log(H * W - 1), abs=1e-12)
  assert stats["lag1_autocorrelation"] > 0.95
  assert stats["total_variation"] < 0.3


def test_smooth_ramp():
  i, j = _grid()
  ramp = (i + 2 * j)[None, :, :, None].astype(np.float64)
  assert ls.lag1_autocorrelation(ramp) > 0.9
  # |diff| is 1 vertically and 2 horizontally everywhere.
  assert ls.total_variation(ramp) == pytest.approx(1.5 / ramp.std(), rel=1e-12)


def test_high_freq_ratio_cutoff_extremes_and_monotone():
  noise = np.random.default_rng(1).standard_normal((8, H, W, 2))
  assert ls.high_freq_ratio(noise, cutoff=0.0) == pytest.approx(1.0)
  assert ls.high_freq_ratio(noise, cutoff=1.5) == 0.0  # r <= sqrt(2) everywhere
  ratios = [ls.high_freq_ratio(noise, c) for c in (0.25, 0.5, 0.75, 1.0)]
  assert all(a >= b for a, b in zip(ratios, ratios[1:]))


def test_per_channel_average_and_jax_input():
  lat = np.concatenate([_checkerboard(), _sinusoid()], axis=-1)  # (1, H, W, 2)
  stats = ls.latent_statistics(jnp.asarray(lat, jnp.float32))
  one = ls.latent_statistics(_checkerboard())
  two = ls.latent_statistics(_sinusoid())
  for key in stats:
    assert stats[key] == pytest.approx(0.5 * (one[key] + two[key]), abs=1e-5), key


def test_scale_and_shift_invariance():
  noise = np.random.default_rng(2).standard_normal((4, 8, 8, 3))
  a = ls.latent_statistics(noise)
  b = ls.latent_statistics(5.0 * noise - 3.0)
  for key in a:
    assert a[key] == pytest.approx(b[key], rel=1e-9), key


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="x\\[None\\]"):
    ls.latent_statistics(np.zeros((8, 8, 3)))
  with pytest.raises(ValueError, match="cutoff"):
    ls.high_freq_ratio(np.zeros((1, 8, 8, 1)), cutoff=-1.0)
