"""The variant study: its protocol (plan), its statistics (report), the relative flow noise,
a tiny study end to end, and bad inputs.

The end-to-end tests share one tiny two-row study (a module fixture: a stage-1 VAE and two
row-seeds, each compiling its programs) run by two worker processes (study.workers=2); they
are part of the default (CI) run. The protocol tests replace the training loop and the
evaluation by fakes (seconds): they count what is trained and read the plan.
"""
import hashlib
import json
import math
import os
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base, study_digits, tiny, variants
from simflow_jax import train_step
from simflow_jax.commands import study
from simflow_jax.commands import train
from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.commands.study import report
from simflow_jax.models import vae as vae_lib

T_975_3DF = 3.182446305284263  # Student t quantile 0.975, 3 degrees of freedom (tables)


def _config(rows=("frozen_vae_fixed", "simflow"), steps=4, workers=1, seeds=(0,)):
  c = tiny.get_config()
  c.study.rows, c.study.seeds, c.study.steps, c.study.stage1_steps = rows, seeds, steps, 3
  c.study.workers = workers
  # The workers' jax on one CPU device (the last XLA flag wins over conftest's 8): the study's
  # jobs do not need a mesh, and one device compiles faster.
  c.study.worker_xla_flags += " --xla_force_host_platform_device_count=1"
  c.study.num_eval_examples = 16
  c.study.pilot_min_class_acc = 0.0  # 4 steps learn no classes; the protocol tests set their own
  with c.unlocked():  # the evaluators of configs/study_digits.py, smaller
    c.evals = ml_collections.ConfigDict({
        name: base.evaluator(e.type, **{k: v for k, v in e.items() if k != "type"})
        for name, e in study_digits.get_config().evals.items()})
    for e in c.evals.values():
      if e.type == "generation":
        e.num_samples = 16
    c.evals.robustness.noise_sweep = (0.0, 0.5)
  c.sample.guidance = 1.0
  return c


def _snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


# ---- the tiny study end to end ---------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  table = study.run(_config(workers=2), workdir)  # the jobs of each phase in two processes
  return workdir, table


def test_two_row_study_writes_a_table_with_every_metric(finished):
  workdir, table = finished
  out = os.path.join(workdir, "study")
  assert list(table["rows"]) == ["vae_fixed", "frozen_vae_fixed", "simflow"]
  with open(os.path.join(out, "table.json")) as f:
    saved = json.load(f)
  rows = saved["rows"]
  for name in ("frozen_vae_fixed", "simflow"):
    for metric, _, _ in job_lib.METRICS:
      if metric in ("rfd_noisy", "psnr_noisy"):  # neither row adds flow noise
        assert rows[name]["metrics"][metric]["mean"] is None
        continue
      assert rows[name]["metrics"][metric]["mean"] is not None, (name, metric)
      assert rows[name]["metrics"][metric]["n"] == 1
    assert [p["s"] for p in rows[name]["robustness"]] == [0.0, 0.5]
    assert rows[name]["paper"] == dict(zip(("rfid", "psnr", "gfid_no_cfg"),
                                           variants.ROWS[name].paper))
    assert rows[name]["flow"] == {"steps": 4, "warmup": 2, "ema_decay": tiny.get_config().optim.ema_decay}
  # The stage-1 VAE's own row: reconstruction and latents, no generation.
  s1 = rows["vae_fixed"]
  assert s1["kind"] == "stage1"
  for metric in ("rfd", "psnr", "latent_std", "latent_spectral_entropy"):
    assert s1["metrics"][metric]["mean"] is not None, metric
  assert s1["metrics"]["gen_fd"]["mean"] is None and s1["metrics"]["noise_std"]["mean"] == 0.0
  floors = saved["floors"]
  assert floors["digit_fd_real"] > 0 and 0 < floors["classifier_val_accuracy"] <= 1
  md = open(os.path.join(out, "table.md")).read()
  assert "stage-1 VAE / fixed var" in md and "16.97" in md and "Floors: digit FD" in md
  for fig in ("gen_fd.png", "robustness.png", "latent_stats.png", "samples/simflow.png",
              "samples/frozen_vae_fixed.png"):
    assert os.path.getsize(os.path.join(out, fig)) > 0
  # The two-stage row's flow: the full 4 steps on the VAE trained alone for stage1_steps.
  c1 = json.load(open(os.path.join(workdir, "stage1", "vae_fixed", "config.json")))
  c2 = json.load(open(os.path.join(workdir, "rows", "frozen_vae_fixed", "seed0", "config.json")))
  assert (c1["train"]["freeze"], c1["train"]["num_steps"]) == ("flow", 3)
  assert (c2["train"]["freeze"], c2["train"]["num_steps"]) == ("vae", 4)
  assert c2["train"]["vae_checkpoint"] == os.path.join(workdir, "stage1", "vae_fixed")
  assert os.listdir(os.path.join(out, "classifier"))
  info = json.load(open(os.path.join(out, "run_info.json")))
  assert (info["workers"], info["ran"], info["of"]) == (2, 3, 3)
  assert info["pilot"] == (f"pilot: simflow seed 0 guided class accuracy "
                           f"{rows['simflow']['metrics']['class_acc']['mean']:.3f} (target >= 0): reached")


