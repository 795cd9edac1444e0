"""The variant study end to end at tiny size: table, figures, rerun, bad inputs.

The end-to-end tests share one tiny two-row study (a module fixture: 3 trainings and 4
evaluations, each compiling its programs) run by two worker processes (study.workers=2).
They are part of the default (CI) run.
"""
import hashlib
import json
import os

import ml_collections
import pytest

from configs import base, study_digits, tiny, variants
from simflow_jax.commands import study
from simflow_jax.commands import train
from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.commands.study import pool


def _config(rows=("frozen_vae_fixed", "simflow"), steps=4, workers=1):
  c = tiny.get_config()
  c.study.rows, c.study.seeds, c.study.steps = rows, (0,), steps
  c.study.workers = workers
  c.study.num_eval_examples = 16
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


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("study"))
  table = study.run(_config(workers=2), workdir)  # the two rows in two worker processes
  return workdir, table


def test_two_row_study_writes_a_table_with_every_metric(finished):
  workdir, table = finished
  out = os.path.join(workdir, "study")
  assert list(table) == ["frozen_vae_fixed", "simflow"]
  with open(os.path.join(out, "table.json")) as f:
    saved = json.load(f)
  for name, entry in saved.items():
    for metric, _, _ in job_lib.METRICS:
      assert entry["metrics"][metric]["mean"] is not None, (name, metric)
      assert entry["metrics"][metric]["n"] == 1
    assert [p["s"] for p in entry["robustness"]] == [0.0, 0.5]
    assert entry["paper"] == dict(zip(("rfid", "psnr", "gfid_no_cfg"), variants.ROWS[name].paper))
  md = open(os.path.join(out, "table.md")).read()
  assert "frozen VAE / fixed var" in md and "16.97" in md
  for fig in ("gen_fd.png", "robustness.png", "latent_stats.png", "samples/simflow.png",
              "samples/frozen_vae_fixed.png"):
    assert os.path.getsize(os.path.join(out, fig)) > 0
  # The two-stage row: 2 steps of stage 1 (the VAE alone), 2 of stage 2 on its frozen VAE.
  s1 = json.load(open(os.path.join(workdir, "stage1", "vae_fixed", "seed0", "config.json")))
  s2 = json.load(open(os.path.join(workdir, "rows", "frozen_vae_fixed", "seed0", "config.json")))
  assert (s1["train"]["freeze"], s1["train"]["num_steps"]) == ("flow", 2)
  assert (s2["train"]["freeze"], s2["train"]["num_steps"]) == ("vae", 2)
  assert s2["train"]["vae_checkpoint"] == os.path.join(workdir, "stage1", "vae_fixed", "seed0")
  # One classifier for every row.
  assert os.listdir(os.path.join(out, "classifier"))
  info = json.load(open(os.path.join(out, "run_info.json")))
  assert (info["workers"], info["ran"], info["of"]) == (2, 2, 2)


def test_rerun_skips_finished_rows(finished, monkeypatch):
  workdir, table = finished

  def no_training(*args, **kwargs):
    raise AssertionError("a finished row was trained again")

  monkeypatch.setattr(job_lib.trainer, "train", no_training)
  monkeypatch.setattr(job_lib.declared, "evaluate_checkpoint", no_training)
  again = study.run(_config(), workdir)
  assert again["simflow"]["metrics"] == table["simflow"]["metrics"]


def test_rows_sharing_a_stage1_vae_run_in_one_worker_in_plan_order(tmp_path):
  c = _config(rows=("frozen_vae_learned", "simflow", "frozen_encoder_noise", "frozen_vae_fixed"))
  c.study.seeds = (0, 1)
  jobs = plan_lib.plan(c, str(tmp_path))
  names = [(j["row"].name, j["seed"]) for j in jobs]
  units = [[names[i] for i in unit] for unit in pool.units_of(jobs, list(range(len(jobs))))]
  # frozen_vae_learned and frozen_encoder_noise both stand on seed k's 'vae_learned' VAE.
  assert units == [[("frozen_vae_learned", 0), ("frozen_encoder_noise", 0)], [("simflow", 0)],
                   [("frozen_vae_fixed", 0)],
                   [("frozen_vae_learned", 1), ("frozen_encoder_noise", 1)], [("simflow", 1)],
                   [("frozen_vae_fixed", 1)]]
  # Finished row-seeds are left out; a unit whose first row is done still keeps its others.
  units = pool.units_of(jobs, [2, 3, 5, 6])
  assert [[names[i] for i in u] for u in units] == [
      [("frozen_encoder_noise", 0)], [("frozen_vae_fixed", 0)], [("simflow", 1)],
      [("frozen_encoder_noise", 1)]]


def test_workers_below_one_is_a_clear_error(tmp_path):
  with pytest.raises(study.StudyError, match="study.workers must be >= 1"):
    study.run(_config(workers=0), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_unknown_row_is_a_clear_error(tmp_path):
  with pytest.raises(study.StudyError, match="Unknown study row.*simflow"):
    study.run(_config(rows=("simflow", "no_such_row")), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_workdirs_of_another_config_stop_the_study_untouched(finished):
  workdir, _ = finished
  before = _snapshot(workdir)
  with pytest.raises(study.StudyError, match="different config.*delete"):
    study.run(_config(steps=6), workdir)
  assert _snapshot(workdir) == before


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
  c.study.quick, c.study.quick_steps, c.study.quick_seeds = True, 10, (3,)
  caplog.set_level("INFO")
  settings = plan_lib.settings(c, log=True)
  assert (settings["steps"], settings["seeds"], settings["rows"]) == (10, (3,), tuple(c.study.quick_rows))
  jobs = plan_lib.plan(c, str(tmp_path))
  assert [j["row"].name for j in jobs] == list(c.study.quick_rows)
  gen = jobs[0]["config"].evals.generation
  assert gen.num_samples == c.study.quick_num_samples
  assert gen.num_examples == c.study.quick_num_eval_examples
  assert "study.quick=True: steps 4 -> 10" in caplog.text
