"""The benchmark scripts run on tiny settings and print one JSON object with the fields their
docstrings document (timings positive, counts as asked for); bad arguments are clear errors.
Every script run but the matmul peak compiles a train step or a sampler in a subprocess
(a minute or more on 2 cores): those are marked slow."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_script(name: str, *args: str) -> dict:
  """Runs benchmarks/NAME on one CPU device (fast XLA compile); returns its JSON output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=conftest.SPEED_FLAGS)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", name), *args], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


def _check_machine(machine: dict) -> None:
  assert machine["platform"] == "cpu" and machine["device_count"] == 1
  assert machine["cpu_count"] >= 1 and machine["jax"]


def _check_matmul(m: dict, size: int) -> None:
  assert m["size"] == size and m["devices"] == 1 and m["flops_per_call"] > 0
  assert 0 < m["flops_per_s"] <= m["flops_per_s_best"] and m["flops_per_cpu_s"] > 0


def _check_positive(entry: dict, keys) -> None:
  for key in keys:
    assert entry[key] > 0, key


# The fields benchmarks/train_throughput.py documents for every config.
TRAIN_FIELDS = ("params", "trace_lower_s", "compile_s", "step_time_s_median", "step_time_s_mean",
                "step_time_s_min", "images_per_s", "flops_per_step", "achieved_flops_per_s",
                "fraction_of_matmul_peak", "step_cpu_s_median", "achieved_flops_per_cpu_s",
                "fraction_of_matmul_peak_cpu", "peak_rss_mb")


def test_matmul_peak_script():
  out = _run_script("matmul_peak.py", "--size=128", "--reps=3")
  _check_machine(out["machine"])
  _check_matmul(out["matmul"], 128)


@pytest.mark.slow  # a subprocess compiling the joint train step: ~1 minute on 2 cores
def test_train_throughput_script_on_tiny():
  out = _run_script("train_throughput.py", "--configs=tiny", "--steps=2", "--warmup=1",
                    "--matmul_size=128", "--matmul_reps=3")
  _check_machine(out["machine"])
  assert list(out["results"]) == ["tiny"]
  r = out["results"]["tiny"]
  assert r["global_batch"] == 8 and r["devices"] == 1 and r["steps"] == 2
  _check_positive(r, TRAIN_FIELDS)
  assert r["step_time_s_min"] <= r["step_time_s_median"]
  _check_matmul(r["matmul"], 128)


def test_unknown_config_names_are_clear_errors():
  """The names every script looks up (benchmarks/common.py), in this process: a script
  start costs seconds of imports."""
  spec = importlib.util.spec_from_file_location("benchmarks_common",
                                                os.path.join(ROOT, "benchmarks", "common.py"))
  common = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(common)
  with pytest.raises(ValueError, match=r"Unknown benchmark config 'huge'; choose from \('tiny', 'demo', 'mid'\)"):
    common.get_config("huge")
  with pytest.raises(ValueError, match=r"Unknown benchmark config 'huge'; choose from \('tarflow64'"):
    common.flow_model("huge")


@pytest.mark.slow
@pytest.mark.parametrize("script, args, message", [
    ("train_throughput.py", ["--configs=huge"], "Unknown benchmark config 'huge'"),
    ("sample_throughput.py", ["--config=huge"], "Unknown benchmark config 'huge'"),
    ("selective_quality.py", ["--workdir=/nonexistent", "--methods=selective:0.1"],
     "--methods needs a 'cached' entry"),
])
def test_scripts_refuse_bad_arguments_before_any_work(script, args, message):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sample_throughput_script_on_a_small_flow_config():
  out = _run_script("sample_throughput.py", "--config=tarflow64", "--batches=2", "--guidance=0",
                    "--methods=cached,selective", "--rounds=1", "--jacobi_chunk=16")
  _check_machine(out["machine"])
  assert out["config"] == "tarflow64" and len(out["load_average_before"]) == 3
  assert list(out["results"]) == ["batch2_guidance0"]
  r = out["results"]["batch2_guidance0"]
  for method in ("cached", "selective"):
    _check_positive(r[method], ("compile_s", "seconds", "images_per_s", "seconds_per_token_step",
                                "peak_memory_mb"))
  assert r["cached"]["mean_steps"] == 16  # sequential: 16 tokens per chunk of every block
  # Selective: the deep block (1 of 4) counts its 16 tokens per chunk; each Jacobi block
  # takes 1-16 iterations per 16-token chunk (exact after 16), so the mean lies in [19/4, 16].
  assert (16 + 3 * 1) / 4 <= r["selective"]["mean_steps"] <= 16
  assert r["selective_speedup"] > 0
  assert list(out["scaling"]) == ["tarflow64"] and out["scaling"]["tarflow64"]["tokens"] == 64
  _check_positive(out["scaling"]["tarflow64"], ("compile_s", "seconds_per_image", "flops_per_image",
                                                "matmul_peak_fraction", "seconds_per_token_step"))


