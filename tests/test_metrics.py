"""Tests of FID / sFID / IS / precision-recall against references and known answers."""
import numpy as np
import pytest
import scipy.linalg

from simflow_jax.evals import metrics


def _gaussian_samples(rng, n, dim, shift):
  factor = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=(n, dim)) @ factor + shift


def _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2):
  """The ADM / pytorch-fid formula with scipy.linalg.sqrtm."""
  covmean = np.real(scipy.linalg.sqrtm(sigma1 @ sigma2))
  diff = mu1 - mu2
  return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def test_stats_are_mean_and_unbiased_covariance():
  x = np.random.default_rng(0).normal(size=(40, 5))
  mu, sigma = metrics.stats(x.astype(np.float32))
  np.testing.assert_allclose(mu, x.mean(0), atol=1e-6)
  np.testing.assert_allclose(sigma, (x - x.mean(0)).T @ (x - x.mean(0)) / 39, atol=1e-6)
  with pytest.raises(ValueError, match="N >= 2"):
    metrics.stats(np.zeros((1, 5)))


@pytest.mark.parametrize("n", [500, 40])  # 40 < dim: singular covariance
def test_fid_of_a_set_with_itself_is_zero(n):
  features = _gaussian_samples(np.random.default_rng(1), n, 64, 0.5)
  mu, sigma = metrics.stats(features)
  assert abs(metrics.fid_from_stats(mu, sigma, mu, sigma)) < 1e-5 * np.trace(sigma)


def test_fid_matches_scipy_sqrtm_on_random_gaussians():
  rng = np.random.default_rng(2)
  mu1, sigma1 = metrics.stats(_gaussian_samples(rng, 800, 64, 0.0))
  mu2, sigma2 = metrics.stats(_gaussian_samples(rng, 800, 64, 0.3))
  fid = metrics.fid_from_stats(mu1, sigma1, mu2, sigma2)
  reference = _fid_sqrtm_reference(mu1, sigma1, mu2, sigma2)
  assert fid > 1.0
  np.testing.assert_allclose(fid, reference, rtol=1e-8)


def test_fid_known_answer_for_diagonal_gaussians():
  rng = np.random.default_rng(3)
  mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
  var1, var2 = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  fid = metrics.fid_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(fid, expected, rtol=1e-10)
  with pytest.raises(ValueError, match="mismatched"):
    metrics.fid_from_stats(mu1, np.diag(var1), mu2[:8], np.diag(var2[:8]))


