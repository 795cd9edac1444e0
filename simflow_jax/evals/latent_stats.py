"""Latent-space statistics (SimFlow paper, Fig. 4): how smooth a latent is.

The paper does not give its exact formulas; the ones used here are stated precisely in
each docstring and in docs/evaluation.md. All functions are pure numpy functions of latents shaped
(N, h, w, c) (a jax array is converted with np.asarray), compute the statistic
PER CHANNEL over all N maps of that channel, then average over channels, and
return a python float.

latent_statistics(latents) gives all four (spectral_entropy, high_freq_ratio,
total_variation, lag1_autocorrelation) in one dict.

Degenerate channels: if every map of a channel is spatially constant, the
channel has no non-DC power and the two spectral statistics are undefined (NaN);
if the whole channel is one constant, its std is 0, the autocorrelation is
undefined (NaN) and the total variation is 0 (there is no variation). The
channel average skips NaN channels; if every channel is NaN the result is NaN.
"""
import numpy as np


def _as_latents(latents) -> np.ndarray:
  x = np.asarray(latents, dtype=np.float64)
  if x.ndim != 4:
    raise ValueError(f"latents must be shaped (N, h, w, c), got shape {x.shape}; "
                     "add a leading batch axis for a single latent (x[None]).")
  if x.shape[0] < 1 or x.shape[1] < 2 or x.shape[2] < 2 or x.shape[3] < 1:
    raise ValueError(f"latents need N >= 1, h >= 2, w >= 2 and c >= 1, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("latents contain NaN or inf")
  return x


def _channel_std(x: np.ndarray) -> np.ndarray:
  """(c,) population std over (N, h, w); exactly 0 for a constant channel."""
  constant = x.max(axis=(0, 1, 2)) == x.min(axis=(0, 1, 2))
  return np.where(constant, 0.0, x.std(axis=(0, 1, 2)))


def _channel_mean(per_channel: np.ndarray) -> float:
  """Mean over channels, skipping NaN channels; NaN if all are NaN."""
  finite = per_channel[~np.isnan(per_channel)]
  return float(finite.mean()) if finite.size else float("nan")


def _power_spectra(x: np.ndarray) -> np.ndarray:
  """Per-channel mean power spectrum, (c, h, w), DC bin set to 0.

  Each map x[n, :, :, k] has its own spatial mean subtracted, then
  P_k(u, v) = mean_n |FFT2(x[n, :, :, k] - mean)(u, v)|^2 (unnormalised
  numpy FFT, periodic boundary). Averaging the power over the N maps (rather
  than computing a statistic per map) estimates the channel's spectrum.
  """
  # A channel whose maps are all constant has exactly zero non-DC power; mean
  # subtraction would leave round-off there, so it is zeroed explicitly.
  constant = np.all(x.max(axis=(1, 2)) == x.min(axis=(1, 2)), axis=0)  # (c,)
  x = x - x.mean(axis=(1, 2), keepdims=True)
  spec = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2  # (N, h, w, c)
  spec = spec.mean(axis=0).transpose(2, 0, 1)  # (c, h, w)
  spec[:, 0, 0] = 0.0  # DC excluded (zero after mean subtraction up to round-off)
  spec[constant] = 0.0
  return spec


def radial_frequency(h: int, w: int) -> np.ndarray:
  """(h, w) radial frequency of each FFT bin in units of the Nyquist frequency.

  r(u, v) = sqrt(fy(u)^2 + fx(v)^2) / 0.5 with fy = np.fft.fftfreq(h),
  fx = np.fft.fftfreq(w) in cycles per token; so r is 1 on each axis at Nyquist
  and sqrt(2) at the (Nyquist, Nyquist) corner of an even grid.
  """
  fy = np.fft.fftfreq(h)[:, None]
  fx = np.fft.fftfreq(w)[None, :]
  return np.sqrt(fy ** 2 + fx ** 2) / 0.5


def spectral_entropy(latents) -> float:
  """Normalised Shannon entropy of the 2-D power spectrum, in [0, 1].

  Per channel k: P_k is the mean over maps of |FFT2(map - map mean)|^2 with the
  DC bin excluded (see `_power_spectra`); p = P_k / sum(P_k) over the
  M = h*w - 1 non-DC bins; H_k = -sum p log p (0 log 0 = 0) / log(M). So a
  spectrum with all power in one bin (a +-1 checkerboard) gives 0, and a flat
  spectrum (white noise, in expectation) gives 1. NaN for a channel with zero
  non-DC power. Result: mean of H_k over channels.
  """
  x = _as_latents(latents)
  _, h, w, c = x.shape
  spec = _power_spectra(x).reshape(c, h * w)[:, 1:]  # (c, M): drop the DC bin
  total = spec.sum(axis=1, keepdims=True)  # (c, 1)
  with np.errstate(invalid="ignore", divide="ignore"):
    p = spec / total
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  ent = -plogp.sum(axis=1) / np.log(h * w - 1)
  ent = np.where(total[:, 0] > 0, ent, np.nan)
  return _channel_mean(ent)


def high_freq_ratio(latents, cutoff: float = 0.5) -> float:
  """Fraction of non-DC power at radial frequency strictly above cutoff * Nyquist.

  Per channel k with P_k from `_power_spectra` and r from `radial_frequency`:
  R_k = sum_{r > cutoff} P_k / sum_{r > 0} P_k. For a flat (white) spectrum this
  is the fraction of non-DC FFT bins with r > cutoff. NaN for a channel with zero
  non-DC power. Result: mean of R_k over channels.
  """
  if not cutoff >= 0:
    raise ValueError(f"cutoff is in units of Nyquist and must be >= 0, got {cutoff}")
  x = _as_latents(latents)
  _, h, w, _ = x.shape
  spec = _power_spectra(x)  # (c, h, w)
  total = spec.sum(axis=(1, 2))
  high = spec[:, radial_frequency(h, w) > cutoff].sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.where(total > 0, high / total, np.nan)
  return _channel_mean(ratio)


def total_variation(latents) -> float:
  """Mean absolute neighbour difference divided by the channel std.

  Per channel k with std s_k = population std of x[..., k] over all (N, h, w):
  TV_k = (mean |x[:, i, j+1] - x[:, i, j]| + mean |x[:, i+1, j] - x[:, i, j]|) / 2 / s_k,
  each mean over all valid (non-wrapping) neighbour pairs. TV_k = 0 when s_k = 0.
  A +-1 checkerboard gives 2. Result: mean of TV_k over channels.
  """
  x = _as_latents(latents)
  dh = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1, 2))  # (c,) horizontal neighbours
  dv = np.abs(np.diff(x, axis=1)).mean(axis=(0, 1, 2))  # (c,) vertical neighbours
  std = _channel_std(x)
  with np.errstate(invalid="ignore", divide="ignore"):
    tv = np.where(std > 0, 0.5 * (dh + dv) / std, 0.0)
  return _channel_mean(tv)


