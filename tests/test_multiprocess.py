"""Multi-process runs with real processes: 2 local processes x 4 CPU devices as one JAX system
(tests/multiprocess.py) against 1 process x 8 devices, with configs/tiny.py.

Tolerance: the two runs see the same global batches in the same order and the same initial
state, so they compute the same sums; only the order of the cross-device reductions differs
(gloo between processes vs. one process's all-reduce), so the losses agree to float32
round-off (rtol 1e-5 after 4 steps), not bit for bit. A checkpoint resumed with the SAME
process count repeats the same programs on the same data: bit-exact.

Stopping: the stop flag is agreed through a collective at every logging step
(train._stop_requested), so SIGTERM to every process, or to only one of them, stops all of
them at the same step with one checkpoint, and each exits 143.
"""
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

import multiprocess
from configs import tiny
from simflow_jax import checkpoint
from simflow_jax.data import pipeline

TINY = ["--config=configs/tiny.py"]
_RATE_KEYS = ("steps_per_sec", "images_per_sec")


def _rows(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in _RATE_KEYS} for line in f]


# ------------------------------------------------------------------------------------------
# The data pipeline alone: every host count yields the same global batches.
# ------------------------------------------------------------------------------------------
def _data_cfg():
  cfg = tiny.get_config().data.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.batch_size, cfg.random_flip = 8, True
  return cfg


@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_concatenate_to_the_global_batch(hosts):
  cfg = _data_cfg()
  one = pipeline.make_train_loader(cfg, seed=5)
  many = [pipeline.make_train_loader(cfg, seed=5, process_index=h, process_count=hosts)
          for h in range(hosts)]
  for _ in range(3):
    expected = next(one)
    parts = [next(it) for it in many]
    assert parts[0]["image"].shape[0] == 8 // hosts
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), expected[key])


def test_data_position_moves_to_another_host_count():
  cfg = _data_cfg()
  two = [pipeline.make_train_loader(cfg, seed=1, process_index=h, process_count=2) for h in range(2)]
  for _ in range(3):
    for it in two:
      next(it)
  state = pipeline.rescale_train_state(two[0].get_state(), 2, 1)
  one = pipeline.make_train_loader(cfg, seed=1)
  one.set_state(state)
  reference = pipeline.make_train_loader(cfg, seed=1)
  for _ in range(3):
    next(reference)
  np.testing.assert_array_equal(next(one)["label"], next(reference)["label"])
  with pytest.raises(ValueError, match="worker_count"):
    pipeline.rescale_train_state({"workers_state": {}}, 2, 1)


# ------------------------------------------------------------------------------------------
# Training: 2 processes x 4 devices == 1 process x 8 devices.
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """workdirs of the tiny config trained by 2 x 4, then by 1 x 8 (one after the other: the
  processes of a run must reach each collective within gloo's 30 s of each other)."""
  root = tmp_path_factory.mktemp("multiprocess")
  one, two = str(root / "one"), str(root / "two")
  multiprocess.run_main(TINY + [f"--workdir={two}"], processes=2)
  multiprocess.run_main(TINY + [f"--workdir={one}"], processes=1)
  return {"one": one, "two": two, "root": root}


def test_two_processes_train_like_one(runs):
  one, two = _rows(runs["one"]), _rows(runs["two"])
  assert [r["step"] for r in two] == [2, 4]  # written once (by process 0 only)
  for a, b in zip(one, two):
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  events = [f for f in os.listdir(runs["two"]) if "tfevents" in f]
  assert len(events) == 1, events
  data = sorted(os.listdir(os.path.join(runs["two"], "checkpoints", "4", "data")))
  assert [f for f in data if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]


def _from_step_2(src, dst):
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "4"))
  return dst


def test_checkpoint_of_two_processes_resumes_in_two_exactly_and_in_one(runs):
  root = runs["root"]
  again = _from_step_2(runs["two"], str(root / "two_again"))
  in_one = _from_step_2(runs["two"], str(root / "two_in_one"))
  multiprocess.run_main(TINY + [f"--workdir={again}"], processes=2)
  multiprocess.run_main(TINY + [f"--workdir={in_one}"], processes=1)
  assert _rows(again) == _rows(runs["two"])  # bit-exact: the same programs on the same data
  config = tiny.get_config()
  resumed = checkpoint.load_params(again, config)
  uninterrupted = checkpoint.load_params(runs["two"], config)
  for a, b in zip(jax_leaves(resumed), jax_leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_rows(in_one), _rows(runs["one"])):  # 1 process continues the same stream
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------
# Signals and a dead process.
# ------------------------------------------------------------------------------------------
_ENDLESS = TINY + ["--config.train.num_steps=100000", "--config.train.log_every=1",
                   "--config.train.ckpt_every=100000", "--config.train.sample_every=0"]


def _wait_for_rows(workdir, procs, timeout=600):
  """Waits until training has logged a step (every process is past compiling)."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.exists(path) and os.path.getsize(path) > 0:
      return
    if any(p.poll() is not None for p in procs.procs):
      break
    time.sleep(1)
  procs.kill_all()
  raise AssertionError(f"no training step logged:\n{multiprocess.report(procs.wait(60))}")


@pytest.mark.slow
@pytest.mark.parametrize("which", [None, (1,)], ids=["all", "one"])
def test_sigterm_stops_every_process_at_the_same_step(tmp_path, which):
  workdir = str(tmp_path / "run")
  procs = multiprocess.start_main(_ENDLESS + [f"--workdir={workdir}"], processes=2)
  _wait_for_rows(workdir, procs)
  procs.signal(signal.SIGTERM, which)
  results = procs.wait(300)
  report = multiprocess.report(results)
  assert [r.returncode for r in results] == [143, 143], report
  steps = {r.stderr.split("Interrupted by SIGTERM at step ")[1].split(":")[0] for r in results}
  assert len(steps) == 1, report
  step = int(steps.pop())
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved == [step], report
  data = os.listdir(os.path.join(workdir, "checkpoints", str(step), "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(data)
  assert _rows(workdir)[-1]["step"] == step


@pytest.mark.slow
def test_a_killed_process_ends_the_others_with_an_error(tmp_path):
  workdir = str(tmp_path / "run")
  procs = multiprocess.start_main(_ENDLESS + [f"--workdir={workdir}"], processes=2,
                                  env={"SIMFLOW_HEARTBEAT_TIMEOUT": "10"})
  _wait_for_rows(workdir, procs)
  procs.procs[1].kill()
  start = time.monotonic()
  results = procs.wait(180)  # heartbeat timeout 10 s, with a generous margin on a loaded machine
  assert results[1].returncode == -signal.SIGKILL
  assert results[0].returncode not in (0, None), multiprocess.report(results)
  assert time.monotonic() - start < 180
