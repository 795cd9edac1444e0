"""FID, sFID, Inception Score and precision/recall from Inception features.

One job: the sample-quality numbers (docs/evaluation.md), computed from the features of
`simflow_jax.pretrained.inception` ('pool' (N, 2048), 'spatial' (N, 2023),
'logits_unbiased' (N, 1008)) with the semantics of the ADM evaluator
(guided-diffusion/evaluations/evaluator.py). numpy computes the statistics; jax computes
the blocked k-NN distances of precision/recall (on an accelerator when there is one).

- FID / sFID: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), with tr sqrt(S1 S2)
  taken as sum_i sqrt(lambda_i) over the eigenvalues of S1 @ S2 (>= 0 in exact arithmetic;
  negatives from rounding are clipped to 0). The eigenvalues come from the similar
  symmetric matrix A^T S2 A, S1 = A A^T, so they are real by construction. It equals the
  scipy.linalg.sqrtm form of ADM / pytorch-fid and takes seconds, not minutes, at 2048-d.
  Statistics: mean and unbiased covariance (np.cov) in float64. sFID is the same distance
  on the 'spatial' features.
- Inception Score: softmax of the unbiased logits, `splits` contiguous equal splits (ADM
  splits 50k samples into chunks of 5000, i.e. 10), exp(E_x KL(p(y|x) || p(y))) per split;
  returns the mean and std over splits.
- Precision / recall: ADM's ManifoldEstimator with k = 3. Radii are the squared Euclidean
  distance of each point to its k-th nearest neighbour within its own set (the point
  itself is neighbour 0). Precision = fraction of fake points inside some real ball
  (d^2 <= radius), recall = fraction of real points inside some fake ball. Distances are
  float32 here (ADM tries float16 first, then float32).

Reference statistics (ReferenceStats) come from an ADM reference batch .npz (load_ref_batch),
from real features (reference_from_features), or from a stats file (write_stats / read_stats).
"""
import dataclasses
import functools
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(N, D) features -> mean (D,) and unbiased covariance (D, D), float64."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"stats needs (N >= 2, D) features, got shape {features.shape}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def fid_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                   sigma2: np.ndarray) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (eigenvalue form)."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  dim = mu1.shape[0]
  if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) \
      or sigma2.shape != (dim, dim):
    raise ValueError(f"mismatched statistics: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                     f"mu2 {mu2.shape}, sigma2 {sigma2.shape} (were they taken from the "
                     "same feature layer?)")
  # sigma1 = A A^T with A = V sqrt(W) (eigh); sigma1 sigma2 = A (A^T sigma2) has the
  # eigenvalues of the symmetric PSD A^T sigma2 A, so eigvalsh gives them real, and ~5x
  # faster than the nonsymmetric np.linalg.eigvals(sigma1 @ sigma2).
  w, v = np.linalg.eigh(sigma1)
  a = v * np.sqrt(np.clip(w, 0.0, None))  # (D, D)
  eigenvalues = np.linalg.eigvalsh(a.T @ sigma2 @ a)
  trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()  # rounding can make some < 0
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def inception_score(logits_or_probs: np.ndarray, splits: int = 10, *,
                    from_logits: bool = True) -> tuple[float, float]:
  """Inception Score (mean, std over `splits` contiguous splits) of (N, classes) rows.

  Pass the 'logits_unbiased' features (from_logits=True) or class probabilities
  (from_logits=False; rows must sum to 1, zeros allowed).
  """
  x = np.asarray(logits_or_probs, np.float64)
  if x.ndim != 2 or x.shape[0] < splits or splits < 1:
    raise ValueError(f"inception_score needs (N >= splits, classes) rows and splits >= 1, "
                     f"got shape {x.shape}, splits={splits}")
  if from_logits:
    log_p = x - x.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
  else:
    if (x < 0).any() or not np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
      raise ValueError("probabilities must be >= 0 and sum to 1 per row; "
                       "pass from_logits=True for logits")
    p = x
    with np.errstate(divide="ignore"):
      log_p = np.log(p)
  n = p.shape[0]
  scores = []
  for i in range(splits):
    part_p = p[i * n // splits:(i + 1) * n // splits]
    part_log_p = log_p[i * n // splits:(i + 1) * n // splits]
    # p * (log p - log p(y)), with 0 log 0 = 0 (a class with p(y) = 0 has p = 0 everywhere,
    # where the masked-out -inf - -inf is nan).
    with np.errstate(divide="ignore", invalid="ignore"):
      log_marginal = np.log(part_p.mean(axis=0, keepdims=True))  # (1, classes)
      terms = np.where(part_p > 0, part_p * (part_log_p - log_marginal), 0.0)
    scores.append(np.exp(terms.sum(axis=1).mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(u: jax.Array, v: jax.Array) -> jax.Array:
  """(R, D), (M, D) -> (R, M) squared Euclidean distances, clipped at 0."""
  hp = jax.lax.Precision.HIGHEST
  norm_u = jnp.sum(u * u, axis=1)[:, None]  # (R, 1)
  norm_v = jnp.sum(v * v, axis=1)[None, :]  # (1, M)
  return jnp.maximum(norm_u - 2.0 * jnp.dot(u, v.T, precision=hp) + norm_v, 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _kth_neighbour_sq_distance(rows: jax.Array, features: jax.Array, k: int) -> jax.Array:
  neg_nearest, _ = jax.lax.top_k(-_squared_distances(rows, features), k + 1)  # (R, k + 1)
  return -neg_nearest[:, k]  # index 0 is the point itself


@jax.jit
def _inside_balls(rows, row_radii, cols, col_radii):
  """Which rows lie in some column ball, and which columns lie in some row ball."""
  d = _squared_distances(rows, cols)  # (R, M)
  rows_in = jnp.any(d <= col_radii[None, :], axis=1)  # (R,)
  cols_in = jnp.any(d <= row_radii[:, None], axis=0)  # (M,)
  return rows_in, cols_in


def _row_blocks(count: int, batch_size: int):
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  step = min(batch_size, count)
  for start in range(0, count, step):
    yield start, min(step, count - start), step


def _pad_rows(x: np.ndarray, size: int, value: float = 0.0) -> np.ndarray:
  if x.shape[0] == size:
    return x
  pad = np.full((size - x.shape[0],) + x.shape[1:], value, x.dtype)
  return np.concatenate([x, pad])


def manifold_radii(features: np.ndarray, k: int = 3, batch_size: int = 1000) -> np.ndarray:
  """(N, D) -> (N,) squared distance of each point to its k-th nearest neighbour."""
  features = np.asarray(features, np.float32)
  if features.ndim != 2 or features.shape[0] <= k:
    raise ValueError(f"manifold_radii needs (N > k={k}, D) features, got {features.shape}")
  all_features = jnp.asarray(features)
  radii = np.empty(features.shape[0], np.float32)
  for start, count, step in _row_blocks(features.shape[0], batch_size):
    rows = _pad_rows(features[start:start + count], step)
    radii[start:start + count] = np.asarray(
        _kth_neighbour_sq_distance(rows, all_features, k))[:count]
  return radii


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3,
                     batch_size: int = 1000) -> tuple[float, float]:
  """k-NN manifold precision and recall (ADM's ManifoldEstimator, one neighbourhood k)."""
  real = np.asarray(real_features, np.float32)
  fake = np.asarray(fake_features, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"need (N, D) real and fake features of one D, got {real.shape}, "
                     f"{fake.shape}")
  real_radii = manifold_radii(real, k, batch_size)
  fake_radii = jnp.asarray(manifold_radii(fake, k, batch_size))
  fake_all = jnp.asarray(fake)
  real_in = np.zeros(real.shape[0], bool)  # real point inside the fake manifold: recall
  fake_in = np.zeros(fake.shape[0], bool)  # fake point inside the real manifold: precision
  for start, count, step in _row_blocks(real.shape[0], batch_size):
    rows = _pad_rows(real[start:start + count], step)
    radii = _pad_rows(real_radii[start:start + count], step, value=-1.0)  # pads: no ball
    rows_in, cols_in = _inside_balls(rows, radii, fake_all, fake_radii)
    real_in[start:start + count] = np.asarray(rows_in)[:count]
    fake_in |= np.asarray(cols_in)
  return float(fake_in.mean()), float(real_in.mean())


@dataclasses.dataclass(frozen=True)
class ReferenceStats:
  """Reference statistics: pool (FID), optional spatial (sFID) and pool features (P/R)."""
  mu: np.ndarray  # (2048,)
  sigma: np.ndarray  # (2048, 2048)
  mu_spatial: np.ndarray | None = None  # (2023,)
  sigma_spatial: np.ndarray | None = None  # (2023, 2023)
  pool_features: np.ndarray | None = None  # (N, 2048)


def reference_from_features(features: Mapping[str, np.ndarray],
                            keep_pool_features: bool = True) -> ReferenceStats:
  """Reference statistics of a dataset's Inception features ('pool', optional 'spatial')."""
  mu, sigma = stats(features["pool"])
  mu_s = sigma_s = None
  if "spatial" in features:
    mu_s, sigma_s = stats(features["spatial"])
  pool = np.asarray(features["pool"], np.float32) if keep_pool_features else None
  return ReferenceStats(mu, sigma, mu_s, sigma_s, pool)


def write_stats(path: str, ref: ReferenceStats) -> None:
  """Writes `ref` as an .npz with ADM's keys (mu, sigma, mu_s, sigma_s) + pool_features."""
  arrays = {"mu": ref.mu, "sigma": ref.sigma}
  if ref.mu_spatial is not None:
    arrays.update(mu_s=ref.mu_spatial, sigma_s=ref.sigma_spatial)
  if ref.pool_features is not None:
    arrays["pool_features"] = ref.pool_features
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:  # a file object keeps np.savez from appending '.npz'
    np.savez(f, **arrays)


def _missing_npz(path: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"reference statistics file {path!r} not found. Use an ADM reference batch (e.g. "
      "VIRTUAL_imagenet256_labeled.npz, linked from guided-diffusion's evaluations/README.md) "
      "or write one from a dataset with reference_from_features + write_stats.")


def read_stats(path: str) -> ReferenceStats:
  """Reads an .npz with at least 'mu' and 'sigma' (ADM layout or write_stats output)."""
  if not os.path.isfile(path):
    raise _missing_npz(path)
  with np.load(path) as data:
    if not {"mu", "sigma"} <= set(data.files):
      raise ValueError(f"{path} has no 'mu'/'sigma' (keys: {data.files}); for an images-only "
                       "reference batch use load_ref_batch(path, feature_fn=...)")
    spatial = {"mu_s", "sigma_s"} <= set(data.files)
    return ReferenceStats(
        data["mu"], data["sigma"],
        data["mu_s"] if spatial else None, data["sigma_s"] if spatial else None,
        data["pool_features"] if "pool_features" in data.files else None)


def load_ref_batch(npz_path: str,
                   feature_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None = None,
                   ) -> ReferenceStats:
  """Reads an ADM reference batch: 'arr_0' (N, H, W, 3) uint8 images and/or 'mu', 'sigma',
  'mu_s', 'sigma_s' (and this module's 'pool_features').

  Stored statistics win over statistics of arr_0 (ADM does the same: its ImageNet stats
  cover more images than arr_0). With `feature_fn` (images -> features, e.g.
  `inception.make_feature_fn(params)`), the arr_0 images are featurised to provide the pool
  features for precision/recall and any statistics the file lacks.
  """
  if not os.path.isfile(npz_path):
    raise _missing_npz(npz_path)
  with np.load(npz_path) as data:
    keys = set(data.files)
    features = None
    needs_features = "pool_features" not in keys or not {"mu_s", "sigma_s"} <= keys
    if "arr_0" in keys and feature_fn is not None and needs_features:
      features = feature_fn(data["arr_0"])
    if not {"mu", "sigma"} <= keys:
      if features is None:
        raise ValueError(
            f"{npz_path} has no 'mu'/'sigma' statistics (keys: {sorted(keys)}); pass "
            "feature_fn=inception.make_feature_fn(params) to compute them from 'arr_0'.")
      return reference_from_features(features)
  ref = read_stats(npz_path)
  if features is not None:
    if ref.mu_spatial is None and "spatial" in features:
      mu_s, sigma_s = stats(features["spatial"])
      ref = dataclasses.replace(ref, mu_spatial=mu_s, sigma_spatial=sigma_s)
    if ref.pool_features is None:
      ref = dataclasses.replace(ref, pool_features=np.asarray(features["pool"], np.float32))
  return ref


def evaluate_features(sample_features: Mapping[str, np.ndarray], ref: ReferenceStats,
                      splits: int = 10, k: int = 3) -> dict[str, float]:
  """All metrics the inputs allow: fid; sfid (both have spatial); inception_score and
  inception_score_std (samples have logits_unbiased); precision, recall (ref has pool
  features)."""
  out = {"fid": fid_from_stats(*stats(sample_features["pool"]), ref.mu, ref.sigma)}
  if "spatial" in sample_features and ref.mu_spatial is not None:
    out["sfid"] = fid_from_stats(*stats(sample_features["spatial"]), ref.mu_spatial,
                                 ref.sigma_spatial)
  if "logits_unbiased" in sample_features:
    out["inception_score"], out["inception_score_std"] = inception_score(
        sample_features["logits_unbiased"], splits)
  if ref.pool_features is not None:
    out["precision"], out["recall"] = precision_recall(
        ref.pool_features, sample_features["pool"], k)
  return out
