"""simflow-jax command line: train, sample, measure likelihood, evaluate, or price a run.

  python main.py                                        # the CPU demo (configs/demo.py) in /tmp/simflow_demo
  python main.py --config=configs/imagenet256.py --workdir=gs://BUCKET/runs/NAME
  python main.py --config=... --workdir=DIR --mode=sample|likelihood|evaluate|dry_run
  overrides: --config.optim.lr_flow=3e-4 --config.train.num_steps=1000 ...
  variants:  --config=configs/imagenet256.py:learned_variance
"""
import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.py"),
    "Config file (configs/*.py), optionally with ':argument'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/simflow_demo", "Checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "likelihood", "evaluate", "dry_run", "study"],
                          "What to run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-node GPU: total processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-node GPU: this process's index.")

# mode -> (module, function(config, workdir))
MODES = {
    "train": ("simflow_jax.train", "train_and_evaluate"),
    "sample": ("simflow_jax.sample", "run"),
    "likelihood": ("simflow_jax.likelihood", "run"),
    "evaluate": ("simflow_jax.evaluate", "run"),
    "dry_run": ("simflow_jax.dry_run", "run"),
    "study": ("simflow_jax.study", "run"),
}


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
      jax.distributed.initialize(num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    else:
      sharding.maybe_initialize_distributed()
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  module, fn = MODES[_MODE.value]
  result = getattr(importlib.import_module(module), fn)(_CONFIG.value, _WORKDIR.value)
  if isinstance(result, dict):
    logging.info("Result: %s", result)


if __name__ == "__main__":
  app.run(main)
