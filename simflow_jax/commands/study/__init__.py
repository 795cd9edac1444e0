"""The paper's variant study (Sec. 4.3, Fig. 3a, 4, 5) on the embedded digits: `--mode=study`.

  python main.py --config=configs/study_digits.py --mode=study --workdir=DIR

The protocol (docs/study.md): every two-stage row starts from a VAE trained alone beforehand
(a stage-1 VAE: train.freeze='flow', study.stage1_steps, not charged to the flow), trained
ONCE per preset and shared by every row and seed that freezes it; in every row the flow gets
study.steps with the same warmup and EMA schedule (optim.*). Each job (plan.py) is trained with
the library's training loop (trainer.train) and measured with the evaluators the config
declares (evals/declared.py; configs/study_digits.py), in its own workdir:
  DIR/stage1/<preset>/       a stage-1 VAE (reconstruction and latents measured: its own row)
  DIR/rows/<row>/seed<k>/    a row-seed; study.json there marks it finished
Phases: (1) the pilot (SimFlow's first seed, with study.pilot) and the stage-1 VAEs; the line
"pilot: simflow seed K guided class accuracy A (target >= T): reached|missed" is printed, and
a miss stops the study there (StudyError: nothing else runs, the table is not rewritten);
(2) every other row-seed. Rerunning skips finished jobs; an existing workdir whose config
differs from the one the study would write is an error (nothing is overwritten): delete it,
or use another DIR.

The evaluation uses seed 0 for its own randomness (sampling noise, eval noise), so the digit
classifier, trained once in DIR/study/classifier (eval.classifier_dir), is shared by every row
and seed, and rows differ only by their trained models. The table reads report[NAME][metric]
(job.py METRICS); report.py adds the paired differences of variants.PAIR with their 95 %
intervals, the findings worded from them, and the floors (real held-out digits against real
training digits; the classifier's held-out accuracy; DIR/study/floors.json).

Outputs in DIR/study/: table.md, table.json (report.py), gen_fd.png (generation FD per row
with error bars), robustness.png (decoder PSNR under latent noise: the sigma_bar sweep against
learnable variance, end to end and the stage-1 VAE, Fig. 3a), latent_stats.png (Fig. 4, the
stage-1 VAEs included), samples/<row>.png, run_info.json (wall time, the pilot's line).
With config.study.workers = N > 1 the jobs of a phase run in N spawned worker processes
(pool.py); this process trains the classifier first, then writes the table, the figures and a
progress line with an ETA as results arrive. One jax process leaves part of a small CPU idle
(compiles, evaluation, small convolutions), so two workers shorten the study there.
The package by job: plan.py (settings, rows, jobs), job.py (one job), report.py (table and
figures), pool.py (worker processes), this file (the command, its phases, its progress line).
Compiled programs are cached in DIR/study/xla_cache (unless a JAX compilation cache is
already configured, e.g. by JAX_COMPILATION_CACHE_DIR), so seeds and reruns reuse them.
"""
import json
import os
import time

import jax
import numpy as np
from absl import logging

from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.commands.study import pool, report
from simflow_jax.data import mnist5k
from simflow_jax.evals import digits
from simflow_jax.models import build

StudyError = plan_lib.StudyError
PILOT_ROW = "simflow"


