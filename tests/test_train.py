"""The joint train step and the loop: sharded == single device, exact resume, smoke run, errors."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import tiny
from simflow_jax import checkpoint, errors, optim, sharding, steps, train_step
from simflow_jax.commands import train
from simflow_jax.data import pipeline
from simflow_jax.models import build


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def _one_step(config, devices, state0, batch_np):
  """One step of the training loop's own jitted, sharded step (steps.build_step)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  spec = steps.build_step(config, mesh)
  with jax.set_mesh(mesh):
    # The step donates its state: give it a fresh copy, placed as the loop places it.
    state = jax.device_put(jax.tree.map(np.array, state0), jax.tree.map(lambda a: a.sharding, spec.state))
    batch = sharding.global_batch(batch_np, mesh)
    new_state, metrics = spec.fn(state, batch, {})
    return jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize("w_gan", [0.0, pytest.param(0.1, marks=pytest.mark.slow)],
                         ids=["generator", "with_discriminator"])
def test_eight_devices_equal_one_device(w_gan):
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  config = tiny.get_config()
  with config.unlocked():
    config.loss.w_gan = w_gan  # > 0: the discriminator's update too
    config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 256  # and FSDP-sharded parameters
    config.optim.warmup_steps = 0  # a non-zero learning rate at step 0
    config.optim.lr_vae = config.optim.lr_flow = config.optim.lr_disc = 1e-3
    # Biases in front of a GroupNorm have an exactly-zero gradient; Adam's first step
    # turns its float noise (~1e-9, summed in another order on 8 devices) into +-lr.
    # eps = 1e-4 keeps those updates negligible; real gradients still move by ~lr.
    config.optim.eps = 1e-4
  models = build.build_models(config)
  abstract = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  tx = optim.make_optimizer(config, abstract)
  state0 = train_step.create_train_state(models, config, tx, jax.random.key(0))
  batch = next(pipeline.make_train_loader(config.data, 0))
  s8, m8 = _one_step(config, jax.devices(), state0, batch)
  with config.unlocked():
    config.mesh.fsdp = 1
  s1, m1 = _one_step(config, jax.devices()[:1], state0, batch)
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(state0.params))]
  assert max(moved) > 1e-4, "the step must move parameters well beyond the tolerance"


def test_smoke_run_resume_equality_and_grid(tmp_path, tiny_trained):
  """The session's tiny run (conftest: 4 steps, logged and saved every 2) resumed from its
  step-2 checkpoint after a "kill" that tore metrics.jsonl: the replayed step's row replaces
  the logged one and equals the uninterrupted run's."""
  config = tiny.get_config()
  full = tiny_trained
  assert config.train.log_every == config.train.ckpt_every == 2 and config.train.num_steps == 4
  assert os.path.exists(os.path.join(full, "samples", "grid_00000004.png"))
  assert checkpoint.Checkpointer(full, config).latest_step() == 4
  assert os.path.exists(os.path.join(full, "config.json"))
  rows_full = _rows(full)
  assert sorted(rows_full) == [2, 4]
  assert all(np.isfinite(r["loss"]) for r in rows_full.values())

  # A run "preempted" after step 3: only the step-2 checkpoint survives.
  resumed = str(tmp_path / "resumed")
  os.makedirs(os.path.join(resumed, "checkpoints"))
  shutil.copytree(os.path.join(full, "checkpoints", "2"), os.path.join(resumed, "checkpoints", "2"))
  with open(os.path.join(full, "metrics.jsonl")) as f:  # rows 2 and 4 logged before the "kill"
    logged = [json.loads(line) for line in f]
  logged[1]["loss"] = -1.0  # marks the row of step 4 logged before the kill
  with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in logged) + json.dumps(logged[1])[:20])  # torn
  out = train.run(config, resumed)
  assert os.path.exists(out["grid_path"]) and out["grid_path"].endswith(".png")
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [2, 4], "one row per step: the replayed step 4 replaces its row"
  rows_res = _rows(resumed)  # step 4's row is the resumed run's (checked below), not the marked one
  for key in ("loss", "loss_nf", "loss_l1", "bits_per_dim", "grad_norm_flow"):
    assert rows_res[4][key] == rows_full[4][key], key

  # Sampling parameters load from the finished run (EMA by default).
  params = checkpoint.load_params(resumed, config)
  assert set(params) == {"vae", "flow"}


def test_incompatible_checkpoint_is_a_clear_error(tmp_path, tiny_trained):
  config = tiny.get_config()
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_trained, workdir)  # a finished tiny run (conftest)
  with config.unlocked():
    config.flow.width = 48
  with pytest.raises(checkpoint.CheckpointError, match="different model config.*flow"):
    train.run(config, workdir)
  # The checkpoint is still there.
  assert checkpoint.Checkpointer(workdir, tiny.get_config()).latest_step() == 4


def test_params_of_an_eight_device_run_load_on_one_device(tiny_trained, tmp_path):
  """A run trained on 8 devices (the session's tiny run) is sampled or evaluated on 1: the
  parameters load in a one-device process, equal to the ones loaded here."""
  import subprocess
  import sys
  assert len(jax.devices()) == 8
  expected = checkpoint.load_params(tiny_trained, tiny.get_config())
  out = tmp_path / "params.npz"
  code = ("import sys, jax, numpy as np; from configs import tiny; from simflow_jax import checkpoint; "
          "assert len(jax.devices()) == 1; p = checkpoint.load_params(sys.argv[1], tiny.get_config()); "
          "np.savez(sys.argv[2], *[np.asarray(x) for x in jax.tree.leaves(p)])")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-c", code, tiny_trained, str(out)], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as loaded:
    got = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
  for a, b in zip(jax.tree.leaves(expected), got, strict=True):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  config = tiny.get_config()
  with config.unlocked():
    config.optim.lr_flow = 1e30  # explodes after the first updates
    config.optim.lr_vae = 1e30
    config.optim.warmup_steps = 0
    config.optim.grad_clip = 0.0
    config.train.num_steps, config.train.ckpt_every, config.train.log_every = 6, 1, 3
  with pytest.raises(errors.NonFiniteLossError, match="Non-finite loss"):
    train.run(config, str(tmp_path / "nan"))
  step = checkpoint.Checkpointer(str(tmp_path / "nan"), config).latest_step()
  assert step is not None and step >= 1


def test_bad_config_values_are_clear_errors(tmp_path):
  config = tiny.get_config()
  with pytest.raises(AttributeError):
    config.optim.lr = 1.0  # locked: a typo is an error
  with config.unlocked():
    config.train.freeze = "end2end"
  with pytest.raises(ValueError, match="train.freeze"):
    train.run(config, str(tmp_path / "a"))
  config = tiny.get_config()
  with config.unlocked():
    config.data.source, config.data.path = "imagefolder", str(tmp_path / "missing")
  with pytest.raises((FileNotFoundError, ValueError), match="missing"):
    train.run(config, str(tmp_path / "b"))

