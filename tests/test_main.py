"""main.py end to end, in subprocesses: SIGINT / SIGTERM stop training with a checkpoint that
resumes bit-exactly, a second signal exits at once, a refused resume changes no file, user
errors are one line with exit code 2, a corrupt checkpoint gets advice in --mode=sample too.

Every subprocess shares one persistent JAX compilation cache: the uninterrupted reference run
compiles the tiny model once, the others load it. A signalled run is paused at a known batch
(a driver wraps sharding.global_batch to wait for a line on stdin), so the signal arrives
during a known step, whatever the load of the machine.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900

# The driver: main.py, with the `pause_at`-th batch of the run waiting for a line on stdin
# after printing PAUSED to stderr. It polls: the kernel may deliver a signal to any thread, and
# Python runs the handler only once the main thread executes bytecode again.
DRIVER = f"""
import select, sys
sys.path.insert(0, {ROOT!r})
import main
from simflow_jax import sharding
pause_at, calls, real = int(sys.argv.pop(1)), [0], sharding.global_batch
def global_batch(*args, **kwargs):
  calls[0] += 1
  if calls[0] == pause_at:
    print("PAUSED", file=sys.stderr, flush=True)
    while not select.select([sys.stdin], [], [], 0.05)[0]:
      pass
    sys.stdin.readline()
  return real(*args, **kwargs)
sharding.global_batch = global_batch
main.run()
"""


def _env(cache) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1 " + conftest.SPEED_FLAGS,
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _main(args, env, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], env=env, cwd=cwd,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                        timeout=TIMEOUT_S, check=False)


def _signalled(args, env, pause_at: int, signals, release: bool = True):
  """Runs main.py paused at its `pause_at`-th batch, sends `signals` one by one (each after
  the previous one was acknowledged), then lets the step finish. Returns (returncode, stderr)."""
  proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(pause_at), *args], env=env, cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  watchdog = threading.Timer(TIMEOUT_S, proc.kill)
  watchdog.start()
  lines = []
  try:
    def read_until(marker):
      for line in proc.stderr:
        lines.append(line)
        if marker in line:
          return
      raise AssertionError(f"no {marker!r} in the output:\n{''.join(lines[-30:])}")
    read_until("PAUSED")
    for i, sig in enumerate(signals):
      proc.send_signal(sig)
      read_until(f"{signal.Signals(sig).name} {'again:' if i else 'received'}")
    if release:
      proc.stdin.write("\n")
      proc.stdin.flush()
    lines.append(proc.stderr.read())
    proc.wait()
  finally:
    watchdog.cancel()
    proc.kill()
    proc.wait()
  return proc.returncode, "".join(lines)


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


def _digest(folder) -> dict:
  """{relative path: sha256 (files) or 'dir'} of everything under folder."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(folder):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), folder)] = "dir"
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _rows(workdir) -> list:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _steps(workdir) -> list:
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


# configs/tiny.py made smaller still (one VAE downsampling, one flow block, 16x16 images):
# fewer ops, a shorter compile. Fields of the model-shaping config, so in-process configs match.
SMALLER = {"data.image_size": 16, "vae.ch_mult": (1, 2), "flow.layers": (1,), "train.num_steps": 6}


def _smaller_args() -> list:
  return [f"--config.{k}={v}" if not isinstance(v, tuple) else f"--config.{k}={v!r}"
          for k, v in SMALLER.items()]