def lag1_autocorrelation(latents) -> float:
  """Lag-1 spatial autocorrelation of the standardised latent, in [-1, 1].

  Per channel k: z = (x[..., k] - m_k) / s_k with m_k, s_k the mean and
  population std over all (N, h, w); A_k = (mean z[:, i, j] z[:, i, j+1] +
  mean z[:, i, j] z[:, i+1, j]) / 2, each mean over all valid (non-wrapping)
  neighbour pairs. A +-1 checkerboard gives -1, white noise ~0, a smooth map
  close to 1. NaN when s_k = 0. Result: mean of A_k over channels.
  """
  x = _as_latents(latents)
  mean = x.mean(axis=(0, 1, 2))
  std = _channel_std(x)
  with np.errstate(invalid="ignore", divide="ignore"):
    z = (x - mean) / np.where(std > 0, std, 1.0)
  ah = (z[:, :, 1:] * z[:, :, :-1]).mean(axis=(0, 1, 2))  # (c,)
  av = (z[:, 1:] * z[:, :-1]).mean(axis=(0, 1, 2))  # (c,)
  ac = np.where(std > 0, 0.5 * (ah + av), np.nan)
  return _channel_mean(ac)


def latent_statistics(latents, cutoff: float = 0.5) -> dict[str, float]:
  """All four statistics of `latents` (N, h, w, c), keyed by function name."""
  return {
      "spectral_entropy": spectral_entropy(latents),
      "high_freq_ratio": high_freq_ratio(latents, cutoff),
      "total_variation": total_variation(latents),
      "lag1_autocorrelation": lag1_autocorrelation(latents),
  }