def run(config, workdir: str) -> dict:
  """`main.py --mode=study`: runs (or resumes) the study in `workdir`; returns table.json."""
  build.validate_config(config)
  if config.data.source != "mnist5k":
    raise StudyError(f"The study measures digits with the digit classifier: data.source must be "
                     f"'mnist5k', got {config.data.source!r}.")
  settings = plan_lib.settings(config, log=True)
  plan_lib.check_pair(config)
  jobs = plan_lib.plan(config, workdir)
  job_lib.check(jobs)
  out_dir = os.path.join(workdir, "study")
  os.makedirs(out_dir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # a cache the user configured is kept
    jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  t_start = time.time()
  clf = digits.get_digit_classifier(jobs[0]["config"].eval.classifier_dir,
                                    steps=config.eval.classifier_steps, seed=0)
  floors = write_floors(config, clf, settings, out_dir)
  todo = [i for i, job in enumerate(jobs) if not job_lib.done(job)]
  pilot = pilot_job(jobs, settings)
  first = [i for i in todo if i == pilot] + [i for i in todo if jobs[i]["kind"] == "stage1"]
  rest = [i for i in todo if i not in first]
  workers = min(settings["workers"], max(len(first), len(rest))) if todo else 1
  logging.info("Study: %d jobs (%d stage-1 VAEs) in %s (%d finished before), %d worker "
               "process(es); digit classifier val accuracy %.3f; real digits' FD floor %.2f",
               len(jobs), sum(j["kind"] == "stage1" for j in jobs), workdir,
               len(jobs) - len(todo), workers, clf.val_accuracy, floors["digit_fd_real"])
  progress = Progress(config, jobs, out_dir, settings, workers, t_start, floors)
  for i in range(len(jobs)):
    if i not in todo:
      progress.record(i, job_lib.run_job(jobs[i]), True, 0.0)
  _run_phase(config, workdir, jobs, first, workers, progress)
  if pilot is not None:
    progress.pilot_line = check_pilot(jobs[pilot], progress.results[pilot], settings)
  progress.writing = True
  progress.write()
  _run_phase(config, workdir, jobs, rest, workers, progress)
  logging.info("Study done in %.0f s (%d run, %d skipped): %s", time.time() - t_start,
               progress.ran, len(jobs) - progress.ran, os.path.join(out_dir, "table.md"))
  return progress.table


def _run_phase(config, workdir, jobs, todo, workers, progress) -> None:
  if not todo:
    return
  if min(workers, len(todo)) == 1:
    for i in todo:
      t0 = time.time()
      progress.record(i, job_lib.run_job(jobs[i]), False, time.time() - t0)
  else:
    pool.run_parallel(config, workdir, pool.units_of(jobs, todo), min(workers, len(todo)), progress)


def pilot_job(jobs: list, settings: dict):
  """The index of the pilot (SimFlow's first seed) when study.pilot and the study runs it."""
  if not settings["pilot"]:
    return None
  return next((i for i, j in enumerate(jobs) if j["kind"] == "row" and j["row"].name == PILOT_ROW
               and j["seed"] == settings["seeds"][0]), None)


def check_pilot(job: dict, result: dict, settings: dict) -> str:
  """Prints (and logs) the pilot's line; a miss is a StudyError (the study stops there)."""
  acc, target = result["metrics"]["class_acc"], settings["pilot_min_class_acc"]
  reached = acc is not None and acc >= target
  line = (f"pilot: {PILOT_ROW} seed {job['seed']} guided class accuracy "
          f"{'n/a' if acc is None else f'{acc:.3f}'} (target >= {target:g}): "
          f"{'reached' if reached else 'missed'}")
  print(line, flush=True)
  logging.info("%s", line)
  if not reached:
    raise StudyError(f"{line}: the study stopped before the other rows (nothing else was run or "
                     f"overwritten); train SimFlow longer (study.steps) or larger (flow.*), or set "
                     f"study.pilot=False to run the rest anyway.")
  return line


def write_floors(config, clf, settings: dict, out_dir: str) -> dict:
  """The floors (report.py): real held-out digits (the evaluations' eval-split examples)
  against every real training digit, in the classifier's features; DIR/study/floors.json."""
  d = config.data
  held, _ = mnist5k.load_mnist5k(d.eval_split, d.num_val)
  if settings["num_eval_examples"]:
    held = held[:settings["num_eval_examples"]]
  train, _ = mnist5k.load_mnist5k(d.train_split, d.num_val)
  to_float = lambda x: x.astype(np.float32) / 127.5 - 1.0
  floors = {"digit_fd_real": digits.digit_frechet_distance(clf, to_float(held), to_float(train)),
            "classifier_val_accuracy": float(clf.val_accuracy), "num_heldout": int(held.shape[0]),
            "num_train": int(train.shape[0])}
  with open(os.path.join(out_dir, report.FLOORS_FILE), "w") as f:
    json.dump(floors, f, indent=2)
  return floors


class Progress:
  """The parent's bookkeeping: a progress line with an ETA per job, and (once `writing`: after
  the pilot) the table, the figures and run_info.json rewritten after each one."""

  def __init__(self, config, jobs, out_dir, settings, workers, t_start, floors):
    self.config, self.jobs, self.out_dir = config, jobs, out_dir
    self.settings, self.workers, self.t_start, self.floors = settings, workers, t_start, floors
    self.results, self.ran, self.loads, self.table = {}, 0, [], {}
    self.t_runs = None  # when the first job that runs began (after the classifier)
    self.writing, self.pilot_line = False, None

  def record(self, i: int, result: dict, was_done: bool, seconds: float) -> None:
    self.results[i] = result
    if self.t_runs is None and not was_done:
      self.t_runs = time.time() - seconds
    self.ran += not was_done
    left = len(self.jobs) - len(self.results)
    eta = left * (time.time() - self.t_runs) / self.ran if self.ran else float("nan")
    job, m = self.jobs[i], result["metrics"]
    logging.info("[study %d/%d] %s seed %d: %s in %.0fs; gen FD %.1f (guided %.1f), class acc "
                 "%.3f, rFD %.1f, PSNR %.2f; ETA %.0f min", len(self.results), len(self.jobs),
                 job["row"].name, job["seed"], "skipped (done)" if was_done else "trained+evaluated",
                 seconds, m["gen_fd"] or np.nan, m["gen_fd_guided"] or np.nan,
                 m["class_acc"] or np.nan, m["rfd"] or np.nan, m["psnr"] or np.nan, eta / 60)
    self.loads.append(os.getloadavg()[1])
    if self.writing:
      self.write()

  def write(self) -> None:
    results = [self.results[i] for i in sorted(self.results)]
    self.table = report.aggregate(results, plan_lib.all_rows(self.config), self.floors)
    report.write_outputs(self.table, results, self.out_dir)
    with open(os.path.join(self.out_dir, "run_info.json"), "w") as f:
      json.dump({"wall_seconds": time.time() - self.t_start, "ran": self.ran,
                 "skipped": len(self.results) - self.ran, "of": len(self.jobs),
                 "workers": self.workers, "settings": self.settings, "pilot": self.pilot_line,
                 "mean_loadavg_5min": float(np.mean(self.loads)) if self.loads else None,
                 "cpu_count": os.cpu_count(), "devices": str(jax.devices())}, f, indent=2)
