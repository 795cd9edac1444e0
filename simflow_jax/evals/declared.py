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

`evaluate_checkpoint` restores the generator's parameters alone, split over the mesh as the
mesh rules say (checkpoint.restore_generator_params), and stops on SIGINT / SIGTERM
(signals.py) between evaluators or between the batches of an evaluator's passes: each
finished evaluator's result is kept in OUT_DIR/partial.json (written atomically, with the
checkpoint step and the settings it was computed with), and a rerun with the same checkpoint
and settings skips those evaluators. partial.json is removed once report.json is written.
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
from jax.experimental import multihost_utils

from configs import base
from simflow_jax import checkpoint, files, progress, sharding, signals
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
                     periodic: bool = False, stop: Optional[signals.StopOnSignal] = None) -> dict:
  """NAME -> evaluator for config.evals (only `types` if given; only those with every_steps > 0
  when periodic). With `stop`, their passes end with progress.Stopped between batches once a
  stop is agreed."""
  ctx = context.Context(config=config, models=models, mesh=mesh, workdir=workdir, stop=stop)
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


PARTIAL_NAME = "partial.json"


def _jsonable(tree):
  return json.loads(json.dumps(tree, default=list, sort_keys=True))


def _settings(config, step: int) -> dict:
  """What decides every evaluator's result besides its own entry: resuming needs it unchanged."""
  return _jsonable({"checkpoint_step": int(step), "use_ema": bool(config.sample.use_ema),
                    "seed": int(config.seed), "model": checkpoint.fingerprint(config),
                    "data": config.data.to_dict(), "sample": config.sample.to_dict(),
                    "eval": config.eval.to_dict()})


def _finished(out: epath.Path, settings: dict, evaluators: dict) -> dict:
  """NAME -> result of the evaluators partial.json holds for these settings and entries.
  Process 0 decides which and tells the others, so every process skips the same ones (each
  reads the results from the file, which process 0 wrote before it stopped)."""
  path = out / PARTIAL_NAME
  try:
    partial = json.loads(path.read_text()) if path.exists() else {}
  except ValueError:  # cut short by hand: nothing to resume
    partial = {}
  done = partial.get("done", {}) if partial.get("settings") == settings else {}
  names = sorted(evaluators)
  flags = np.asarray([n in done and done[n].get("entry") == _jsonable(evaluators[n].entry.to_dict())
                      for n in names], np.int32)
  if jax.process_count() > 1:
    flags = multihost_utils.broadcast_one_to_all(flags)
  return {n: done[n]["result"] for n, f in zip(names, flags) if f}


def _write_partial(out: epath.Path, settings: dict, evaluators: dict, report: dict) -> None:
  partial = {"settings": settings,
             "done": {name: {"entry": _jsonable(evaluators[name].entry.to_dict()), "result": r}
                      for name, r in report.items()}}
  text = json.dumps(partial, indent=2, sort_keys=True)
  files.write_atomic(out / PARTIAL_NAME, lambda tmp: epath.Path(tmp).write_text(text))


def evaluate_checkpoint(config, workdir: str, types: Optional[tuple] = None,
                        out_dir: Optional[str] = None) -> dict:
  """Runs the declared evaluators (only `types` if given) on WORKDIR's latest checkpoint
  (EMA parameters unless sample.use_ema=False) and writes OUT_DIR/report.json and the
  figures (OUT_DIR: WORKDIR/eval). Returns the report {NAME: {metric: value}}. Resumable
  (module docstring): a signal stops it with errors.Interrupted, the finished evaluators kept."""
  models = build.build_models(config)
  mesh = sharding.make_mesh(config.mesh)
  params = checkpoint.restore_generator_params(workdir, config, mesh,
                                               use_ema=bool(config.sample.use_ema))
  step = checkpoint.latest_step(workdir, config)
  out = epath.Path(out_dir or epath.Path(workdir) / "eval")
  with signals.StopOnSignal("evaluator batch", "keep the finished evaluators") as stop:
    evaluators = build_evaluators(config, models, mesh, workdir, types, stop=stop)
    if not evaluators:
      raise ValueError(f"config.evals declares no evaluator{' of type ' + '/'.join(types) if types else ''}: "
                       "add one, e.g. configs/base.evaluator('likelihood').")
    settings = _settings(config, step)
    kept = _finished(out, settings, evaluators)
    if kept:
      logging.info("Resuming the evaluation: %s already done in %s", ", ".join(sorted(kept)),
                   out / PARTIAL_NAME)
    t0 = time.time()
    report = {}
    try:
      for k, (name, ev) in enumerate(evaluators.items()):
        if name in kept:
          report[name] = kept[name]
          continue
        if signals.stop_agreed(stop):
          raise progress.Stopped(name)
        t1 = time.time()
        logging.info("Evaluator %s (%s), %d of %d", name, ev.entry.type, k + 1, len(evaluators))
        report[name] = context.finite_or_none(ev.run(params))
        logging.info("Evaluator %s (%s): %.1fs", name, ev.entry.type, time.time() - t1)
        if jax.process_index() == 0:
          write_figures(out, ev.figures())
          _write_partial(out, settings, evaluators, report)
    except progress.Stopped:
      multihost_utils.sync_global_devices("simflow_evaluate_stopped")  # process 0 wrote
      done = [n for n in evaluators if n in report]
      raise stop.interrupted(
          f"kept the results of {len(done)} of {len(evaluators)} evaluators "
          f"({', '.join(done) or 'none'}) in {out / PARTIAL_NAME}; rerun the same command to "
          "resume (the finished evaluators are skipped).") from None
  if jax.process_index() == 0:
    write_outputs(out, report, {}, {"checkpoint_step": step, "workdir": str(workdir),
                                    "use_ema": bool(config.sample.use_ema),
                                    "seconds": time.time() - t0})
    (out / PARTIAL_NAME).unlink(missing_ok=True)
  return report


def write_figures(out_dir, painters: dict) -> None:
  """Draws each figure locally (matplotlib/Pillow need a local file) and copies it to out_dir
  (any epath: local or gs://)."""
  out_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="simflow_eval_") as tmp:
    for name, paint in painters.items():
      local = os.path.join(tmp, name)
      paint(local)
      with open(local, "rb") as f:
        (out_dir / name).write_bytes(f.read())


def write_outputs(out_dir, report: dict, painters: dict, meta: dict) -> None:
  """Draws each figure locally (matplotlib/Pillow need a local file) and copies it to out_dir
  (any epath: local or gs://); then writes report.json and meta.json (what was evaluated)."""
  write_figures(out_dir, painters)
  (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
  (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
  logging.info("Evaluation report written to %s", out_dir / "report.json")
