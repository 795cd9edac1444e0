"""--mode=evaluate and the declared evaluators: the digits report end to end, exactly the
declared evaluators in report.json, Inception-path metrics against known answers (a stand-in
featurizer), the feature network chosen by the config, the skip note, the missing-checkpoint
error, evaluator entries checked at the config boundary, and the training loop running
evaluators every N steps."""
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base, tiny
from simflow_jax import checkpoint
from simflow_jax.commands import evaluate, train
from simflow_jax.data import pipeline
from simflow_jax.evals import evaluators, likelihood, metrics, vae_evals
from simflow_jax.models import build
from simflow_jax.pretrained import inception


@pytest.fixture(scope="module")
def trained(tiny_trained):
  return tiny_trained


def _copy(trained, tmp_path):
  """A copy of the trained run: each test writes its own eval/ folder."""
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  return workdir


def _declare(config, **entries):
  """config.evals = exactly `entries` (NAME=(type, {field: value}))."""
  with config.unlocked():
    config.evals = ml_collections.ConfigDict(
        {name: base.evaluator(kind, **fields) for name, (kind, fields) in entries.items()})
  return config


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


@pytest.mark.slow
def test_digits_report(trained, tmp_path):
  """The default evaluators of configs/base.py on 40 eval examples."""
  config = tiny.get_config()
  with config.unlocked():
    config.eval.classifier_steps = 20
    for entry in config.evals.values():
      entry.num_examples = 40
    config.evals.robustness.noise_sweep = (0.0, 0.5, 2.0)
    config.evals.robustness.num_images = config.evals.interpolation.num_images = 8
  workdir = _copy(trained, tmp_path)
  report = evaluate.run(config, str(workdir))
  with open(workdir / "eval" / "report.json") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(report))
  assert set(saved) == set(base.EVAL_TYPES)  # one evaluator per type, named after it
  with open(workdir / "eval" / "meta.json") as f:
    assert json.load(f)["checkpoint_step"] == 4
  gen = saved["generation"]
  assert gen["mode"] == "digits" and gen["num_samples"] == 16
  assert {"digit_fd", "digit_class_accuracy", "digit_rfd", "digit_rfd_mu"} <= set(gen)
  assert 0.0 <= gen["digit_class_accuracy"] <= 1.0 and gen["digit_fd"] > 0
  assert saved["likelihood"]["num_examples"] == saved["reconstruction"]["num_examples"] == 40
  for key in ("mu", "x"):
    assert {f"{key}_{s}" for s in ("spectral_entropy", "high_freq_ratio", "total_variation",
                                   "lag1_autocorrelation")} <= set(saved["latent_stats"])
  assert {f"{k}_s{s:g}" for s in (0.0, 0.5, 2.0) for k in ("psnr", "lpips")} <= set(saved["robustness"])
  numbers = _numbers(saved)
  assert numbers and all(x is not None and np.isfinite(x) for x in numbers)
  # The report's bits/dim are the likelihood function's numbers on the same examples.
  models = build.build_models(config)
  direct = likelihood.split_bits_per_dim(config, models, checkpoint.load_params(trained, config),
                                         num_examples=40)
  for key in ("bits_per_dim_mu", "bits_per_dim_sampled"):
    assert saved["likelihood"][key] == pytest.approx(direct[key], rel=1e-5)
  # Figures: 16 samples in rows of 10 classes; 4 interpolation rows of 8 frames (32 px tiles).
  assert _png_size(workdir / "eval" / "generation.png") == (10 * 34 + 2, 2 * 34 + 2)
  assert _png_size(workdir / "eval" / "interpolation.png") == (8 * 34 + 2, 4 * 34 + 2)
  for name in ("robustness", "latent_stats"):
    assert min(_png_size(workdir / "eval" / f"{name}.png")) > 100
  assert any(f.endswith(".msgpack") for f in os.listdir(workdir / "eval" / "digit_classifier"))


def test_exactly_the_declared_evaluators_run(trained, tmp_path):
  config = _declare(tiny.get_config(), bpd=("likelihood", {"num_examples": 16}),
                    recon=("reconstruction", {"num_examples": 16}))
  workdir = _copy(trained, tmp_path)
  evaluate.run(config, str(workdir))
  with open(workdir / "eval" / "report.json") as f:
    saved = json.load(f)
  assert set(saved) == {"bpd", "recon"}
  assert saved["bpd"]["num_examples"] == saved["recon"]["num_examples"] == 16
  assert sorted(os.listdir(workdir / "eval")) == ["meta.json", "report.json"]  # no figures


