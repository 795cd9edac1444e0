"""Config values that would lose the model, divide by zero or mean nothing are refused at the
config boundary (models/build.py validate_config) with one message naming the field; the values
where 0 means "off" stay allowed; main.py refuses keep_ckpts=0 / ckpt_every=0 before training."""
import os
import subprocess
import sys
import time

import pytest

from configs import tiny
from simflow_jax.models import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (field, bad value, words the message must hold)
REFUSED = [
    ("train.keep_ckpts", 0, ">= 1"),
    ("train.keep_ckpts", -1, ">= 1"),
    ("train.ckpt_every", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"),
    ("train.num_steps", -5, ">= 0"),
    ("train.sample_every", -1, ">= 0"),
    ("train.grid_per_class", 0, ">= 1"),
    ("data.batch_size", 0, ">= 1"),
    ("data.image_size", 0, ">= 1"),
    ("data.worker_count", -1, ">= 0"),
    ("sample.batch_size", 0, ">= 1"),
    ("sample.num_samples", -1, ">= 0"),
    ("sample.jacobi_chunk", -1, ">= 0"),
    ("sample.jacobi_threshold", -0.1, ">= 0"),
    ("sample.jacobi_max_iters", -2, ">= 0"),
    ("sample.kv_windows", 0, ">= 1"),
    ("sample.temperature", 0.0, "> 0"),
    ("eval.classifier_steps", 0, ">= 1"),
    ("optim.warmup_steps", -1, ">= 0"),
    ("optim.ema_decay", 1.0, "[0, 1)"),
    ("optim.ema_decay", -0.1, "[0, 1)"),
    ("optim.b2", 1.0, "[0, 1)"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.lr_flow", -1e-4, ">= 0"),
    ("optim.grad_clip", -1.0, ">= 0"),
    ("vae.sigma_bar", 0.0, "> 0"),
    ("vae.ch_mult", (), "non-empty"),
    ("vae.z_channels", 0, ">= 1"),
    ("flow.head_dim", 0, ">= 1"),
    ("flow.patch_size", 0, ">= 1"),
    ("flow.mlp_ratio", 0, "> 0"),
    ("repa.layer", 0, "count from 1"),
    ("mesh.fsdp", 0, ">= 1"),
    ("mesh.data", 0, "-1"),
    ("study.steps", 0, ">= 1"),
    ("study.workers", 0, ">= 1"),
    ("study.seeds", (), "at least one seed"),
    ("study.stage1_fraction", 1.0, "(0, 1)"),
    ("study.num_eval_examples", -1, ">= 0"),
]

# Values at the edge that mean something ("off", "none", "all") and must stay allowed.
ALLOWED = [
    ("train.num_steps", 0), ("train.sample_every", 0),
    ("sample.num_samples", 0), ("sample.jacobi_chunk", 0), ("sample.jacobi_max_iters", 0),
    ("optim.warmup_steps", 0), ("optim.grad_clip", 0.0), ("optim.weight_decay", 0.0),
    ("optim.ema_decay", 0.0), ("data.worker_count", 0), ("study.num_eval_examples", 0),
    ("mesh.data", -1), ("repa.w_flow", 0.0), ("train.keep_ckpts", 1), ("train.ckpt_every", 1),
]


def _set(config, name, value):
  *parents, leaf = name.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


@pytest.mark.parametrize("name,value,words", REFUSED, ids=[f"{n}={v}" for n, v, _ in REFUSED])
def test_refused(name, value, words):
  config = tiny.get_config()
  _set(config, name, value)
  with pytest.raises(ValueError) as e:
    build.validate_config(config)
  message = str(e.value)
  section, leaf = name.split(".")
  assert f"config.{section}." in message and leaf in message and words in message, message
  assert "\n" not in message


@pytest.mark.parametrize("name,value", ALLOWED, ids=[f"{n}={v}" for n, v in ALLOWED])
def test_zero_means_off_allowed(name, value):
  config = tiny.get_config()
  _set(config, name, value)
  build.validate_config(config)


@pytest.mark.parametrize("override", ["train.keep_ckpts=0", "train.ckpt_every=0"])
def test_main_refuses_before_training(tmp_path, override):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/tiny.py",
                         f"--workdir={workdir}", f"--config.{override}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
  assert len(lines) == 1 and f"config.{override.split('=')[0]}" in lines[0], proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # Refused before training: no checkpoint, no metrics.
  assert not workdir.exists()  # nothing written, not even the workdir
  assert time.monotonic() - start < 120
