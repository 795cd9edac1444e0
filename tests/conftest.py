"""Test setup, before jax is imported anywhere: 8 simulated CPU devices, and settings for
speed (the tests compile far more than they run, and compiling dominates their time):

  --xla_backend_optimization_level=0   LLVM without optimisation: compiles about twice as fast;
                                       the tiny programs run a little slower, which costs nothing.
  --xla_cpu_use_fusion_emitters=false  XLA:CPU's older loop emitters: with the above, compiles
                                       faster again; at the
                                       default optimisation level they compile slower, so only tests
                                       set it. Dropped where this jaxlib does not know the flag (XLA
                                       aborts on unknown flags), checked once in a subprocess.
  --xla_cpu_multi_thread_eigen=false   one XLA CPU thread per process: the two xdist workers (and
                                       their subprocesses) on 2 cores do not fight over thread
                                       pools (as study.worker_xla_flags, configs/base.py).
  JAX_COMPILATION_CACHE_DIR            one persistent compilation cache for the whole session,
                                       made here (a fresh temporary folder, removed at the end)
                                       and inherited by the xdist workers and every subprocess,
                                       so a program compiled by one test (the tiny train step,
                                       the sampler) is loaded, not recompiled, by the next.
  GLIBC_TUNABLES                       glibc malloc keeps the memory it frees, as main.py sets up
                                       (simflow_jax/host_memory.py): the xdist workers and the
                                       main.py subprocesses start with it, so none re-executes.
Either is left alone when the variable is already set in the environment.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from simflow_jax import host_memory

_SPEED = "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"
OPTIONAL_FLAGS = "--xla_cpu_use_fusion_emitters=false"  # kept only where XLA knows it


def _xla_accepts(flags: str) -> bool:
  """Whether a jax process starts with XLA_FLAGS=flags (XLA aborts on a flag it does not know)."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, timeout=120, check=False)
  return probe.returncode == 0


if "XLA_FLAGS" not in os.environ:  # the controller: workers and subprocesses inherit its value
  _flags = f"--xla_force_host_platform_device_count=8 {_SPEED}"
  if _xla_accepts(f"{_flags} {OPTIONAL_FLAGS}"):
    _flags = f"{_flags} {OPTIONAL_FLAGS}"
  os.environ["XLA_FLAGS"] = _flags
# For tests that start jax subprocesses with flags of their own.
SPEED_FLAGS = f"{_SPEED} {OPTIONAL_FLAGS}" if OPTIONAL_FLAGS in os.environ["XLA_FLAGS"] else _SPEED
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_KEPT = host_memory.keep_memory_environ(os.environ)
if _KEPT is not None:
  os.environ["GLIBC_TUNABLES"] = _KEPT["GLIBC_TUNABLES"]
_MADE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the controller (workers inherit its value)
  _MADE_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="simflow_jax_test_xla_")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


# The files whose module fixtures take longest, longest first: with --dist loadfile and
# --no-loadscope-reorder (pytest.ini) the workers take files in this order, so the long ones
# start at once and the short files fill in around them (longest first, not by test count).
FIRST = ("test_study.py", "test_sample_cli.py", "test_multiprocess.py", "test_evaluate.py",
         "test_dry_run.py", "test_flow.py", "test_sample.py", "test_train.py", "test_train_step.py")


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: keeps the rest in order


def pytest_unconfigure(config):
  del config
  if _MADE_CACHE is not None:  # made by this process (the controller, or a lone run)
    shutil.rmtree(_MADE_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, worker_id) -> str:
  """A workdir holding configs/tiny.py trained for its 4 steps, shared by the CLI tests
  (evaluate, likelihood, sample, study, train). Built once per session: the first xdist
  worker to need it trains it under a file lock in the workers' common temporary folder,
  the other then finds it there. Tests read it (or copy it); none changes its checkpoints."""
  import filelock
  from configs import tiny
  from simflow_jax.commands import train
  root = tmp_path_factory.getbasetemp()
  if worker_id != "master":  # xdist: the workers' folders share this parent
    root = root.parent
  workdir = root / "tiny_trained"
  with filelock.FileLock(str(root / "tiny_trained.lock")):
    if not (workdir / "TRAINED").exists():
      train.run(tiny.get_config(), str(workdir))
      (workdir / "TRAINED").write_text("")
  return str(workdir)
