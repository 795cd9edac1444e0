"""`main.py --mode=evaluate`: every evaluator config.evals declares, on WORKDIR's latest
checkpoint (EMA parameters unless sample.use_ema=False).

Writes WORKDIR/eval/report.json ({NAME: {metric: value}}; non-finite numbers as null), the
evaluators' figures (NAME.png) and meta.json (checkpoint step, parameters used) beside it.
The evaluator types and their fields: configs/base.py EVAL_TYPES, evals/declared.py.
"""
from simflow_jax.evals import declared
from simflow_jax.models import build


def run(config, workdir: str) -> dict:
  build.validate_config(config)
  return declared.evaluate_checkpoint(config, workdir)
