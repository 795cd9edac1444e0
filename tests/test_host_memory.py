"""simflow_jax/host_memory.py: when main.py re-executes itself with glibc's malloc tunables
(the environment it decides on), and that it does so once, with the same arguments."""
import os
import subprocess
import sys
import textwrap

import pytest

from simflow_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = {"system": "linux", "glibc": (2, 36), "accelerator": ()}


def test_environ_gains_the_tunables_only_where_the_user_set_none():
  env = host_memory.keep_memory_environ({"A": "1"}, **LINUX)
  assert env == {"A": "1", "GLIBC_TUNABLES": host_memory.TUNABLES}
  kept = host_memory.keep_memory_environ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, **LINUX)
  assert kept["GLIBC_TUNABLES"] == "glibc.rtld.nns=2:" + host_memory.TUNABLES
  for environ, overrides in [
      ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, {}),  # the user's malloc: left alone
      ({"GLIBC_TUNABLES": host_memory.TUNABLES}, {}),        # already re-executed
      ({}, {"glibc": (2, 25)}),                              # no such tunables yet
      ({}, {"glibc": ()}),                                   # musl, or unknown
      ({}, {"system": "darwin"}),
      ({}, {"accelerator": ("/dev/accel0",)}),              # a TPU host
      ({}, {"accelerator": ("/dev/nvidia0",)}),             # a GPU host
      ({"JAX_PLATFORMS": "tpu,cpu"}, {}),
      ({"JAX_PLATFORMS": "cuda"}, {"accelerator": ()}),
  ]:
    assert host_memory.keep_memory_environ(environ, **{**LINUX, **overrides}) is None, (environ, overrides)


def test_cpu_backend_decision():
  assert host_memory.cpu_backend({}, accelerator=())
  assert host_memory.cpu_backend({"JAX_PLATFORMS": "cpu"}, accelerator=("/dev/nvidia0",))
  assert host_memory.cpu_backend({"JAX_PLATFORM_NAME": "cpu"}, accelerator=("libtpu",))
  assert not host_memory.cpu_backend({}, accelerator=("/dev/accel0",))
  assert not host_memory.cpu_backend({}, accelerator=("libtpu",))
  assert not host_memory.cpu_backend({"JAX_PLATFORMS": "cuda,cpu"}, accelerator=())
  assert not host_memory.cpu_backend({"JAX_PLATFORMS": "tpu"}, accelerator=())
  kept = host_memory.keep_memory_environ({"JAX_PLATFORMS": "cpu"}, accelerator=("/dev/accel0",),
                                         **{k: v for k, v in LINUX.items() if k != "accelerator"})
  assert kept is not None and kept["GLIBC_TUNABLES"] == host_memory.TUNABLES


def _clean_env():
  env = dict(os.environ)
  env.pop("GLIBC_TUNABLES", None)
  env["PYTHONPATH"] = ROOT
  return env


needs_glibc = pytest.mark.skipif(host_memory.keep_memory_environ({}) is None,
                                 reason="needs Linux with glibc >= 2.26")


@needs_glibc
def test_reexec_happens_once_with_the_same_arguments():
  script = textwrap.dedent("""
      import os, sys
      print("start", os.getpid(), flush=True)
      from simflow_jax import host_memory
      host_memory.reexec_keeping_memory()
      print("args", sys.argv[1:], os.environ["GLIBC_TUNABLES"], flush=True)
  """)
  out = subprocess.run([sys.executable, "-u", "-c", script, "x", "--flag=2"], env=_clean_env(),
                       capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
  starts = [line for line in out if line.startswith("start")]
  assert len(starts) == 2 and len(set(starts)) == 1, out  # two starts, one pid: exec, not a child
  assert out[-1] == f"args ['x', '--flag=2'] {host_memory.TUNABLES}", out
  assert sum(line.startswith("args") for line in out) == 1, out