def make_folder(root) -> str:
  """ImageFolder train/<c0, c1>/ with 6 readable 32x32 grayscale images each, a truncated JPEG
  and a text file named fake.jpg."""
  rng = np.random.default_rng(0)
  for c in ("c0", "c1"):
    os.makedirs(os.path.join(root, "train", c))
    for i in range(6):
      Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(
          os.path.join(root, "train", c, f"{i}.png"))
  jpeg = os.path.join(root, "train", "c0", "truncated.jpg")
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(jpeg, quality=95)
  with open(jpeg, "rb") as f:
    data = f.read()
  with open(jpeg, "wb") as f:
    f.write(data[:len(data) // 2])
  with open(os.path.join(root, "train", "c1", "fake.jpg"), "w") as f:
    f.write("not an image\n")
  return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A reference run, uninterrupted up to step 4 (checkpoints at 2 and 4), then stopped; and the
  same run stopped by SIGINT during step 2, then resumed and stopped by SIGTERM during step 4
  (no periodic checkpoints: the stops save them). Data: an ImageFolder with two unreadable
  files, skipped. No run reaches the final sample grid (one compile fewer)."""
  base = tmp_path_factory.mktemp("main_cli")
  env = _env(base / "jax_cache")
  folder = make_folder(base / "images")
  args = ["--config=configs/tiny.py", *_smaller_args(), "--config.train.log_every=1",
          "--config.train.async_ckpt=True", "--config.data.source=imagefolder",
          f"--config.data.path={folder}", "--config.data.skip_unreadable=True"]
  out = {"base": base, "env": env, "args": args, "ref": str(base / "ref"),
         "stopped": str(base / "stopped")}
  ref = args + ["--config.train.ckpt_every=2", f"--workdir={out['ref']}"]
  out["ref_run"] = _signalled(ref, env, 4, [signal.SIGTERM])
  stopped = args + ["--config.train.ckpt_every=100", f"--workdir={out['stopped']}"]
  out["sigint"] = _signalled(stopped, env, 2, [signal.SIGINT])
  out["after_sigint"] = _steps(out["stopped"])
  out["sigterm"] = _signalled(stopped, env, 2, [signal.SIGTERM])
  out["after_sigterm"] = _steps(out["stopped"])
  return out


def _raw_state(workdir, step):
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state",),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.mark.slow
def test_signals_save_a_checkpoint_that_resumes_bit_exactly(runs):
  code, stderr = runs["ref_run"]
  assert code == 143 and _last_line(stderr).startswith("Interrupted by SIGTERM at step 4: checkpoint 4"), \
      stderr[-3000:]
  code, stderr = runs["sigint"]
  ckpts = os.path.join(runs["stopped"], "checkpoints")
  assert code == 130, stderr[-3000:]
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
  assert _last_line(stderr) == (f"Interrupted by SIGINT at step 2: checkpoint 2 saved in {ckpts}; "
                                "rerun the same command to resume.")
  assert runs["after_sigint"] == [2]
  code, stderr = runs["sigterm"]
  assert code == 143, stderr[-3000:]
  assert "Resumed from checkpoint at step 2" in stderr
  assert _last_line(stderr) == (f"Interrupted by SIGTERM at step 4: checkpoint 4 saved in {ckpts}; "
                                "rerun the same command to resume.")
  assert runs["after_sigterm"] == [2, 4]

  ref, got = _rows(runs["ref"]), _rows(runs["stopped"])
  assert [r["step"] for r in got] == [1, 2, 3, 4] == [r["step"] for r in ref]
  timing = ("steps_per_sec", "images_per_sec")
  for r, g in zip(ref, got):
    assert {k: v for k, v in r.items() if k not in timing} == {k: v for k, v in g.items() if k not in timing}
  # The whole state at steps 2 and 4 (parameters, EMA, optimiser, step) and the data position.
  import jax
  for step in (2, 4):
    a, b = _raw_state(runs["ref"], step), _raw_state(runs["stopped"], step)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    data = os.path.join("checkpoints", str(step), "data", "process_0-of-1.json")
    with open(os.path.join(runs["ref"], data)) as f, open(os.path.join(runs["stopped"], data)) as g:
      assert json.load(f) == json.load(g)


@pytest.mark.slow
def test_unreadable_images_are_skipped_and_counted(runs):
  log = runs["ref_run"][1]
  assert "2 unreadable file(s) skipped so far" in log
  skipped = [line for line in log.splitlines() if "data.skip_unreadable: skipped" in line]
  assert len(skipped) == 2  # each file logged once, though every epoch meets it
  assert any("truncated.jpg" in line for line in skipped) and any("fake.jpg" in line for line in skipped)


def test_a_second_signal_exits_at_once(tmp_path):
  """The handler itself (a training run gets the same one): the first SIGINT only sets the
  flag the loop reads; the second ends the process with SIGINT's default action."""
  child = ("import os, signal, sys\n"
           f"sys.path.insert(0, {ROOT!r})\n"
           "from simflow_jax import signals\n"
           "with signals.StopOnSignal() as stop:\n"
           "  os.kill(os.getpid(), signal.SIGINT)\n"
           "  print('flag', stop.signum, flush=True)\n"
           "  os.kill(os.getpid(), signal.SIGINT)\n"
           "  print('still running', flush=True)\n")
  result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=False)
  assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
  assert result.stdout == f"flag {int(signal.SIGINT)}\n"
  assert "SIGINT received: stopping after the current step" in result.stderr
  assert "SIGINT again: exiting now" in result.stderr


def test_handlers_are_restored_after_training(tmp_path):
  from simflow_jax import signals
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with signals.StopOnSignal():
    assert signal.getsignal(signal.SIGINT) != before[signal.SIGINT]
  assert {s: signal.getsignal(s) for s in before} == before


def _config(runs, **fields):
  from configs import tiny
  config = tiny.get_config()
  with config.unlocked():
    config.data.source, config.data.path = "imagefolder", os.path.join(runs["base"], "images")
    config.data.skip_unreadable = True
    for key, value in SMALLER.items():
      section, name = key.split(".")
      config[section][name] = value
    for key, value in fields.items():
      section, name = key.split("__")
      config[section][name] = value
  return config


@pytest.mark.slow
def test_a_refused_resume_changes_no_file(runs):
  from simflow_jax import checkpoint
  from simflow_jax.commands import train
  before = _digest(runs["ref"])
  with pytest.raises(checkpoint.CheckpointError, match=r"different model config \(differs in: flow\)"):
    train.run(_config(runs, flow__width=48), runs["ref"])
  assert _digest(runs["ref"]) == before


@pytest.mark.slow
def test_corrupt_checkpoint_gets_advice_in_every_mode(runs, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(runs["stopped"], workdir)
  assert _steps(workdir) == [2, 4]
  for dirpath, _, filenames in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
    for name in filenames:
      if "ocdbt" in dirpath or os.sep + "d" in dirpath:  # the array data: cut in half
        path = os.path.join(dirpath, name)
        os.truncate(path, os.path.getsize(path) // 2)
  folder = os.path.join(workdir, "checkpoints", "4")
  want = (f"Checkpoint {folder} is unreadable", f"mv {folder} {folder}.corrupt",
          "step 2, the newest older checkpoint, is then used")
  result = _main(runs["args"] + [f"--workdir={workdir}", "--mode=sample"], runs["env"])
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert all(w in _last_line(result.stderr) for w in want), _last_line(result.stderr)

  from simflow_jax import checkpoint
  from simflow_jax.commands import train  # training gives the same advice, before any compile
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.run(_config(runs), workdir)
  assert all(w in str(error.value) for w in want)


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # From another directory: the config path is found in the repository, the misspelt field
  # is one line (flag parsing fails before main runs).
  result = _main(["--config=configs/tiny.py", "--config.train.num_stepz=3"], env, cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.strip() == ('Error: --config.train.num_stepz: no such config field '
                                   '(configs/base.py lists them all). Did you mean "num_steps" '
                                   'instead of "num_stepz"?')
  result = _main(["--config=configs/missing.py"], env, cwd=tmp_path)
  assert result.returncode == 2 and result.stderr.startswith("Error: --config=configs/missing.py: no file")
  assert len(result.stderr.strip().splitlines()) == 1


def test_bad_sample_classes_are_refused_before_anything_is_written(tmp_path):
  from configs import tiny
  from simflow_jax.commands import train
  config = tiny.get_config()
  with config.unlocked():
    config.sample.classes = (3, 12)
  with pytest.raises(ValueError, match=r"config.sample.classes=\(3, 12\): class ids \[12\] are "
                                       r"outside \[0, 10\)"):
    train.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  sys.path.insert(0, ROOT)
  import main
  assert main._is_user_error(_raised(config), (ValueError,))  # main.py: one line, exit code 2


def _raised(config):
  from simflow_jax.commands import train
  try:
    train.run(config, "/nonexistent/never_written")
  except ValueError as e:
    return e
  raise AssertionError("no error")


def test_default_workdir_is_named_after_the_config():
  sys.path.insert(0, ROOT)
  import main
  assert main.default_workdir(os.path.join(ROOT, "configs", "demo.py")) == "/tmp/simflow_demo"
  assert main.default_workdir("configs/imagenet256.py:learned_variance") == \
      "/tmp/simflow_imagenet256_learned_variance"
  assert not main._is_user_error(_builtin_error(), (ValueError,))  # a bug keeps its traceback


def _builtin_error():
  try:
    int("not a number")
  except ValueError as e:
    return e