def test_rerun_trains_and_evaluates_nothing(finished, monkeypatch):
  workdir, table = finished
  ckpt = os.path.join(workdir, "stage1", "vae_fixed", "checkpoints")
  mtime = os.path.getmtime(ckpt)

  def no_training(*args, **kwargs):
    raise AssertionError("a finished job was trained again")

  monkeypatch.setattr(job_lib.trainer, "train", no_training)
  monkeypatch.setattr(job_lib.declared, "evaluate_checkpoint", no_training)
  again = study.run(_config(), workdir)
  assert again["rows"]["simflow"]["metrics"] == table["rows"]["simflow"]["metrics"]
  assert os.path.getmtime(ckpt) == mtime


def test_workdirs_of_another_config_stop_the_study_untouched(finished):
  workdir, _ = finished
  before = _snapshot(workdir)
  with pytest.raises(study.StudyError, match="different config.*delete"):
    study.run(_config(steps=6), workdir)
  assert _snapshot(workdir) == before


# ---- the protocol, with the training loop and evaluation replaced by fakes -------------------

class Fakes:
  """trainer.train writes what a finished run leaves (config.json, its last checkpoint) and
  counts calls per workdir; evaluate_checkpoint reports metrics from `metrics(row, seed)`."""

  def __init__(self, monkeypatch, metrics=None):
    self.trained = []
    self.metrics = metrics or (lambda row, seed: {})
    monkeypatch.setattr(job_lib.trainer, "train", self.train)
    monkeypatch.setattr(job_lib.declared, "evaluate_checkpoint", self.evaluate)

  def train(self, config, workdir):
    self.trained.append(workdir)
    os.makedirs(os.path.join(workdir, "checkpoints", str(config.train.num_steps)))
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(plan_lib.config_json(config), f)

  def evaluate(self, config, workdir):
    row, seed = workdir.split(os.sep)[-2:]
    m = {"gen_fd": 50.0, "gen_fd_guided": 40.0, "class_acc": 0.95, "rfd": 5.0, "psnr": 20.0,
         **self.metrics(row, int(seed[4:]) if seed.startswith("seed") else 0)}
    return {"generation": {"digit_fd": m["gen_fd_guided"], "digit_class_accuracy": m["class_acc"],
                           "digit_rfd": m["rfd"]},
            "generation_unguided": {"digit_fd": m["gen_fd"], "digit_class_accuracy": 0.5},
            "reconstruction": {"psnr": m["psnr"]},
            "reconstruction_noisy": {"psnr": 18.0, "rfd": 7.0, "mu_std": 1.5, "noise_std": 0.45}}


def test_a_stage1_vae_is_trained_once_for_every_row_and_seed_that_freezes_it(tmp_path, monkeypatch):
  fakes = Fakes(monkeypatch)
  c = _config(rows=("frozen_vae_learned", "frozen_encoder_noise"), seeds=(0, 1))
  study.run(c, str(tmp_path))
  vae = os.path.join(str(tmp_path), "stage1", "vae_learned")
  assert fakes.trained.count(vae) == 1
  rows = sorted(d for d in fakes.trained if d != vae)
  assert rows == sorted(os.path.join(str(tmp_path), "rows", r, f"seed{s}")
                        for r in ("frozen_vae_learned", "frozen_encoder_noise") for s in (0, 1))
  for d in rows:
    assert json.load(open(os.path.join(d, "config.json")))["train"]["vae_checkpoint"] == vae
  fakes.trained.clear()
  study.run(c, str(tmp_path))  # a rerun trains nothing new
  assert fakes.trained == []


