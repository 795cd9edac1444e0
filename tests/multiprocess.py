"""Test harness: N local processes of main.py as one distributed JAX system on the CPU.

`run_main(args, processes=N)` starts `python main.py ARGS --num_processes=N --process_id=i`
for i < N with JAX_COORDINATOR_ADDRESS=localhost:<a free port> and
XLA_FLAGS=--xla_force_host_platform_device_count=<devices // N> plus the tests' speed flags
(conftest.SPEED_FLAGS), so N processes x devices/N simulated CPU devices form one system of
`devices` devices (processes=1 runs a plain single-process main.py on all of them). Every
process has a timeout; stdout and stderr of all are captured, and `check` (or a timeout)
raises an AssertionError that shows every process's exit code and output.

`start_main` returns the running `Processes` for tests that signal or kill some of them.

XLA:CPU's gloo collectives wait 30 s (fixed) for every peer the first time a program with
cross-process collectives runs; processes whose compiles drift further apart fail with
"Gloo context initialization failed". Run one distributed system at a time (no other
run beside it) so the N processes compile in step.
"""
import dataclasses
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "main.py")
DEFAULT_TIMEOUT_S = 900


def free_port() -> int:
  """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str


def report(results: list[Result]) -> str:
  """Every process's exit code and output, for assertion messages."""
  parts = []
  for i, r in enumerate(results):
    parts.append(f"--- process {i}: exit {r.returncode}\n[stdout]\n{r.stdout[-4000:]}\n"
                 f"[stderr]\n{r.stderr[-8000:]}")
  return "\n".join(parts)


def _env(processes: int, devices: int, port: int, extra: dict | None) -> dict:
  import conftest  # the speed flags of the test session (tests/ is on sys.path under pytest)
  if devices % processes:
    raise ValueError(f"{devices} devices do not split over {processes} processes")
  env = dict(os.environ)
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices // processes} "
                      f"{conftest.SPEED_FLAGS}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  if processes > 1:
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{port}"
  env.update(extra or {})
  return env


class Processes:
  """The running processes of one distributed run (see the module docstring)."""

  def __init__(self, args: list[str], processes: int = 2, devices: int = 8,
               env: dict | None = None, cwd: str | None = None, logdir: str | None = None):
    self.logdir = logdir
    port = free_port()
    environ = _env(processes, devices, port, env)
    self.procs, self._files = [], []
    for i in range(processes):
      argv = [sys.executable, MAIN, *args]
      if processes > 1:
        argv += [f"--num_processes={processes}", f"--process_id={i}"]
      # Files, not pipes: a process blocked on a full pipe would hang the whole system.
      out = open(os.path.join(logdir, f"p{i}.out"), "w+") if logdir else subprocess.PIPE
      err = open(os.path.join(logdir, f"p{i}.err"), "w+") if logdir else subprocess.PIPE
      self._files.append((out, err))
      self.procs.append(subprocess.Popen(argv, env=environ, cwd=cwd or REPO, stdout=out, stderr=err,
                                         text=True))

  def signal(self, signum: int, which=None) -> None:
    for i, p in enumerate(self.procs):
      if (which is None or i in which) and p.poll() is None:
        p.send_signal(signum)

  def wait(self, timeout: float = DEFAULT_TIMEOUT_S) -> list[Result]:
    """Waits for all (killing every one still running after `timeout` seconds in all)."""
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        timed_out = True
        break
    if timed_out:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
      for p in self.procs:
        p.wait()
    results = []
    for p, (out, err) in zip(self.procs, self._files):
      if self.logdir:
        out.seek(0)
        err.seek(0)
        texts = out.read(), err.read()
        out.close()
        err.close()
      else:
        texts = p.stdout.read(), p.stderr.read()
      results.append(Result(p.returncode, *texts))
    if timed_out:
      raise AssertionError(f"Processes still running after {timeout} s (killed):\n{report(results)}")
    return results

  def kill_all(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()


def start_main(args: list[str], processes: int = 2, devices: int = 8, env: dict | None = None,
               logdir: str | None = None) -> Processes:
  return Processes(args, processes, devices, env, logdir=logdir)


def run_main(args: list[str], processes: int = 2, devices: int = 8, timeout: float = DEFAULT_TIMEOUT_S,
             check: bool = True, env: dict | None = None, logdir: str | None = None) -> list[Result]:
  """Runs main.py ARGS as `processes` processes of one system; AssertionError (with every
  process's output) unless all exit 0, when `check`."""
  procs = Processes(args, processes, devices, env, logdir=logdir)
  try:
    results = procs.wait(timeout)
  finally:
    procs.kill_all()
  if check and any(r.returncode != 0 for r in results):
    raise AssertionError(f"main.py {' '.join(args)} failed:\n{report(results)}")
  return results