@pytest.mark.slow
def test_selective_quality_script_on_a_trained_checkpoint(tiny_trained, tmp_path):
  """Jacobi at threshold 0 is exact decoding: the selective entry reproduces the cached
  tokens, iteration counts and digit metrics; every entry is timed and scored."""
  workdir = tmp_path / "run"  # a copy: the script trains the digit classifier into WORKDIR/eval
  shutil.copytree(tiny_trained, workdir)
  out = _run_script("selective_quality.py", f"--workdir={workdir}", "--config=configs/tiny.py",
                    "--methods=selective:0,cached,selective:0.5", "--seeds=0,1", "--num_samples=12",
                    "--num_real=16")
  _check_machine(out["machine"])
  assert out["checkpoint_step"] == 4 and out["config"]["kv_windows"] == 8
  r = out["results"]
  assert list(r) == ["cached", "selective:0", "selective:0.5"]  # the reference runs first
  cached, exact, loose = r["cached"], r["selective:0"], r["selective:0.5"]
  assert cached["max_token_diff"] == 0 and cached["speedup_vs_cached"] == 1
  assert exact["max_token_diff"] < 1e-4 and exact["mean_steps"] == cached["mean_steps"]
  assert exact["digit_class_accuracy_values"] == cached["digit_class_accuracy_values"]
  np.testing.assert_allclose(exact["digit_fd_values"], cached["digit_fd_values"], rtol=1e-3)
  assert loose["mean_steps"] < cached["mean_steps"]  # a loose threshold stops chunks early
  for entry in r.values():
    assert len(entry["seconds_per_seed"]) == 2 and entry["seconds"] > 0 and entry["compile_s"] > 0
    assert len(entry["digit_fd_values"]) == 2 and entry["digit_fd"] >= 0
    assert 0 <= entry["digit_class_accuracy"] <= 1


FAKE_TARFLOW = '''
"""A stand-in for ml-tarflow's transformer_flow.py with its constructor and step interface."""
import torch


class Model(torch.nn.Module):
  def __init__(self, in_channels, img_size, patch_size, channels, num_blocks, layers_per_block, num_classes):
    super().__init__()
    self.scale = torch.nn.Parameter(torch.zeros(in_channels))

  def forward(self, x, y):
    z = x * torch.exp(self.scale)[None, :, None, None]
    return z, None, self.scale.sum().expand(x.shape[0]) * x.shape[2] * x.shape[3]

  def get_loss(self, z, logdets):
    return 0.5 * z.pow(2).mean() - logdets.mean() / z[0].numel()
'''


@pytest.mark.slow
def test_train_throughput_script_on_a_flow_only_config(tmp_path):
  """A flow-only config times the flow's own step. With --tarflow_repo (here a stand-in for
  ml-tarflow, where torch is installed) the reference's steps run in a worker process
  (benchmarks/train_worker.py), one per step of ours, warm-up excluded."""
  args = ["--configs=tarflow64", "--steps=3", "--warmup=1", "--batch=2", "--matmul_size=128",
          "--matmul_reps=3"]
  reference = importlib.util.find_spec("torch") is not None
  if reference:
    (tmp_path / "transformer_flow.py").write_text(FAKE_TARFLOW)
    args.append(f"--tarflow_repo={tmp_path}")
  r = _run_script("train_throughput.py", *args)["results"]["tarflow64"]
  assert r["flow_only"] and r["global_batch"] == 2 and r["steps"] == 3 and r["devices"] == 1
  _check_positive(r, TRAIN_FIELDS)
  assert ("tarflow" in r) == reference and ("speedup_vs_tarflow" in r) == reference
  if reference:
    times = r["tarflow"]["step_times_s"]
    assert len(times) == 3 and all(t > 0 for t in times)
    assert min(times) <= r["tarflow"]["step_time_s_median"] <= max(times)
    assert r["speedup_vs_tarflow"] > 0
