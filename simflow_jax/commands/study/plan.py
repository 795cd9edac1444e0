"""The study's plan: its settings, the rows, and one job per row-seed with its configs and
workdirs (stage 1 included)."""
import copy
import json
import os

from absl import logging

from configs import variants
from simflow_jax.models import build


class StudyError(ValueError):
  pass


def settings(config, log: bool = False) -> dict:
  """The study's knobs; study.quick replaces steps, seeds, num_eval_examples, the generation
  evaluators' num_samples and empty rows with the study.quick_* values (each replacement is
  logged when `log`)."""
  st = config.study
  out = {"steps": int(st.steps), "seeds": tuple(int(s) for s in st.seeds),
         "num_eval_examples": int(st.num_eval_examples), "num_samples": None,
         "rows": tuple(st.rows), "workers": int(st.workers)}
  if st.quick:
    quick = {"steps": int(st.quick_steps), "seeds": tuple(int(s) for s in st.quick_seeds),
             "num_eval_examples": int(st.quick_num_eval_examples),
             "num_samples": int(st.quick_num_samples)}
    if not out["rows"]:
      quick["rows"] = tuple(st.quick_rows)
    for k, v in quick.items():
      if log and out[k] != v:
        logging.info("study.quick=True: %s %s -> %s (study.quick_%s)", k, out[k], v, k)
    out.update(quick)
  if out["workers"] < 1:
    raise StudyError(f"config.study.workers must be >= 1 (processes running row-seeds at once), "
                     f"got {out['workers']}.")
  if out["steps"] < 2 or not out["seeds"]:
    raise StudyError(f"config.study.steps must be >= 2 and config.study.seeds non-empty, got "
                     f"{out['steps']} and {out['seeds']}.")
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


def table_order(rows: list) -> list:
  return sorted(rows, key=lambda row: list(variants.ROWS).index(row.name))


def _stage1_steps(steps: int, fraction: float) -> int:
  return min(max(int(round(steps * fraction)), 1), steps - 1)


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


def plan(config, workdir: str) -> list:
  """One entry per row-seed: its configs and workdirs, stage 1 included."""
  s = settings(config)
  frac = float(config.study.stage1_fraction)
  if not 0.0 < frac < 1.0:
    raise StudyError(f"config.study.stage1_fraction must be in (0, 1), got {frac}.")
  base = copy.deepcopy(config)
  base.eval.classifier_dir = os.path.join(workdir, "study", "classifier")
  with base.unlocked():  # every evaluation sees the same eval-split examples
    for entry in base.evals.values():
      entry.num_examples = s["num_eval_examples"]
      if entry.type == "generation" and s["num_samples"] is not None:
        entry.num_samples = s["num_samples"]
  jobs = []
  for seed in s["seeds"]:  # seed-major: a partial study has every row of the first seeds
    for row in resolve_rows(config):
      job = {"row": row, "seed": seed, "dir": os.path.join(workdir, "rows", row.name, f"seed{seed}"),
             "stage1": None}
      if row.stage1:
        n1 = _stage1_steps(s["steps"], frac)
        s1_dir = os.path.join(workdir, "stage1", row.stage1, f"seed{seed}")
        job["stage1"] = {"dir": s1_dir, "config": _run_config(base, row.stage1, seed, n1)}
        job["config"] = _run_config(base, row.name, seed, s["steps"] - n1, s1_dir)
      else:
        job["config"] = _run_config(base, row.name, seed, s["steps"])
      jobs.append(job)
  return jobs