def test_inception_score_of_identical_uniform_predictions_is_one():
  assert metrics.inception_score(np.zeros((100, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
  uniform = np.full((100, 1008), 1.0 / 1008)
  assert metrics.inception_score(uniform, from_logits=False) == pytest.approx((1.0, 0.0),
                                                                              abs=1e-9)


def test_inception_score_of_distinct_one_hot_classes_is_the_class_count():
  classes, splits = 8, 10
  one_hot = np.eye(classes)[np.tile(np.arange(classes), splits)]  # each split: every class once
  mean, std = metrics.inception_score(one_hot, splits, from_logits=False)
  assert mean == pytest.approx(classes, abs=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  mean, _ = metrics.inception_score(1000.0 * one_hot, splits)  # near-one-hot softmax
  assert mean == pytest.approx(classes, abs=1e-6)


def test_inception_score_matches_adm_formula():
  rng = np.random.default_rng(4)
  logits = 3.0 * rng.normal(size=(60, 20))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  adm_scores = []
  for i in range(0, 60, 12):  # ADM: contiguous splits of split_size (12 here -> 5 splits)
    part = probs[i:i + 12]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    adm_scores.append(np.exp(np.mean(np.sum(kl, 1))))
  expected = (np.mean(adm_scores), np.std(adm_scores))
  np.testing.assert_allclose(metrics.inception_score(logits, splits=5), expected, rtol=1e-10)
  np.testing.assert_allclose(metrics.inception_score(probs, splits=5, from_logits=False),
                             expected, rtol=1e-10)
  with pytest.raises(ValueError, match="sum to 1"):
    metrics.inception_score(logits, splits=5, from_logits=False)


def _brute_force_precision_recall(real, fake, k):
  real, fake = real.astype(np.float64), fake.astype(np.float64)
  sq = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  real_radii = np.sort(sq(real, real), axis=1)[:, k]
  fake_radii = np.sort(sq(fake, fake), axis=1)[:, k]
  d = sq(real, fake)  # (Nr, Nf)
  precision = np.mean(np.any(d <= real_radii[:, None], axis=0))
  recall = np.mean(np.any(d <= fake_radii[None, :], axis=1))
  return precision, recall, real_radii


def test_precision_recall_of_identical_sets_is_one_and_of_far_sets_is_zero():
  real = np.random.default_rng(5).normal(size=(120, 16)).astype(np.float32)
  assert metrics.precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
  assert metrics.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_matches_brute_force_with_uneven_batches():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(150, 8)).astype(np.float32)
  fake = (1.3 * rng.normal(size=(131, 8)) + 0.6).astype(np.float32)
  precision, recall, real_radii = _brute_force_precision_recall(real, fake, k=3)
  assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # a non-trivial case
  np.testing.assert_allclose(metrics.manifold_radii(real, k=3, batch_size=32), real_radii,
                             rtol=1e-4)
  got_precision, got_recall = metrics.precision_recall(real, fake, k=3, batch_size=32)
  # float32 vs float64 distances may flip a point lying on a ball's boundary: allow one.
  assert abs(got_precision - precision) <= 1 / 131 + 1e-12
  assert abs(got_recall - recall) <= 1 / 150 + 1e-12


def _fake_feature_fn(images):
  """A deterministic stand-in for the Inception feature function."""
  flat = images.reshape(images.shape[0], -1).astype(np.float32)
  return {"pool": flat[:, :6] + flat[:, 6:12] ** 0.5, "spatial": flat[:, 12:17]}


def test_write_and_read_stats_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  ref = metrics.reference_from_features(
      {"pool": rng.normal(size=(30, 6)), "spatial": rng.normal(size=(30, 4))})
  for name in ("ref.npz", "ref_stats"):  # no '.npz' appended to a bare name
    metrics.write_stats(str(tmp_path / name), ref)
    back = metrics.read_stats(str(tmp_path / name))
    for field in ("mu", "sigma", "mu_spatial", "sigma_spatial", "pool_features"):
      np.testing.assert_array_equal(getattr(back, field), getattr(ref, field), err_msg=field)


def test_load_ref_batch_reads_adm_layouts(tmp_path):
  rng = np.random.default_rng(8)
  images = rng.integers(0, 256, size=(12, 4, 4, 3), dtype=np.uint8)
  mu, sigma = rng.normal(size=6), np.eye(6)
  mu_s, sigma_s = rng.normal(size=5), 2 * np.eye(5)

  # ADM reference batch: images and precomputed statistics.
  np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  ref = metrics.load_ref_batch(str(tmp_path / "adm.npz"))
  np.testing.assert_array_equal(ref.mu, mu)
  np.testing.assert_array_equal(ref.sigma_spatial, sigma_s)
  assert ref.pool_features is None
  ref = metrics.load_ref_batch(str(tmp_path / "adm.npz"), feature_fn=_fake_feature_fn)
  np.testing.assert_array_equal(ref.mu, mu)  # stored statistics win
  np.testing.assert_allclose(ref.pool_features, _fake_feature_fn(images)["pool"])

  # Images only: statistics come from the features of arr_0.
  np.savez(tmp_path / "images.npz", arr_0=images)
  with pytest.raises(ValueError, match="feature_fn"):
    metrics.load_ref_batch(str(tmp_path / "images.npz"))
  ref = metrics.load_ref_batch(str(tmp_path / "images.npz"), feature_fn=_fake_feature_fn)
  expected = metrics.reference_from_features(_fake_feature_fn(images))
  np.testing.assert_allclose(ref.mu, expected.mu)
  np.testing.assert_allclose(ref.sigma_spatial, expected.sigma_spatial)

  with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
    metrics.load_ref_batch(str(tmp_path / "missing.npz"))


def test_evaluate_features_of_the_reference_itself():
  rng = np.random.default_rng(9)
  features = {"pool": rng.normal(size=(200, 12)), "spatial": rng.normal(size=(200, 7)),
              "logits_unbiased": np.zeros((200, 30))}
  ref = metrics.reference_from_features(features)
  out = metrics.evaluate_features(features, ref, splits=10, k=3)
  assert set(out) == {"fid", "sfid", "inception_score", "inception_score_std", "precision",
                      "recall"}
  assert abs(out["fid"]) < 1e-8 and abs(out["sfid"]) < 1e-8
  assert out["inception_score"] == pytest.approx(1.0)
  assert out["precision"] == 1.0 and out["recall"] == 1.0
