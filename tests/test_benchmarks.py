"""The benchmark scripts run on the tiny config and print consistent, positive JSON fields."""
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
  assert m["size"] == size and m["devices"] == 1
  assert m["flops_per_call"] == 2 * size ** 3
  assert 0 < m["flops_per_s"] <= m["flops_per_s_best"] and m["flops_per_cpu_s"] > 0


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
  for key in ("params", "trace_lower_s", "compile_s", "step_time_s_median", "step_time_s_mean",
              "step_time_s_min", "images_per_s", "flops_per_step", "achieved_flops_per_s",
              "fraction_of_matmul_peak", "step_cpu_s_median", "achieved_flops_per_cpu_s",
              "fraction_of_matmul_peak_cpu", "peak_rss_mb"):
    assert r[key] > 0, key
  assert r["step_time_s_min"] <= r["step_time_s_median"]
  assert r["images_per_s"] == pytest.approx(8 / r["step_time_s_median"])
  assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_time_s_median"])
  _check_matmul(r["matmul"], 128)
  assert r["fraction_of_matmul_peak"] == pytest.approx(
      r["achieved_flops_per_s"] / r["matmul"]["flops_per_s"])
  assert r["fraction_of_matmul_peak_cpu"] == pytest.approx(
      r["flops_per_step"] / r["step_cpu_s_median"] / r["matmul"]["flops_per_cpu_s"])
  assert r["peak_rss_mb"] > 100, "a JAX process holds well over 100 MB"


def test_unknown_config_is_a_clear_error():
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "train_throughput.py"),
                         "--configs=huge"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode != 0
  assert "Unknown benchmark config 'huge'" in proc.stderr


@pytest.mark.slow
def test_sample_throughput_script_on_a_small_flow_config():
  out = _run_script("sample_throughput.py", "--config=tarflow64", "--batches=2", "--guidance=0",
                    "--methods=cached,selective", "--rounds=1", "--jacobi_chunk=16")
  _check_machine(out["machine"])
  assert out["config"] == "tarflow64" and len(out["load_average_before"]) == 3
  r = out["results"]["batch2_guidance0"]
  for method in ("cached", "selective"):
    m = r[method]
    assert m["compile_s"] > 0 and m["seconds"] > 0 and m["peak_memory_mb"] > 0
    assert m["images_per_s"] == pytest.approx(2 / m["seconds"])
    assert m["seconds_per_token_step"] == pytest.approx(m["seconds"] / (4 * 64))
  assert r["cached"]["mean_steps"] == 16  # sequential: 16 tokens per chunk of every block
  # Selective: the deep block (1 of 4) counts its 16 tokens per chunk; each Jacobi block
  # takes 1-16 iterations per 16-token chunk (exact after 16), so the mean lies in [19/4, 16].
  assert (16 + 3 * 1) / 4 <= r["selective"]["mean_steps"] <= 16
  assert r["selective_speedup"] == pytest.approx(r["cached"]["seconds"] / r["selective"]["seconds"])
  s = out["scaling"]["tarflow64"]
  assert s["tokens"] == 64 and s["seconds_per_image"] > 0
  # 64 tokens, width 256, 4 blocks x 2 layers, 16-dim tokens: matmuls + causal attention.
  assert s["flops_per_image"] == 4 * (64 * (2 * 2 * 12 * 256 ** 2 + 2 * 3 * 16 * 256) + 2 * 4 * 256 * 64 * 65 / 2)
  assert s["matmul_peak_fraction"] == pytest.approx(s["flops_per_image"] / s["seconds_per_image"]
                                                    / out["matmul_flops_per_s"])


@pytest.mark.slow
def test_train_throughput_script_on_a_flow_only_config():
  out = _run_script("train_throughput.py", "--configs=tarflow64", "--steps=1", "--warmup=0", "--batch=2",
                    "--matmul_size=128", "--matmul_reps=3")
  r = out["results"]["tarflow64"]
  assert r["flow_only"] and r["global_batch"] == 2 and r["steps"] == 1
  for key in ("params", "compile_s", "step_time_s_median", "flops_per_step", "fraction_of_matmul_peak"):
    assert r[key] > 0, key
  assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_time_s_median"])


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
    assert entry["digit_fd"] == pytest.approx(np.mean(entry["digit_fd_values"]))
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
def test_train_throughput_times_the_reference_in_a_worker_process(tmp_path):
  """--tarflow_repo: the reference's steps come from benchmarks/train_worker.py, one per step
  of ours (warm-up excluded), and the ratio is their medians'."""
  pytest.importorskip("torch")
  (tmp_path / "transformer_flow.py").write_text(FAKE_TARFLOW)
  out = _run_script("train_throughput.py", "--configs=tarflow64", "--steps=3", "--warmup=1", "--batch=2",
                    "--matmul_size=128", "--matmul_reps=3", f"--tarflow_repo={tmp_path}")
  r = out["results"]["tarflow64"]
  times = r["tarflow"]["step_times_s"]
  assert len(times) == 3 and all(t > 0 for t in times)
  assert r["tarflow"]["step_time_s_median"] == pytest.approx(sorted(times)[1])
  assert r["speedup_vs_tarflow"] == pytest.approx(r["tarflow"]["step_time_s_median"] / r["step_time_s_median"])
