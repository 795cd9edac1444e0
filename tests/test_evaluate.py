"""--mode=evaluate: the digits report end to end, Inception-path metrics against known answers
(a stand-in featurizer), the evaluator chosen by the config, the skip note, the
missing-checkpoint error, and the training loop's periodic evaluation (train.eval_every)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import tiny
from simflow_jax import checkpoint, evaluate, likelihood, sharding, train
from simflow_jax.data import pipeline
from simflow_jax.evals import evaluators, metrics
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

  monkeypatch.setattr(evaluators, "make_evaluator", lambda config, workdir: evaluators.InceptionEvaluator(
      config, feature_fn=lambda x: features(x / 127.5 - 1.0)))
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
  report = evaluate.evaluate(config, trained, num_eval_examples=24)
  assert report["generation_mode"] == "inception"
  gen = report["generation"]

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


def _config(**fields):
  config = tiny.get_config()
  with config.unlocked():
    for path, value in fields.items():
      group, name = path.split(".")
      config[group][name] = value
  return config


def test_evaluator_chosen_by_the_config(tmp_path):
  workdir = str(tmp_path / "run")
  inception_ev = evaluators.make_evaluator(_config(**{"eval.inception_weights": "w.msgpack"}), workdir)
  assert isinstance(inception_ev, evaluators.InceptionEvaluator) and inception_ev.name == "inception"
  digit_ev = evaluators.make_evaluator(_config(), workdir)  # tiny: the embedded digits, 32x32x1
  assert isinstance(digit_ev, evaluators.DigitEvaluator) and digit_ev.name == "digits"
  assert digit_ev.cache_dir == os.path.join(workdir, "eval", "digit_classifier")
  assert digit_ev.steps == 20 and digit_ev._clf is None  # nothing trained or loaded yet
  chosen = str(tmp_path / "shared_classifier")
  assert evaluators.make_evaluator(_config(**{"eval.classifier_dir": chosen}), workdir).cache_dir == chosen
  remote = evaluators.make_evaluator(_config(), "gs://bucket/run").cache_dir
  assert "://" not in remote and remote.endswith("digit_classifier")
  with pytest.raises(ValueError, match="classifier_dir.*local folder"):
    evaluators.make_evaluator(_config(**{"eval.classifier_dir": "gs://bucket/clf"}), workdir)


def test_skip_note_names_the_weights_file():
  for source, size in (("synthetic", 32), ("mnist5k", 64)):
    evaluator = evaluators.make_evaluator(
        _config(**{"data.source": source, "data.image_size": size}), "/tmp/unused")
    assert evaluator.name == "skipped" and evaluator.features(np.zeros((2, size, size, 1))) == {}
    note = evaluator.note
    assert inception.WEIGHTS_FILENAME in note and "eval.inception_weights" in note
    assert evaluator.metrics({}, np.zeros(2), {}) == {"skipped": note}


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    evaluate.run(tiny.get_config(), str(tmp_path / "never_trained"))


def test_periodic_bits_per_dim_are_the_likelihood_numbers(trained):
  """Without the digit evaluator the periodic evaluation is --mode=likelihood's bits/dim on
  the first eval batches."""
  config = _config(**{"eval.inception_weights": "not loaded: the bits/dim path"})
  models = build.build_models(config)
  params = checkpoint.load_params(trained, config)
  mesh = sharding.make_mesh(config.mesh)
  out = evaluate.make_periodic_eval(config, models, mesh, trained)(params, 4)
  num = evaluate.PERIODIC_BPD_BATCHES * config.data.batch_size
  direct = likelihood.split_bits_per_dim(config, models, params, mesh=mesh, num_examples=num)
  assert set(out) == {"eval/bits_per_dim_mu", "eval/bits_per_dim_sampled"}
  for key in ("bits_per_dim_mu", "bits_per_dim_sampled"):
    assert np.isfinite(out["eval/" + key]) and out["eval/" + key] == pytest.approx(direct[key], rel=1e-6)


@pytest.mark.slow  # a 4-step tiny training run of its own (tens of seconds on 2 cores)
def test_eval_every_logs_digit_metrics(tmp_path, monkeypatch):
  """train.eval_every=2 in a 4-step tiny run: the digit metrics of guided samples are logged at
  steps 2 and 4, the classifier is trained once and cached in WORKDIR/eval/digit_classifier."""
  monkeypatch.setattr(evaluate, "PERIODIC_NUM_REAL", 64)
  trainings = []
  real_train = evaluators.digits.train_digit_classifier
  monkeypatch.setattr(evaluators.digits, "train_digit_classifier",
                      lambda **kw: trainings.append(kw) or real_train(**kw))
  config = _config(**{"train.eval_every": 2, "sample.guidance": 1.0})
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  evals = {r["step"]: r for r in rows if "eval/digit_fd" in r}
  assert sorted(evals) == [2, 4]
  for row in evals.values():
    assert set(row) == {"step", "eval/digit_fd", "eval/digit_class_accuracy"}
    assert row["eval/digit_fd"] > 0 and 0.0 <= row["eval/digit_class_accuracy"] <= 1.0
  assert evals[2]["eval/digit_fd"] != evals[4]["eval/digit_fd"]  # the parameters moved
  assert len(trainings) == 1
  assert any(f.endswith(".msgpack") for f in os.listdir(os.path.join(workdir, "eval", "digit_classifier")))


def test_robustness_lpips_setting_decides_whether_lpips_runs():
  """eval.robustness_lpips=False: PSNR only (no VGG16 loaded); True: LPIPS on 32 px digits."""
  fn, note = evaluate._lpips_fn(_config(**{"eval.robustness_lpips": False}))
  assert fn is None and "eval.robustness_lpips=False" in note
  fn, note = evaluate._lpips_fn(_config())
  assert fn is not None and note.startswith("LPIPS (VGG16)")
  x = np.zeros((2, 32, 32, 1), np.float32)
  np.testing.assert_allclose(np.asarray(fn(x, x)), 0.0, atol=1e-6)
