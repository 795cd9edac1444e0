"""--mode=evaluate: the digits report end to end, Inception-path metrics against known answers
(a stand-in featurizer), the skip note, and the missing-checkpoint error."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from simflow_jax import checkpoint, evaluate, likelihood
from simflow_jax.data import pipeline
from simflow_jax.evals import metrics
from simflow_jax.models import build
from simflow_jax.pretrained import inception


@pytest.fixture(scope="module")
def trained(tiny_trained):
  return tiny_trained


@pytest.fixture(autouse=True)
def few_robustness_images(monkeypatch):
  monkeypatch.setattr(evaluate, "NUM_ROBUSTNESS_IMAGES", 8)  # LPIPS on CPU is the slow part


def _numbers(tree):
  if isinstance(tree, dict):
    return [x for v in tree.values() for x in _numbers(v)]
  if isinstance(tree, list):
    return [x for v in tree for x in _numbers(v)]
  return [tree] if isinstance(tree, (int, float)) or tree is None else []


def _png_size(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  with Image.open(path) as im:
    return im.size


def test_digits_report(trained):
  config = tiny.get_config()
  with config.unlocked():
    config.eval.num_samples, config.eval.classifier_steps = 16, 20
    config.eval.noise_sweep = (0.0, 0.5, 2.0)
  report = evaluate.evaluate(config, trained, num_eval_examples=40)
  with open(os.path.join(trained, "eval", "report.json")) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(report))
  assert saved["generation_mode"] == "digits" and saved["checkpoint_step"] == 4
  gen = saved["generation"]
  assert {"digit_fd", "digit_class_accuracy", "digit_rfd", "digit_rfd_mu"} <= set(gen)
  assert 0.0 <= gen["digit_class_accuracy"] <= 1.0 and gen["digit_fd"] > 0
  assert saved["samples"]["num_samples"] == 16
  assert saved["likelihood"]["num_examples"] == saved["reconstruction"]["num_examples"] == 40
  for key in ("mu", "x"):
    assert set(saved["latent_stats"][key]) == {"spectral_entropy", "high_freq_ratio",
                                               "total_variation", "lag1_autocorrelation"}
  curve = saved["robustness"]["curve"]
  assert [r["s"] for r in curve] == list(config.eval.noise_sweep)
  assert all({"psnr", "lpips"} <= set(r) for r in curve)
  numbers = _numbers(saved)
  assert numbers and all(x is not None and np.isfinite(x) for x in numbers)
  # The report's bits/dim are --mode=likelihood's numbers on the same examples.
  models = build.build_models(config)
  direct = likelihood.split_bits_per_dim(config, models, checkpoint.load_params(trained, config),
                                         num_examples=40)
  for key in ("bits_per_dim_mu", "bits_per_dim_sampled"):
    assert saved["likelihood"][key] == pytest.approx(direct[key], rel=1e-5)
  # Figures: 16 samples in rows of 10 classes; 4 interpolation rows of 8 frames (32 px tiles).
  assert _png_size(saved["figures"]["samples"]) == (10 * 34 + 2, 2 * 34 + 2)
  assert _png_size(saved["figures"]["interpolation"]) == (8 * 34 + 2, 4 * 34 + 2)
  for name in ("robustness", "latent_stats"):
    assert min(_png_size(saved["figures"][name])) > 100
  assert any(f.endswith(".msgpack") for f in os.listdir(os.path.join(trained, "eval", "digit_classifier")))


def test_inception_metrics_match_known_answers(trained, tmp_path, monkeypatch):
  """The Inception path with a cheap stand-in featurizer (a fixed random projection): every
  number equals the metric recomputed here from the features the run produced."""
  proj = {k: np.random.RandomState(i).randn(32 * 32, dim) / 32.0
          for i, (k, dim) in enumerate((("pool", 24), ("spatial", 12), ("logits_unbiased", 10)))}
  calls = []

  def features(images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)  # (N, 1024)
    out = {k: flat @ w for k, w in proj.items()}
    calls.append(out)
    return out

  monkeypatch.setattr(evaluate, "_inception_featurizer",
                      lambda config: (features, lambda x: features(x / 127.5 - 1.0)))
  monkeypatch.setattr(evaluate, "_lpips_fn", lambda config: (None, "LPIPS not under test"))
  config = tiny.get_config()
  real16 = next(pipeline.make_eval_loader(config.data, "validation", 16, num_examples=16))["image"]
  ref = metrics.reference_from_features(features(real16))
  calls.clear()
  metrics.write_stats(str(tmp_path / "ref.npz"), ref)
  with config.unlocked():
    config.eval.inception_weights = "stand-in (monkeypatched)"
    config.eval.ref_stats = str(tmp_path / "ref.npz")
    config.eval.num_samples, config.eval.noise_sweep = 16, (0.0, 1.0)
  gen = evaluate.evaluate(config, trained, num_eval_examples=24)["generation"]

  def cat(parts, key):
    return np.concatenate([p[key] for p in parts])

  # Call order: 2 sample batches of 8, then per eval batch of 8: real, recon(x), recon(mu).
  assert len(calls) == 2 + 3 * 3
  samples, real, rec, rec_mu = calls[:2], calls[2::3], calls[3::3], calls[4::3]
  s_pool = cat(samples, "pool")
  assert gen["fid"] == pytest.approx(metrics.fid_from_stats(*metrics.stats(s_pool), ref.mu, ref.sigma))
  assert gen["sfid"] == pytest.approx(metrics.fid_from_stats(
      *metrics.stats(cat(samples, "spatial")), ref.mu_spatial, ref.sigma_spatial))
  assert gen["inception_score"] == pytest.approx(
      metrics.inception_score(cat(samples, "logits_unbiased"), 10)[0])
  assert (gen["precision"], gen["recall"]) == pytest.approx(
      metrics.precision_recall(ref.pool_features, s_pool, 3))
  real_stats = metrics.stats(cat(real, "pool"))
  assert gen["rfid"] == pytest.approx(metrics.fid_from_stats(*metrics.stats(cat(rec, "pool")), *real_stats))
  assert gen["rfid_mu"] == pytest.approx(
      metrics.fid_from_stats(*metrics.stats(cat(rec_mu, "pool")), *real_stats))
  assert gen["rfid"] != gen["rfid_mu"]
  assert gen["reference"] == config.eval.ref_stats


def test_skip_note_names_the_weights_file():
  for source, size in (("synthetic", 32), ("mnist5k", 64)):
    config = tiny.get_config()
    with config.unlocked():
      config.data.source, config.data.image_size = source, size
    mode, note = evaluate._generation_mode(config)
    assert mode == "skipped"
    assert inception.WEIGHTS_FILENAME in note and "eval.inception_weights" in note


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    evaluate.run(tiny.get_config(), str(tmp_path / "never_trained"))
