"""The study's plan: its settings, the rows, and one job per stage-1 VAE and per row-seed, with
its config and workdir.

Jobs, in the order they are listed (and run: the phases in __init__.py):
  kind 'stage1'  one per stage-1 preset a chosen row freezes (variants.STAGE1_ROWS): the VAE
                 trained alone (train.freeze='flow') for study.stage1_steps on study.seeds[0],
                 in DIR/stage1/<preset>/; shared by every row and seed that freezes it.
  kind 'row'     one per row and seed (the row's first variants.ROWS[row].seeds of
                 study.seeds), seed-major, in DIR/rows/<row>/seed<k>/; its flow trains for
                 study.steps with the config's optim.warmup_steps and optim.ema_decay in every
                 row (job['flow'] records them), a two-stage row starting from its stage-1 VAE.
"""
import copy
import json
import os

import ml_collections
from absl import logging

from configs import variants
from simflow_jax.models import build

MIN_PAIRED_SEEDS = 2  # a t interval needs n - 1 >= 1 degrees of freedom


class StudyError(ValueError):
  pass


def settings(config, log: bool = False) -> dict:
  """The study's knobs; study.quick replaces steps, stage1_steps, seeds, num_eval_examples, the
  generation evaluators' num_samples, pilot_min_class_acc and empty rows with the study.quick_*
  values (each replacement is logged when `log`)."""
  st = config.study
  out = {"steps": int(st.steps), "stage1_steps": int(st.stage1_steps),
         "seeds": tuple(int(s) for s in st.seeds), "num_eval_examples": int(st.num_eval_examples),
         "num_samples": None, "rows": tuple(st.rows), "workers": int(st.workers),
         "pilot": bool(st.pilot), "pilot_min_class_acc": float(st.pilot_min_class_acc)}
  if st.quick:
    quick = {"steps": int(st.quick_steps), "stage1_steps": int(st.quick_stage1_steps),
             "seeds": tuple(int(s) for s in st.quick_seeds),
             "num_eval_examples": int(st.quick_num_eval_examples),
             "num_samples": int(st.quick_num_samples),
             "pilot_min_class_acc": float(st.quick_pilot_min_class_acc)}
    if not out["rows"]:
      quick["rows"] = tuple(st.quick_rows)
    for k, v in quick.items():
      if log and out[k] != v:
        logging.info("study.quick=True: %s %s -> %s (study.quick_%s)", k, out[k], v, k)
    out.update(quick)
  if out["workers"] < 1:
    raise StudyError(f"config.study.workers must be >= 1 (processes running row-seeds at once), "
                     f"got {out['workers']}.")
  if out["steps"] < 2 or out["stage1_steps"] < 1 or not out["seeds"]:
    raise StudyError(f"config.study.steps must be >= 2, stage1_steps >= 1 and seeds non-empty, got "
                     f"{out['steps']}, {out['stage1_steps']} and {out['seeds']}.")
  if len(set(out["seeds"])) != len(out["seeds"]):
    raise StudyError(f"config.study.seeds must not repeat a seed, got {out['seeds']}.")
  return out


def resolve_rows(config) -> list:
  """The rows to run, in the order given (table order when none is given); unknown names are
  an error naming the known ones."""
  names = list(settings(config)["rows"]) or list(variants.ROWS)
  unknown = [n for n in names if n not in variants.ROWS]
  if unknown:
    raise StudyError(f"Unknown study row(s) {unknown}; choose from {tuple(variants.ROWS)} "
                     "(config.study.rows, or configs/study_digits.py:ROW1,ROW2).")
  return [variants.ROWS[n] for n in dict.fromkeys(names)]


def row_seeds(row, seeds: tuple) -> tuple:
  """The seeds a row runs: the first row.seeds of the study's."""
  return tuple(seeds[:row.seeds])


