"""The evaluators a config declares (big_vision style): config.evals.NAME = dict(type=..., ...).

Each entry (configs/base.py: EVAL_TYPES lists the types and their fields with defaults; build's
validate_config checks them) becomes one evaluator object, built once from the config with
the models and the mesh, holding its jitted functions:

  evaluator.run(params) -> {metric: value}     params: the generator {'vae', 'flow', ...}
  evaluator.figures() -> {file name: paint(local path)}   of its last run (may be empty)

`build_evaluators` builds them; `--mode=evaluate` runs them all (`evaluate_checkpoint`:
WORKDIR/eval/report.json is {NAME: {metric: value}}, beside each evaluator's figures),
`--mode=likelihood` those of type likelihood, and the training loop those whose every_steps
is due (`due`, `scalars`: logged as eval/NAME/metric).
"""
import json
import os
import tempfile
import time
from typing import Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from configs import base
from simflow_jax import checkpoint, sharding
from simflow_jax.evals import context, generation, likelihood, vae_evals
from simflow_jax.models import build

TYPES = {
    "generation": generation.GenerationEvaluator,
    "reconstruction": vae_evals.ReconstructionEvaluator,
    "likelihood": likelihood.LikelihoodEvaluator,
    "latent_stats": vae_evals.LatentStatsEvaluator,
    "robustness": vae_evals.RobustnessEvaluator,
    "interpolation": vae_evals.InterpolationEvaluator,
}
assert set(TYPES) == set(base.EVAL_TYPES), "configs/base.EVAL_TYPES and TYPES must agree"


def entries(config, types: Optional[tuple] = None, periodic: bool = False) -> dict:
  """NAME -> entry (its type's defaults filled in) of the evaluators to build."""
  out = {}
  for name, entry in sorted(config.evals.items()):
    full = base.evaluator(entry.type, **{k: v for k, v in entry.items() if k != "type"})
    if (types is None or full.type in types) and (not periodic or full.every_steps > 0):
      out[name] = full
  return out


def build_evaluators(config, models, mesh, workdir: str, types: Optional[tuple] = None,
                     periodic: bool = False) -> dict:
  """NAME -> evaluator for config.evals (only `types` if given; only those with every_steps > 0
  when periodic)."""
  ctx = context.Context(config=config, models=models, mesh=mesh, workdir=workdir)
  return {name: TYPES[entry.type](name, entry, ctx)
          for name, entry in entries(config, types, periodic).items()}


def due(evaluators: dict, step: int) -> dict:
  """The evaluators whose every_steps divides `step`."""
  return {n: e for n, e in evaluators.items() if e.entry.every_steps and step % e.entry.every_steps == 0}


def run_all(evaluators: dict, params) -> dict:
  """{NAME: {metric: value}} of every evaluator on `params` (on the mesh), logged with its time."""
  report = {}
  for name, ev in evaluators.items():
    t0 = time.time()
    report[name] = ev.run(params)
    logging.info("Evaluator %s (%s): %.1fs", name, ev.entry.type, time.time() - t0)
  return report


def scalars(report: dict) -> dict:
  """The report's numbers as {'eval/NAME/metric': float} (notes and labels left out)."""
  return {f"eval/{name}/{k}": float(v) for name, metrics in report.items()
          for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def evaluate_checkpoint(config, workdir: str, types: Optional[tuple] = None,
                        out_dir: Optional[str] = None) -> dict:
  """Runs the declared evaluators (only `types` if given) on WORKDIR's latest checkpoint
  (EMA parameters unless sample.use_ema=False) and writes OUT_DIR/report.json and the
  figures (OUT_DIR: WORKDIR/eval). Returns the report {NAME: {metric: value}}."""
  models = build.build_models(config)
  params = checkpoint.load_params(workdir, config)
  step = checkpoint.latest_step(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(jax.tree.map(np.asarray, params), sharding.replicated(mesh))  # across processes
  evaluators = build_evaluators(config, models, mesh, workdir, types)
  if not evaluators:
    raise ValueError(f"config.evals declares no evaluator{' of type ' + '/'.join(types) if types else ''}: "
                     "add one, e.g. configs/base.evaluator('likelihood').")
  t0 = time.time()
  report = context.finite_or_none(run_all(evaluators, params))
  out = epath.Path(out_dir or epath.Path(workdir) / "eval")
  if jax.process_index() == 0:
    painters = {f: p for ev in evaluators.values() for f, p in ev.figures().items()}
    write_outputs(out, report, painters, {"checkpoint_step": step, "workdir": str(workdir),
                                          "use_ema": bool(config.sample.use_ema),
                                          "seconds": time.time() - t0})
  return report


def write_outputs(out_dir, report: dict, painters: dict, meta: dict) -> None:
  """Draws each figure locally (matplotlib/Pillow need a local file) and copies it to out_dir
  (any epath: local or gs://); then writes report.json and meta.json (what was evaluated)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="simflow_eval_") as tmp:
    for name, paint in painters.items():
      local = os.path.join(tmp, name)
      paint(local)
      with open(local, "rb") as f:
        (out_dir / name).write_bytes(f.read())
  (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
  (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
  logging.info("Evaluation report written to %s", out_dir / "report.json")
