"""main.py's edges, in subprocesses: a workdir that cannot be written and bad multi-process flags
are one `Error:` line and exit 2 before any work (no JAX start, no training); a peer that never
comes ends the wait after --distributed_timeout with one line naming the coordinator. Also the
file-system error messages of simflow_jax/files.py."""
import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from simflow_jax import files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(args, timeout=300, env=None):
  env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
  start = time.monotonic()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config=configs/tiny.py",
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  return proc, time.monotonic() - start


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_workdir_that_is_a_file(tmp_path):
  workdir = tmp_path / "run"
  workdir.write_text("I am a file")
  proc, _ = _main([f"--workdir={workdir}"])
  line = _one_error_line(proc)
  assert str(workdir) in line and "not a directory" in line
  assert "JAX" not in proc.stderr  # refused before JAX started (main logs its version)
  assert workdir.read_text() == "I am a file"


def test_workdir_under_a_file(tmp_path):
  (tmp_path / "file").write_text("x")
  workdir = tmp_path / "file" / "run"  # ENOTDIR, for root too
  line = _one_error_line(_main([f"--workdir={workdir}"])[0])
  assert str(tmp_path / "file") in line and "Not a directory" in line


def test_workdir_that_cannot_be_created():
  line = _one_error_line(_main(["--workdir=/proc/simflow_no_such/run"])[0])
  assert "/proc/simflow_no_such/run" in line and "choose another --workdir" in line


def test_read_only_workdir(tmp_path):
  workdir = tmp_path / "ro"
  workdir.mkdir()
  os.chmod(workdir, 0o500)
  try:
    probe = workdir / "probe"
    try:
      probe.write_text("x")
      probe.unlink()
      pytest.skip("this user (root) writes into a read-only folder anyway; "
                  "test_workdir_under_a_file and test_workdir_that_cannot_be_created cover it")
    except PermissionError:
      pass
    line = _one_error_line(_main([f"--workdir={workdir}"])[0])
    assert str(workdir) in line and "Permission denied" in line
  finally:
    os.chmod(workdir, 0o700)


@pytest.mark.parametrize("args,words", [
    (["--num_processes=2", "--process_id=5", "--coordinator_address=localhost:1"],
     "--process_id=5 is outside [0, 2)"),
    (["--num_processes=2", "--process_id=-1", "--coordinator_address=localhost:1"],
     "--process_id=-1 is outside [0, 2)"),
    (["--num_processes=2", "--process_id=0"], "JAX_COORDINATOR_ADDRESS"),
    (["--num_processes=2"], "needs --process_id"),
    (["--process_id=1"], "needs --num_processes"),
    (["--num_processes=2", "--process_id=0", "--coordinator_address=localhost:1",
      "--distributed_timeout=0"], "--distributed_timeout=0"),
])
def test_bad_multi_process_flags(tmp_path, args, words):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COORDINATOR_ADDRESS"}
  proc, _ = _main([f"--workdir={tmp_path / 'run'}", *args], env=env)
  assert words in _one_error_line(proc)


def test_peer_never_comes(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  address = f"localhost:{port}"
  proc, seconds = _main([f"--workdir={tmp_path / 'run'}", "--num_processes=2", "--process_id=0",
                         f"--coordinator_address={address}", "--distributed_timeout=5"], timeout=120)
  line = _one_error_line(proc)
  assert address in line and "Waited 5 s" in line and "--distributed_timeout" in line
  assert seconds < 60


def test_os_error_messages():
  e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/checkpoints/7")
  message = files.describe_os_error(e)
  assert message.startswith("/data/run/checkpoints/7: No space left on device") and "rerun" in message
  assert "read-only" in files.describe_os_error(OSError(errno.EROFS, "Read-only file system", "/x"))
  text = ('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/4.orbax-checkpoint-tmp/state'
          '/_sharding": Failed to write 100 bytes to file 14: No space left on device '
          "[os_error_code='28']")
  assert files.describe_tensorstore_error(ValueError(text)).startswith(
      "/w/checkpoints: No space left on device (")
  assert files.describe_tensorstore_error(ValueError("shapes do not match")) is None
  assert files.describe_tensorstore_error(ValueError("[os_error_code='2']")) is None  # ENOENT: not ours


def test_check_writable_dir(tmp_path):
  files.check_writable_dir(tmp_path / "a" / "b")
  assert not (tmp_path / "a").exists()  # the folders it made and the probe are removed again
  (tmp_path / "kept").mkdir()
  files.check_writable_dir(tmp_path / "kept")
  assert (tmp_path / "kept").is_dir() and not os.listdir(tmp_path / "kept")
  (tmp_path / "f").write_text("x")
  for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
    with pytest.raises(files.UnwritableDirError, match=str(tmp_path / "f")):
      files.check_writable_dir(bad)


@pytest.mark.parametrize("override", ["train.keep_ckpts=0", pytest.param("train.ckpt_every=0", marks=pytest.mark.slow)])
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
