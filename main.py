"""simflow-jax command line: train, sample, measure likelihood, evaluate, or price a run.

  python main.py                                        # the CPU demo (configs/demo.py) in /tmp/simflow_demo
  python main.py --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/NAME
  python main.py --config=... --workdir=DIR --mode=sample|likelihood|evaluate|dry_run
  overrides: --config.optim.lr_flow=3e-4 --config.train.num_steps=1000 ...
  variants:  --config=configs/imagenet256.py:learned_variance

Without --workdir a run writes to /tmp/simflow_<config name>[_<variant>] and logs it.
A config path is found relative to the current directory, else relative to the repository.

Exit codes: 0 done; 2 a user error (a misspelt or bad config field, a missing file, a checkpoint
that does not fit the config): one line on stderr saying what to change, no traceback;
130 / 143 training stopped by SIGINT / SIGTERM after saving a checkpoint (rerun to resume);
1 a non-finite loss (one line) or a bug (with its traceback).
A file-system error (a workdir that is a file or cannot be written, a read-only or full disk) is
a user error: one line naming the path and what to do, exit 2; the workdir is probed before any
mode starts. Multi-process runs (--num_processes, --process_id, --coordinator_address or
JAX_COORDINATOR_ADDRESS) have their flags checked before JAX starts, and give up with one line
after --distributed_timeout seconds when not every process joins. When a process of a running
multi-process job dies, JAX's coordination service ends the others after --heartbeat_timeout
seconds: they abort (a non-zero exit) with an error that names the missing task above a C++ stack
trace, which Python cannot replace (launch/README.md, "Preemption and multi-host stops").
"""
import importlib
import os
import sys
import traceback

if __name__ == "__main__":  # before JAX loads: glibc reads its tunables only at start-up
  from simflow_jax import host_memory
  host_memory.reexec_keeping_memory()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

REPO = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "demo.py"),
    "Config file (configs/*.py), optionally with ':argument'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and outputs (default: "
                               "/tmp/simflow_<config name>).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "evaluate", "dry_run", "study"],
                          "What to run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-node GPU: total processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-node GPU: this process's index, "
                                   "0 .. num_processes - 1 (0 runs the coordinator).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-node: HOST:PORT of process "
                                   "0's coordinator (default: $JAX_COORDINATOR_ADDRESS).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Multi-node: seconds to wait "
                                            "for every process to join before giving up.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", None, "Multi-node: seconds without a sign of life after which a process "
    "is declared dead and every other process ends with an error (default: "
    "$SIMFLOW_HEARTBEAT_TIMEOUT, else simflow_jax/sharding.py HEARTBEAT_TIMEOUT_S).")

# mode -> (module, function(config, workdir))
MODES = {
    "train": ("simflow_jax.commands.train", "run"),
    "sample": ("simflow_jax.commands.sample", "run"),
    "likelihood": ("simflow_jax.commands.likelihood", "run"),
    "evaluate": ("simflow_jax.commands.evaluate", "run"),
    "dry_run": ("simflow_jax.commands.dry_run", "run"),
    "study": ("simflow_jax.commands.study", "run"),
}
USAGE_EXIT = 2


class UsageError(Exception):
  """A user error found before main runs (flags, config file)."""


def _fail(message, code: int = USAGE_EXIT, prefix: str = "Error: "):
  """Prints `message` as one line on stderr and exits with `code`."""
  sys.stderr.write(prefix + " ".join(str(message).split()) + "\n")
  sys.stderr.flush()
  sys.exit(code)


def _split_config_arg(argv: list[str]) -> list[tuple[int, str, str]]:
  """(argv index, prefix, value) of each --config=PATH / --config PATH."""
  found = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      found.append((i, "--config=", arg[len("--config="):]))
    elif arg == "--config" and i + 1 < len(argv):
      found.append((i + 1, "", argv[i + 1]))
  return found


def resolve_config_path(argv: list[str]) -> list[str]:
  """argv with --config=PATH made absolute: PATH as given when it exists, else relative to the
  repository (so `--config=configs/tiny.py` works from any directory); a clear error if neither."""
  argv = list(argv)
  for i, prefix, value in _split_config_arg(argv):
    path, sep, arg = value.partition(":")
    if os.path.isfile(path):
      continue
    in_repo = os.path.join(REPO, path)
    if not os.path.isabs(path) and os.path.isfile(in_repo):
      argv[i] = f"{prefix}{in_repo}{sep}{arg}"
    else:
      raise UsageError(f"--config={value}: no file {path!r} here ({os.getcwd()}) or in the "
                       f"repository ({REPO}); pass a configs/*.py file, e.g. --config=configs/demo.py.")
  return argv


