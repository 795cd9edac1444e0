"""`main.py --mode=likelihood`: the evaluators of type likelihood that config.evals declares
(evals/likelihood.py: exact flow bits/dim of mu and of x = mu + std * eps over the eval
split), on WORKDIR's latest checkpoint (EMA parameters unless sample.use_ema=False).

Writes WORKDIR/likelihood.json: {NAME: {metric: value}, 'notes': what each number means}.
"""
import json

import jax
from absl import logging
from etils import epath

from simflow_jax.evals import declared, likelihood
from simflow_jax.models import build


def run(config, workdir: str) -> dict:
  build.validate_config(config)
  report = declared.evaluate_checkpoint(config, workdir, types=("likelihood",),
                                        out_dir=str(epath.Path(workdir) / "eval" / "likelihood"))
  if jax.process_index() == 0:
    path = epath.Path(workdir) / "likelihood.json"
    path.write_text(json.dumps({**report, "notes": likelihood.NOTES}, indent=2, sort_keys=True))
    for name, r in report.items():
      logging.info("Likelihood %s on %s (%d examples): %.4f bits/dim (sampled, ELBO term), %.4f "
                   "(mu); written to %s", name, r["split"], r["num_examples"],
                   r["bits_per_dim_sampled"], r["bits_per_dim_mu"], path)
  return report
