"""Multi-process runs with real processes: 2 local processes x 4 CPU devices as one JAX system
(tests/multiprocess.py) against 1 process x 8 devices, with configs/tiny.py at its smallest.

The default run starts one 2-process run (module fixture `runs`): 2 x 4 trains 4 steps with
checkpoints, then samples in the same workdir. Its 1 x 8 baselines run in the test process
(8 simulated devices, the same XLA flags): the session's tiny run (conftest `tiny_trained`,
the same config and data) and an export of a copy of the 2-process checkpoint. The likelihood
(--mode=likelihood), every evaluator (--mode=evaluate), resuming, SIGTERM and a killed
process are marked slow.

Tolerances. Training: the two runs see the same global batches in the same order and the same
initial state, so they compute the same sums; only the order of the cross-device reductions
differs (gloo between processes vs. one process's all-reduce), so the losses agree to float32
round-off (rtol 1e-5 after 4 steps), not bit for bit. Sampling is per example (no reduction
crosses devices) from the same checkpoint: the grid and the .npz are bit-identical. The
likelihood and evaluate reports average over examples in another reduction order, and their
Frechet distances amplify round-off through a matrix square root: rtol 1e-4. A checkpoint
resumed with the SAME process count repeats the same programs on the same data: bit-exact.

Stopping: the stop flag is agreed through a collective every train.log_every steps
(signals.stop_agreed), so SIGTERM to every process, or to only one of them, stops all of them
at the same step with one checkpoint, and each exits 143 (launch/README.md, "Preemption and
multi-host stops"). A killed process ends the others through the coordination service's
heartbeat timeout (--heartbeat_timeout).
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
from simflow_jax.commands import sample as export
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


@pytest.mark.parametrize("hosts,num_examples", [(2, 20), (4, 8)])
def test_host_eval_slices_concatenate_to_the_global_batch(hosts, num_examples):
  cfg = _data_cfg()
  one = list(pipeline.make_eval_loader(cfg, "validation", 8, num_examples=num_examples))
  many = [list(pipeline.make_eval_loader(cfg, "validation", 8, h, hosts, num_examples))
          for h in range(hosts)]
  assert {len(m) for m in many} == {len(one)}
  for k, expected in enumerate(one):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([m[k][key] for m in many]), expected[key])


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
# One 2-process run for the default CI run: the tiny config trained by 2 x 4 (checkpoints at
# steps 2 and 4), then --mode=sample (slow: likelihood, evaluate) in the same workdir by 2 x 4.
# The 1 x 8 baselines: the session's tiny run trained in process (for the losses) and, in
# process, an export (slow: measures, evaluates by 1 x 8 launches) of a copy of the 2-process
# checkpoint (the same parameters: the samples compare exactly).
# ------------------------------------------------------------------------------------------
# The smallest settings of every command: a 12-sample export in shards of 8 (the last shard
# shorter than the batch), and every evaluator on 8 eval examples or images.
SMALL_SETTINGS = {
    "sample.num_samples": 12, "sample.batch_size": 8,
    "evals.generation.num_samples": 8,
    "evals.reconstruction.num_examples": 8, "evals.likelihood.num_examples": 8,
    "evals.latent_stats.num_examples": 8, "evals.latent_stats.max_examples": 8,
    "evals.robustness.num_examples": 8, "evals.robustness.num_images": 8,
    "evals.robustness.lpips": False,
    "evals.interpolation.num_examples": 8, "evals.interpolation.num_images": 8,
    "evals.interpolation.num_pairs": 1, "evals.interpolation.num_frames": 2,
}
SMALL = TINY + [f"--config.{key}={value}" for key, value in SMALL_SETTINGS.items()]


def small_config():
  """configs/tiny.py with SMALL_SETTINGS: the config main.py builds from SMALL."""
  config = tiny.get_config()
  for key, value in SMALL_SETTINGS.items():
    section, *middle, leaf = key.split(".")
    node = config[section]
    for name in middle:
      node = node[name]
    node[leaf] = value
  return config


def _commands(workdir, processes, modes):
  for mode in modes:
    multiprocess.run_main(SMALL + [f"--workdir={workdir}", f"--mode={mode}"], processes=processes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_trained):
  """Workdirs: 'two' (trained and sampled by 2 x 4), 'one' (the session's tiny run, trained by
  1 x 8 in process: read only), 'one_on_two' (sampled by 1 x 8 in process on 'two's
  checkpoints). One distributed run at a time: the processes of a run must reach each
  collective within gloo's 30 s of each other."""
  root = tmp_path_factory.mktemp("multiprocess")
  two, one_on_two = str(root / "two"), str(root / "one_on_two")
  multiprocess.run_main(SMALL + [f"--workdir={two}"], processes=2)
  shutil.copytree(two, one_on_two)
  _commands(two, 2, ("sample",))
  export.run(small_config(), one_on_two)
  return {"one": tiny_trained, "two": two, "one_on_two": one_on_two, "root": root}


@pytest.fixture(scope="module")
def measured(runs):
  """--mode=likelihood by 2 x 4 and by 1 x 8 on the same checkpoint."""
  _commands(runs["two"], 2, ("likelihood",))
  _commands(runs["one_on_two"], 1, ("likelihood",))
  return runs


@pytest.fixture(scope="module")
def evaluated(runs):
  """--mode=evaluate (every evaluator) by 2 x 4 and by 1 x 8 on the same checkpoint."""
  _commands(runs["two"], 2, ("evaluate",))
  _commands(runs["one_on_two"], 1, ("evaluate",))
  return runs


