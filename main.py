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
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-node GPU: this process's index.")

# mode -> (module, function(config, workdir))
MODES = {
    "train": ("simflow_jax.train", "train_and_evaluate"),
    "sample": ("simflow_jax.export", "run"),
    "likelihood": ("simflow_jax.likelihood", "run"),
    "evaluate": ("simflow_jax.evaluate", "run"),
    "dry_run": ("simflow_jax.dry_run", "run"),
    "study": ("simflow_jax.study", "run"),
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_quiet_orbax)
  import jax  # after flag parsing, so XLA_FLAGS from the environment apply

  from simflow_jax import sharding
  if _MODE.value != "dry_run":
    if _NUM_PROCESSES.value is not None:
      sharding.initialize_distributed(_NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
      sharding.maybe_initialize_distributed()
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  if "GLIBC_TUNABLES" in os.environ:  # simflow_jax/host_memory.py
    logging.info("GLIBC_TUNABLES=%s", os.environ["GLIBC_TUNABLES"])
  workdir = _WORKDIR.value or default_workdir(config_flags.get_config_filename(flags.FLAGS["config"]))
  logging.info("Mode %s, workdir %s", _MODE.value, workdir)
  module, fn = MODES[_MODE.value]
  try:
    result = getattr(importlib.import_module(module), fn)(_CONFIG.value, workdir)
  except Exception as e:  # noqa: BLE001 - only the project's user-facing errors end here
    from simflow_jax import checkpoint, train
    if isinstance(e, train.Interrupted):
      _fail(e, 128 + e.signum, prefix="")    # 130 SIGINT, 143 SIGTERM: rerun to resume
    if isinstance(e, train.NonFiniteLossError):
      _fail(e, 1)
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