def check_pair(config) -> None:
  """The paired statistics need >= MIN_PAIRED_SEEDS seeds in both rows of variants.PAIR
  (when the study runs both)."""
  s = settings(config)
  rows = {r.name: r for r in resolve_rows(config)}
  if not all(name in rows for name in variants.PAIR):
    return
  shared = set.intersection(*(set(row_seeds(rows[n], s["seeds"])) for n in variants.PAIR))
  if len(shared) < MIN_PAIRED_SEEDS:
    key = "quick_seeds" if config.study.quick else "seeds"
    raise StudyError(f"The paired statistics of {' - '.join(variants.PAIR)} need at least "
                     f"{MIN_PAIRED_SEEDS} seeds of both rows, got {sorted(shared)}: give "
                     f"config.study.{key} at least {MIN_PAIRED_SEEDS} seeds.")


def table_order(rows: list) -> list:
  """Stage-1 VAEs first, then the rows in variants.ROWS order."""
  order = list(variants.STAGE1_ROWS) + list(variants.ROWS)
  return sorted(rows, key=lambda row: order.index(row.name))


def all_rows(config) -> list:
  """The chosen rows and the stage-1 VAEs they freeze, in table order."""
  rows = resolve_rows(config)
  stage1 = [variants.STAGE1_ROWS[p] for p in dict.fromkeys(r.stage1 for r in rows if r.stage1)]
  return table_order(stage1 + rows)


def _run_config(config, preset: str, seed: int, num_steps: int, vae_checkpoint: str = ""):
  c = copy.deepcopy(config)
  variants.apply_variant(c, preset)
  c.seed = seed
  c.train.num_steps = num_steps
  c.train.ckpt_every = num_steps
  c.train.vae_checkpoint = vae_checkpoint
  build.validate_config(c)  # each run's config once: its row's preset may conflict
  return c


def config_json(c) -> dict:
  """The parts of a run's config that define it (the study section is bookkeeping)."""
  d = json.loads(c.to_json_best_effort(sort_keys=True))
  d.pop("study", None)
  return d


STAGE1_EVAL_TYPES = ("reconstruction", "latent_stats", "robustness")  # a VAE alone: no flow


def plan(config, workdir: str) -> list:
  """The stage-1 jobs, then one job per row-seed (module docstring)."""
  s = settings(config)
  base = copy.deepcopy(config)
  base.eval.classifier_dir = os.path.join(workdir, "study", "classifier")
  with base.unlocked():  # every evaluation sees the same eval-split examples
    for entry in base.evals.values():
      entry.num_examples = s["num_eval_examples"]
      if entry.type == "generation" and s["num_samples"] is not None:
        entry.num_samples = s["num_samples"]
  stage1_base = copy.deepcopy(base)
  with stage1_base.unlocked():
    stage1_base.evals = ml_collections.ConfigDict(
        {n: e for n, e in base.evals.items() if e.type in STAGE1_EVAL_TYPES})
  rows = resolve_rows(config)
  jobs, stage1 = [], {}
  for row in all_rows(config):
    if row.name in variants.STAGE1_ROWS:
      d = os.path.join(workdir, "stage1", row.name)
      stage1[row.name] = {"dir": d, "config": _run_config(stage1_base, row.name, s["seeds"][0],
                                                          s["stage1_steps"])}
      jobs.append({"kind": "stage1", "row": row, "seed": s["seeds"][0], "dir": d,
                   "config": stage1[row.name]["config"], "stage1": None, "flow": None})
  for seed in s["seeds"]:  # seed-major: a partial study has every row of the first seeds
    for row in rows:
      if seed not in row_seeds(row, s["seeds"]):
        continue
      vae = stage1[row.stage1] if row.stage1 else None
      c = _run_config(base, row.name, seed, s["steps"], vae["dir"] if vae else "")
      jobs.append({"kind": "row", "row": row, "seed": seed,
                   "dir": os.path.join(workdir, "rows", row.name, f"seed{seed}"), "config": c,
                   "stage1": vae,
                   "flow": {"steps": int(c.train.num_steps), "warmup": int(c.optim.warmup_steps),
                            "ema_decay": float(c.optim.ema_decay)}})
  return jobs