def _misspelt_override(argv: list[str], error: Exception) -> str:
  """The one-line message for a --config.a.b=... that names no field of the config."""
  try:
    config = flags.FLAGS["config"].value
  except Exception:  # noqa: BLE001 - the config itself failed: report the error as it is
    config = None
  text = str(error).replace("\\n", "\n")
  hint = text[text.find("Did you mean"):].strip("'\"") if "Did you mean" in text else ""
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    field = arg[len("--config."):].split("=", 1)[0]
    node = config
    for part in field.split("."):
      if node is None or not hasattr(node, "keys") or part not in node.keys():
        return f"--config.{field}: no such config field (configs/base.py lists them all). {hint}".strip()
      node = node[part]
  return ""


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors (exit 2) instead of tracebacks."""
  try:
    argv = resolve_config_path(argv)
    return flags.FLAGS(argv)
  except UsageError as e:
    _fail(e)
  except flags.Error as e:
    # A config file's ValueError arrives with its whole traceback in the text: keep its last line.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    _fail(first if len(lines) < 2 else f"{first} {lines[-1]}")
  except (AttributeError, KeyError) as e:
    message = _misspelt_override(argv, e)
    if not message:
      raise  # not a misspelt override: a bug in a config file, keep its traceback
    _fail(message)


def _is_user_error(e: BaseException, types: tuple) -> bool:
  """An error of `types` raised by a `raise` statement of this repository's code: a message
  written for the user. The same types raised inside a library, or by a failing builtin call
  in our code, are bugs and keep their traceback."""
  if not isinstance(e, types) or e.__traceback__ is None:
    return False
  import simflow_jax  # its folder: this repository, or site-packages when installed
  roots = (REPO + os.sep, os.path.dirname(os.path.abspath(simflow_jax.__file__)) + os.sep)
  frame = traceback.extract_tb(e.__traceback__)[-1]
  ours = os.path.abspath(frame.filename).startswith(roots)
  return ours and (frame.line or "").lstrip().startswith("raise ")


def default_workdir(config_arg: str) -> str:
  """/tmp/simflow_<config file name>[_<variant>] for --config=PATH[:variant]."""
  path, _, arg = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0] + (f"_{arg}" if arg else "")
  return os.path.join("/tmp", "simflow_" + "".join(c if c.isalnum() or c in "-_." else "_" for c in name))


def _quiet_orbax(record) -> bool:
  """orbax logs every checkpoint phase at INFO; keep its warnings and errors only."""
  return record.levelno >= 30 or "orbax" not in record.pathname


def check_distributed_flags(num_processes, process_id, coordinator, timeout) -> None:
  """The multi-process flags, checked before JAX starts: ValueError saying what to set."""
  if timeout is not None and timeout < 1:
    raise ValueError(f"--distributed_timeout={timeout}: give the seconds to wait for the other "
                     "processes, >= 1.")
  if num_processes is None:
    if process_id is not None:
      raise ValueError(f"--process_id={process_id} needs --num_processes (the total number of "
                       "processes).")
    return
  if num_processes < 1:
    raise ValueError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is None:
    raise ValueError(f"--num_processes={num_processes} needs --process_id (this process's index, "
                     f"0 .. {num_processes - 1}).")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} is outside [0, {num_processes}): give each of the "
                     f"{num_processes} processes its own index 0 .. {num_processes - 1}.")
  if not coordinator:
    raise ValueError(f"--num_processes={num_processes} needs the coordinator's address: set "
                     "--coordinator_address=HOST:PORT or JAX_COORDINATOR_ADDRESS=HOST:PORT (the host "
                     "of process 0 and a free port, the same for every process).")


def initialize_distributed(jax, sharding) -> None:
  """jax.distributed.initialize for --num_processes (or a detected cluster), with a watchdog:
  when the other processes do not all join within --distributed_timeout seconds, one line says
  which coordinator this process waited on and for how long, and it exits 2 (JAX's own timeout
  aborts the process with a C++ stack trace, which Python cannot catch)."""
  import threading
  import time
  timeout = _DISTRIBUTED_TIMEOUT.value
  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  start = time.monotonic()
  where = coordinator or "the cluster's coordinator (detected from the environment)"

  def give_up():
    _fail(f"Waited {time.monotonic() - start:.0f} s (--distributed_timeout={timeout}) on {where} "
          f"for the other processes, but not all joined: start every process (each with its own "
          f"--process_id) with the same --num_processes and coordinator address, check that process "
          f"0's host and port can be reached, or raise --distributed_timeout.")

  def watchdog():
    if not done.wait(timeout):
      try:
        give_up()
      except SystemExit:
        os._exit(USAGE_EXIT)  # sys.exit in a thread ends only the thread

  done = threading.Event()
  threading.Thread(target=watchdog, daemon=True, name="distributed_timeout").start()
  try:
    if _NUM_PROCESSES.value is not None:
      sharding.initialize_distributed(_NUM_PROCESSES.value, _PROCESS_ID.value, coordinator,
                                      initialization_timeout=timeout)
    else:
      sharding.maybe_initialize_distributed(initialization_timeout=timeout)
  finally:
    done.set()


def check_workdir(workdir) -> None:
  """Fails before any work when the workdir cannot be written (every mode writes there)."""
  from simflow_jax import files
  try:
    files.check_writable_dir(workdir)
  except files.UnwritableDirError as e:
    _fail(e)


def file_system_error(e: BaseException):
  """The one-line message for an OSError a user can fix (not a directory, no permission,
  read-only, disk full), wherever it was raised, or None (a bug keeps its traceback). Follows
  the exception's causes: a checkpoint library may wrap the OSError of a failed write."""
  from simflow_jax import files
  if _is_user_error(e, (Exception,)):
    return None  # our own message (raised while handling an OSError, say) says it better
  seen = 0
  while e is not None and seen < 8:
    if isinstance(e, OSError) and e.errno in files.USER_ERRNOS:
      return files.describe_os_error(e)
    message = files.describe_tensorstore_error(e)  # orbax writes through tensorstore
    if message:
      return message
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_quiet_orbax)
  try:
    check_distributed_flags(_NUM_PROCESSES.value, _PROCESS_ID.value,
                            _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"),
                            _DISTRIBUTED_TIMEOUT.value)
    if _HEARTBEAT_TIMEOUT.value is not None:
      if _HEARTBEAT_TIMEOUT.value < 1:
        raise ValueError(f"--heartbeat_timeout={_HEARTBEAT_TIMEOUT.value}: give the seconds after "
                         "which a silent process is declared dead, >= 1.")
      os.environ["SIMFLOW_HEARTBEAT_TIMEOUT"] = str(_HEARTBEAT_TIMEOUT.value)  # read by sharding.py
  except ValueError as e:
    _fail(e)
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  check_workdir(workdir)
  import jax  # after flag parsing, so XLA_FLAGS from the environment apply

  from simflow_jax import sharding
  if _MODE.value != "dry_run":
    initialize_distributed(jax, sharding)
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  if "GLIBC_TUNABLES" in os.environ:  # simflow_jax/host_memory.py
    logging.info("GLIBC_TUNABLES=%s", os.environ["GLIBC_TUNABLES"])
  logging.info("Mode %s, workdir %s", _MODE.value, workdir)
  module, fn = MODES[_MODE.value]
  try:
    result = getattr(importlib.import_module(module), fn)(_CONFIG.value, workdir)
  except Exception as e:  # noqa: BLE001 - only the project's user-facing errors end here
    from simflow_jax import checkpoint, errors
    if isinstance(e, errors.Interrupted):
      _fail(e, 128 + e.signum, prefix="")    # 130 SIGINT, 143 SIGTERM: rerun to resume
    if isinstance(e, errors.NonFiniteLossError):
      _fail(e, 1)
    message = file_system_error(e)  # a full disk, a read-only or unwritable path
    if message:
      _fail(message)
    # Bad config values, missing files, a checkpoint that does not fit or is corrupt.
    if not _is_user_error(e, (ValueError, OSError, checkpoint.CheckpointError)):
      raise
    _fail(e)
  if isinstance(result, dict):
    logging.info("Result: %s", result)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