def test_every_rows_flow_gets_the_same_steps_warmup_and_ema(tmp_path):
  c = study_digits.get_config()
  jobs = plan_lib.plan(c, str(tmp_path))
  flows = {(j["row"].name, j["seed"]): j["flow"] for j in jobs if j["kind"] == "row"}
  want = {"steps": c.study.steps, "warmup": c.optim.warmup_steps, "ema_decay": c.optim.ema_decay}
  assert set(name for name, _ in flows) == set(variants.ROWS)
  assert all(f == want for f in flows.values()), flows
  for j in jobs:  # the plan's record is the config each job trains with
    if j["kind"] == "row":
      assert (j["config"].train.num_steps, j["config"].optim.warmup_steps,
              j["config"].optim.ema_decay) == (want["steps"], want["warmup"], want["ema_decay"])
  stage1 = [j for j in jobs if j["kind"] == "stage1"]
  assert sorted(j["row"].name for j in stage1) == sorted(variants.STAGE1_ROWS)
  assert all(j["config"].train.num_steps == c.study.stage1_steps for j in stage1)
  assert all(j["config"].train.freeze == "flow" for j in stage1)
  seeds = {name: sum(1 for r, _ in flows if r == name) for name in variants.ROWS}
  assert seeds["simflow"] >= 4 and seeds["end_to_end_noise"] >= 4
  assert all(seeds[n] >= 2 for n in variants.ROWS if n.startswith("frozen"))


def test_a_missed_pilot_stops_the_study_before_the_other_rows(tmp_path, monkeypatch, capsys):
  fakes = Fakes(monkeypatch, lambda row, seed: {"class_acc": 0.5})
  c = _config(rows=("frozen_vae_fixed", "simflow"))
  c.study.pilot_min_class_acc = 0.9
  with pytest.raises(study.StudyError, match="pilot: simflow seed 0 guided class accuracy 0.500 "
                     r"\(target >= 0.9\): missed: the study stopped"):
    study.run(c, str(tmp_path))
  assert "pilot: simflow seed 0 guided class accuracy 0.500 (target >= 0.9): missed" in capsys.readouterr().out
  assert sorted(fakes.trained) == sorted([os.path.join(str(tmp_path), "rows", "simflow", "seed0"),
                                          os.path.join(str(tmp_path), "stage1", "vae_fixed")])
  assert not os.path.exists(os.path.join(str(tmp_path), "study", "table.json"))


def test_the_report_pairs_seeds_and_words_findings_from_the_intervals(tmp_path, monkeypatch):
  gen = {0: -2.0, 1: -3.0, 2: -4.0, 3: -3.0}    # simflow - end_to_end_noise: all below zero
  acc = {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.06}     # mean 0.03, interval across zero

  def metrics(row, seed):
    if row == "simflow":
      return {"gen_fd": 30.0 + gen[seed], "class_acc": 0.9 + acc[seed]}
    return {"gen_fd": 30.0, "class_acc": 0.9}

  Fakes(monkeypatch, metrics)
  table = study.run(_config(rows=("end_to_end_noise", "simflow"), seeds=(0, 1, 2, 3)),
                    str(tmp_path))
  p = table["paired"]["gen_fd"]
  assert p["seeds"] == [0, 1, 2, 3] and p["diff"] == pytest.approx([-2, -3, -4, -3])
  half = T_975_3DF * math.sqrt(2 / 3) / 2  # sd of the differences sqrt(2/3), n = 4
  assert p["mean"] == pytest.approx(-3.0)
  assert p["ci95"] == pytest.approx([-3.0 - half, -3.0 + half])
  assert p["better"] == "simflow"
  q = table["paired"]["class_acc"]
  half = T_975_3DF * math.sqrt(0.0014 / 3) / 2
  assert q["mean"] == pytest.approx(0.03) and q["ci95"] == pytest.approx([0.03 - half, 0.03 + half])
  assert q["better"] == "not resolved"
  assert table["paired"]["psnr"]["better"] == "not resolved"  # equal in every seed: interval [0, 0]
  findings = "\n".join(table["findings"])
  assert f"gen FD w/o guidance: simflow - end_to_end_noise = -3 (95 % interval {-3 - T_975_3DF * math.sqrt(2 / 3) / 2:.3g}" in findings
  assert "simflow better." in findings and "not resolved." in findings
  md = open(os.path.join(str(tmp_path), "study", "table.md")).read()
  assert "Paired differences simflow - end_to_end_noise" in md and "-2, -3, -4, -3" in md
  # The noise row reports its noisy reconstruction and its latent/noise std; simflow has no noise.
  rows = table["rows"]
  assert rows["end_to_end_noise"]["metrics"]["psnr_noisy"]["mean"] == 18.0
  assert rows["end_to_end_noise"]["metrics"]["latent_std"]["mean"] == 1.5
  assert rows["simflow"]["metrics"]["psnr_noisy"]["mean"] is None


def test_t_interval_matches_a_hand_computed_one():
  mean, (lo, hi) = report.t_interval([1.0, 2.0, 3.0, 6.0])
  half = T_975_3DF * math.sqrt(14 / 3) / 2
  assert (mean, lo, hi) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
  with pytest.raises(study.StudyError, match="at least 2"):
    report.t_interval([1.0])