def test_use_ema_false_evaluates_the_raw_parameters(trained, tmp_path):
  config = _declare(tiny.get_config(), bpd=("likelihood", {"num_examples": 8}))
  workdir = str(_copy(trained, tmp_path))
  ema = evaluate.run(config, workdir)["bpd"]["bits_per_dim_mu"]
  with config.unlocked():
    config.sample.use_ema = False
  raw = evaluate.run(config, workdir)["bpd"]["bits_per_dim_mu"]
  models = build.build_models(config)
  direct = likelihood.split_bits_per_dim(
      config, models, checkpoint.load_params(workdir, config, use_ema=False), num_examples=8)
  assert raw == pytest.approx(direct["bits_per_dim_mu"], rel=1e-5) and raw != ema


@pytest.mark.parametrize("entry, message", [
    (ml_collections.ConfigDict({"type": "nope"}), r"config.evals.bad.type='nope' is not one of"),
    (ml_collections.ConfigDict({"type": "likelihood", "num_sampels": 3}),
     r"config.evals.bad.num_sampels: not a field of evaluator type 'likelihood'"),
    (base.evaluator("generation", num_samples=-1), r"config.evals.bad.num_samples must be >= 0"),
])
def test_bad_evaluator_entries_are_clear_errors(entry, message):
  config = tiny.get_config()
  with config.unlocked():
    config.evals.bad = entry
  with pytest.raises(ValueError, match=message):
    build.validate_config(config)


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

  monkeypatch.setattr(evaluators, "make_evaluator", lambda config, workdir, mesh=None: evaluators.InceptionEvaluator(
      config, feature_fn=lambda x: features(x / 127.5 - 1.0)))
  config = tiny.get_config()
  real16 = next(pipeline.make_eval_loader(config.data, "validation", 16, num_examples=16))["image"]
  ref = metrics.reference_from_features(features(real16))
  calls.clear()
  metrics.write_stats(str(tmp_path / "ref.npz"), ref)
  with config.unlocked():
    config.eval.inception_weights = "stand-in (monkeypatched)"
    config.eval.ref_stats = str(tmp_path / "ref.npz")
  _declare(config, gen=("generation", {"num_samples": 16, "num_examples": 24}))
  report = evaluate.run(config, str(_copy(trained, tmp_path)))
  gen = report["gen"]
  assert set(report) == {"gen"} and gen["mode"] == "inception"

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


@pytest.mark.slow
def test_training_runs_the_evaluators_that_are_due(tmp_path):
  """A 4-step tiny run with a likelihood evaluator every 2 steps, another every 4 and a
  reconstruction one never (every_steps 0): their numbers are logged at those steps
  (eval/NAME/metric). (The generation evaluator's digit classifier, trained once and cached,
  is tests/test_digits.py's; the trainer calls every type the same way.)"""
  config = _declare(tiny.get_config(),
                    bpd2=("likelihood", {"every_steps": 2, "num_examples": 8}),
                    bpd4=("likelihood", {"every_steps": 4, "num_examples": 8}),
                    recon=("reconstruction", {}))  # every_steps 0: never in training
  workdir = str(tmp_path / "run")
  train.run(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  every2 = {r["step"]: r for r in rows if "eval/bpd2/bits_per_dim_sampled" in r}
  every4 = {r["step"]: r for r in rows if "eval/bpd4/bits_per_dim_sampled" in r}
  assert sorted(every2) == [2, 4] and sorted(every4) == [4]
  assert not any(k.startswith("eval/recon/") for r in rows for k in r)
  key = "eval/bpd2/bits_per_dim_sampled"
  assert every2[2][key] > 0 and every2[2][key] != every2[4][key]  # the parameters moved


def test_robustness_lpips_setting_decides_whether_lpips_runs():
  """lpips=False: PSNR only (no VGG16 loaded); True: LPIPS on 32 px digits."""
  fn, note = vae_evals.lpips_distance(tiny.get_config(), False)
  assert fn is None and "lpips=False" in note
  fn, note = vae_evals.lpips_distance(tiny.get_config(), True)
  assert fn is not None and note.startswith("LPIPS (VGG16)")
  x = np.zeros((2, 32, 32, 1), np.float32)
  np.testing.assert_allclose(np.asarray(fn(x, x)), 0.0, atol=1e-6)