def test_two_processes_train_like_one(runs):
  one, two = _rows(runs["one"]), _rows(runs["two"])
  assert [r["step"] for r in two] == [2, 4]  # written once (by process 0 only)
  assert [r["step"] for r in one] == [2, 4]
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  events = [f for f in os.listdir(runs["two"]) if "tfevents" in f]
  assert len(events) == 1, events
  saved = sorted(int(s) for s in os.listdir(os.path.join(runs["two"], "checkpoints")) if s.isdigit())
  assert saved == [2, 4]
  data = sorted(os.listdir(os.path.join(runs["two"], "checkpoints", "4", "data")))
  assert [f for f in data if f.startswith("process_")] == ["process_0-of-2.json", "process_1-of-2.json"]


def _npz(workdir):
  out = os.path.join(workdir, "samples")
  with np.load(os.path.join(out, "samples_12x32x32x3.npz")) as f:
    return f["arr_0"], f["arr_1"]


def test_two_processes_sample_like_one(runs):
  two, one = runs["two"], runs["one_on_two"]
  images, labels = _npz(two)
  assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  # Process 0 writes every shard (the images are gathered to it), as one process does.
  assert sorted(os.listdir(os.path.join(two, "samples", "npz"))) == \
      sorted(os.listdir(os.path.join(one, "samples", "npz")))
  for a, b in zip(_npz(two), _npz(one)):
    np.testing.assert_array_equal(a, b)  # per-example programs: no reduction crosses devices
  with open(os.path.join(two, "samples", "sample_grid.png"), "rb") as a, \
       open(os.path.join(one, "samples", "sample_grid.png"), "rb") as b:
    assert a.read() == b.read()


def _close(a, b, path=""):
  """Reports equal: numbers to rtol 1e-4 (the sums over examples are reduced in another order
  across devices and hosts), everything else exactly."""
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _close(x, y, f"{path}[{i}]")
  elif isinstance(a, float) or isinstance(b, float):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=path)
  else:
    assert a == b, path


def _json(workdir, name):
  with open(os.path.join(workdir, name)) as f:
    return json.load(f)


@pytest.mark.slow  # two more launches; the sharded restore and batch split are those of sample
def test_two_processes_measure_the_likelihood_like_one(measured):
  two, one = _json(measured["two"], "likelihood.json"), _json(measured["one_on_two"], "likelihood.json")
  assert two.keys() == {"likelihood", "notes"}
  assert two["likelihood"]["num_examples"] == 8
  _close(one, two, "likelihood.json")


@pytest.mark.slow  # two more launches that run every evaluator
def test_two_processes_evaluate_like_one(evaluated):
  report = os.path.join("eval", "report.json")
  two, one = _json(evaluated["two"], report), _json(evaluated["one_on_two"], report)
  assert {"generation", "reconstruction", "likelihood"} <= two.keys()
  _close(one, two, "report")
  assert two["likelihood"]["num_examples"] == 8


# ------------------------------------------------------------------------------------------
# Resuming (slow: two more 2-process runs).
# ------------------------------------------------------------------------------------------
def _from_step_2(src, dst):
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, "checkpoints", "4"))
  return dst


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_in_two_exactly_and_in_one(runs):
  root = runs["root"]
  again = _from_step_2(runs["two"], str(root / "two_again"))
  in_one = _from_step_2(runs["two"], str(root / "two_in_one"))
  multiprocess.run_main(SMALL + [f"--workdir={again}"], processes=2)
  multiprocess.run_main(SMALL + [f"--workdir={in_one}"], processes=1)
  assert _rows(again) == _rows(runs["two"])  # bit-exact: the same programs on the same data
  config = tiny.get_config()
  resumed = checkpoint.load_params(again, config)
  uninterrupted = checkpoint.load_params(runs["two"], config)
  for a, b in zip(jax_leaves(resumed), jax_leaves(uninterrupted)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_rows(in_one), _rows(runs["one"])):  # 1 process continues the same stream
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_process_export_resumes(runs):
  workdir = str(runs["root"] / "two_export")
  shutil.copytree(runs["two"], workdir)
  expected = _npz(workdir)
  os.remove(os.path.join(workdir, "samples", "npz", "shard_00001.npz"))
  os.remove(os.path.join(workdir, "samples", "samples_12x32x32x3.npz"))
  multiprocess.run_main(SMALL + [f"--workdir={workdir}", "--mode=sample"], processes=2)
  for a, b in zip(_npz(workdir), expected):
    np.testing.assert_array_equal(a, b)


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
  procs = multiprocess.start_main(_ENDLESS + [f"--workdir={workdir}", "--heartbeat_timeout=10"],
                                  processes=2)
  _wait_for_rows(workdir, procs)
  procs.procs[1].kill()
  start = time.monotonic()
  results = procs.wait(180)  # heartbeat timeout 10 s, with a generous margin on a loaded machine
  assert results[1].returncode == -signal.SIGKILL
  assert results[0].returncode not in (0, None), multiprocess.report(results)
  assert time.monotonic() - start < 180


def test_heartbeat_timeout_flag_is_checked(tmp_path):
  [result] = multiprocess.run_main(TINY + [f"--workdir={tmp_path / 'run'}", "--heartbeat_timeout=0"],
                                   processes=1, timeout=120, check=False)
  assert result.returncode == 2, multiprocess.report([result])
  assert result.stderr.strip().splitlines()[-1].startswith("Error: --heartbeat_timeout=0"), result.stderr
