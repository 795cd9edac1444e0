"""A real SIGINT stops --mode=sample and --mode=evaluate (main.py in a subprocess, the tiny
config on a copy of the trained workdir): exit 130, one line saying what was kept and how to
resume, and the rerun completes the same outputs as an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import tiny
from simflow_jax.commands import evaluate as evaluate_cmd
from simflow_jax.commands import sample as sample_cmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS, BATCH = 40, 8

# Two short evaluators (latent_stats first, likelihood second), for a quick evaluate.
TWO_EVALS = '''
from configs import base, tiny


def get_config(arg=""):
  c = tiny.get_config(arg)
  with c.unlocked():
    c.evals = base.ml_collections.ConfigDict({
        "latent_stats": base.evaluator("latent_stats", num_examples=16),
        "likelihood": base.evaluator("likelihood", num_examples=200)})
  return c
'''


def copy_run(trained, folder) -> str:
  shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(folder, "checkpoints"))
  return str(folder)


def main_py(args) -> list:
  return [sys.executable, os.path.join(ROOT, "main.py"), *args]


def env():
  return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def interrupt_when(args, ready, timeout=300):
  """Runs main.py with args, sends SIGINT once ready() holds; returns (returncode, stderr)."""
  proc = subprocess.Popen(main_py(args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  while not ready() and proc.poll() is None and time.time() - t0 < timeout:
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def interrupted_lines(stderr: str) -> list:
  return [line for line in stderr.splitlines() if "Interrupted by SIGINT" in line]


def test_sigint_stops_the_export_and_the_rerun_completes_it(tiny_trained, tmp_path):
  workdir = copy_run(tiny_trained, tmp_path / "run")
  npz_dir = os.path.join(workdir, "samples", "npz")
  args = ["--config=configs/tiny.py", f"--workdir={workdir}", "--mode=sample",
          f"--config.sample.num_samples={SHARDS * BATCH}", f"--config.sample.batch_size={BATCH}"]
  code, err = interrupt_when(args, lambda: os.path.exists(os.path.join(npz_dir, "shard_00000.npz")))
  assert code == 130, err[-3000:]
  lines = interrupted_lines(err)
  assert len(lines) == 1, err[-3000:]
  kept = sorted(f for f in os.listdir(npz_dir) if f.startswith("shard_"))
  assert 1 <= len(kept) < SHARDS
  assert f"kept {len(kept)} of {SHARDS} export shards" in lines[0] and "rerun" in lines[0]
  merged = os.path.join(workdir, "samples", f"samples_{SHARDS * BATCH}x32x32x3.npz")
  assert not os.path.exists(merged)

  rerun = subprocess.run(main_py(args), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"'shards_resumed': {len(kept)}" in rerun.stderr

  config = tiny.get_config()
  config.sample.num_samples, config.sample.batch_size = SHARDS * BATCH, BATCH
  reference = sample_cmd.run(config, copy_run(tiny_trained, tmp_path / "uninterrupted"))
  with np.load(merged) as got, np.load(reference["npz_path"]) as want:
    assert np.array_equal(got["arr_0"], want["arr_0"])
    assert np.array_equal(got["arr_1"], want["arr_1"])


@pytest.mark.slow
def test_sigint_stops_evaluate_after_the_first_evaluator_and_the_rerun_completes(tiny_trained, tmp_path):
  config_file = tmp_path / "two_evals.py"
  config_file.write_text(TWO_EVALS)
  workdir = copy_run(tiny_trained, tmp_path / "run")
  partial = os.path.join(workdir, "eval", "partial.json")
  args = [f"--config={config_file}", f"--workdir={workdir}", "--mode=evaluate"]
  code, err = interrupt_when(args, lambda: os.path.exists(partial))
  assert code == 130, err[-3000:]
  lines = interrupted_lines(err)
  assert len(lines) == 1 and "latent_stats" in lines[0] and "rerun" in lines[0], err[-3000:]
  with open(partial) as f:
    assert set(json.load(f)["done"]) == {"latent_stats"}
  assert not os.path.exists(os.path.join(workdir, "eval", "report.json"))

  rerun = subprocess.run(main_py(args), cwd=ROOT, env=env(), capture_output=True, text=True,
                         timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "already done" in rerun.stderr and "Evaluator latent_stats (latent_stats)," not in rerun.stderr
  assert not os.path.exists(partial)

  sys.path.insert(0, str(tmp_path))
  try:
    import two_evals  # noqa: PLC0415 - the config file written above
  finally:
    sys.path.remove(str(tmp_path))
  reference_dir = copy_run(tiny_trained, tmp_path / "uninterrupted")
  evaluate_cmd.run(two_evals.get_config(), reference_dir)
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    got = json.load(f)
  with open(os.path.join(reference_dir, "eval", "report.json")) as f:
    want = json.load(f)
  assert got == want and set(got) == {"latent_stats", "likelihood"}