# ---- the relative flow noise --------------------------------------------------------------

class _ScaledVAE:
  """A stand-in VAE whose posterior mean is the images times params['scale'] (fixed std)."""
  sigma_bar = 0.5

  def apply(self, variables, images, method=None):
    del method
    return vae_lib.Posterior(mu=images * variables["params"]["scale"], logvar=None)


def test_relative_noise_follows_the_latent_std():
  models = types.SimpleNamespace(vae=_ScaledVAE())
  images = jax.random.normal(jax.random.key(1), (8, 4, 4, 2))
  rng = jax.random.key(2)
  out = {k: train_step.flow_input(models, {"scale": k}, images, rng, 0.3, relative=True)
         for k in (1.0, 3.0)}
  for k, inp in out.items():
    assert float(inp.noise_std) == pytest.approx(0.3 * float(jnp.std(inp.posterior.mu)), rel=1e-5)
    assert np.asarray(inp.var) == pytest.approx(0.25 + float(inp.noise_std) ** 2, rel=1e-5)
  noise = {k: np.asarray(inp.noisy - inp.latents) for k, inp in out.items()}
  assert float(out[3.0].noise_std) == pytest.approx(3 * float(out[1.0].noise_std), rel=1e-5)
  np.testing.assert_allclose(noise[3.0], 3 * noise[1.0], rtol=1e-4, atol=1e-6)
  absolute = {k: train_step.flow_input(models, {"scale": k}, images, rng, 0.3) for k in (1.0, 3.0)}
  assert float(absolute[1.0].noise_std) == float(absolute[3.0].noise_std) == pytest.approx(0.3)


def test_the_noise_rows_use_relative_noise():
  for name in ("end_to_end_noise", "frozen_encoder_noise"):
    c = tiny.get_config(name)
    assert c.loss.flow_noise_std > 0 and c.loss.flow_noise_relative


# ---- bad input ----------------------------------------------------------------------------

def test_a_stage1_vae_of_another_config_stops_the_study_untouched(tmp_path):
  c = _config(rows=("frozen_vae_fixed",))
  other = plan_lib.plan(c, str(tmp_path))[0]["config"]
  other.vae.sigma_bar = 0.25  # a VAE trained with another fixed std: another fingerprint
  vae_dir = tmp_path / "stage1" / "vae_fixed"
  vae_dir.mkdir(parents=True)
  (vae_dir / "config.json").write_text(json.dumps(plan_lib.config_json(other)))
  before = _snapshot(str(tmp_path))
  with pytest.raises(study.StudyError, match="stage1/vae_fixed holds a run of a different config"):
    study.run(c, str(tmp_path))
  assert _snapshot(str(tmp_path)) == before


def test_a_seed_list_too_short_for_the_paired_statistics_is_a_clear_error(tmp_path):
  with pytest.raises(study.StudyError, match="paired statistics.*at least 2 seeds.*study.seeds"):
    study.run(_config(rows=("simflow", "end_to_end_noise"), seeds=(0,)), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_workers_below_one_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="study.workers must be >= 1"):
    study.run(_config(workers=0), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_unknown_row_is_a_clear_error(tmp_path):
  with pytest.raises(study.StudyError, match="Unknown study row.*simflow"):
    study.run(_config(rows=("simflow", "no_such_row")), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_stage2_with_a_missing_or_mismatched_vae_run_writes_nothing(tmp_path, tiny_trained):
  config = tiny.get_config("frozen_vae_learned")
  config.train.vae_checkpoint = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="vae_checkpoint"):
    train.run(config, str(tmp_path / "run"))
  config.train.vae_checkpoint = tiny_trained  # a fixed-posterior VAE; this row wants 'learned'
  with pytest.raises(ValueError, match="different config.*posterior"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_quick_replaces_the_settings_it_names_and_says_so(tmp_path, caplog):
  c = _config(rows=())
  c.study.quick, c.study.quick_steps, c.study.quick_seeds = True, 10, (3, 4)
  caplog.set_level("INFO")
  settings = plan_lib.settings(c, log=True)
  assert (settings["steps"], settings["seeds"], settings["rows"]) == (10, (3, 4), tuple(c.study.quick_rows))
  assert settings["stage1_steps"] == c.study.quick_stage1_steps
  jobs = plan_lib.plan(c, str(tmp_path))
  assert [j["row"].name for j in jobs if j["kind"] == "row" and j["seed"] == 3] == list(c.study.quick_rows)
  gen = jobs[-1]["config"].evals.generation
  assert gen.num_samples == c.study.quick_num_samples
  assert gen.num_examples == c.study.quick_num_eval_examples
  assert "study.quick=True: steps 4 -> 10" in caplog.text
