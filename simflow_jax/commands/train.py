"""`main.py --mode=train`: validates the config, then runs the training loop (trainer.py)."""
from simflow_jax import trainer
from simflow_jax.models import build


def run(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
  build.validate_config(config)  # before anything else: nothing is written for a refused config
  return trainer.train(config, workdir)
