"""The paper's variant study (Sec. 4.3, Fig. 3a, 4, 5) on the embedded digits: `--mode=study`.

  python main.py --config=configs/study_digits.py --mode=study --workdir=DIR

Every row of configs/variants.py ROWS (or the ones in config.study.rows), for every seed
in config.study.seeds, is trained with the library's training loop (trainer.train) and
measured with the evaluators the config declares (evals/declared.py; configs/study_digits.py
declares generation with and without guidance, reconstruction, likelihood, latent_stats and
robustness), each row-seed in its own workdir:
  DIR/stage1/<preset>/seed<k>/   a VAE trained alone (train.freeze='flow'), shared by the
                                 two-stage rows that need that same VAE
  DIR/rows/<row>/seed<k>/        the row's run; study.json there marks it finished
Every row gets the same step budget (config.study.steps); a two-stage row spends
stage1_fraction of it on its stage-1 VAE (those steps count in every row that uses the
VAE, even when it is trained once). Rerunning skips finished runs; an existing workdir
whose config differs from the one the study would write is an error (nothing is
overwritten): delete it, or use another DIR.

The evaluation uses seed 0 for its own randomness (sampling noise, eval noise), so the digit
classifier, trained once in DIR/study/classifier (eval.classifier_dir), is shared by every row
and seed, and rows differ only by their trained models. The table reads report[NAME][metric]
(job.py METRICS).

Outputs in DIR/study/: table.md, table.json (mean and std over seeds of every metric,
the paper's ImageNet numbers beside them), gen_fd.png (generation FD per row with
error bars), robustness.png (decoder PSNR under latent noise: the sigma_bar sweep
against learnable variance, Fig. 3a), latent_stats.png (Fig. 4), samples/<row>.png.
With config.study.workers = N > 1 the row-seeds run in N spawned worker processes (pool.py);
this process trains the classifier first, then writes the table, the figures and a progress
line with an ETA as results arrive. One jax process leaves part of a small CPU idle
(compiles, evaluation, small convolutions), so two workers shorten the study there.
The package by job: plan.py (settings, rows, workdirs), job.py (one row-seed), report.py
(table and figures), pool.py (worker processes), this file (the command, its progress line).
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
from simflow_jax.evals import digits
from simflow_jax.models import build

StudyError = plan_lib.StudyError


def run(config, workdir: str) -> dict:
  """`main.py --mode=study`: runs (or resumes) the study in `workdir`; returns table.json."""
  build.validate_config(config)
  if config.data.source != "mnist5k":
    raise StudyError(f"The study measures digits with the digit classifier: data.source must be "
                     f"'mnist5k', got {config.data.source!r}.")
  settings = plan_lib.settings(config, log=True)
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
  todo = [i for i, job in enumerate(jobs) if not job_lib.done(job)]
  workers = min(settings["workers"], len(pool.units_of(jobs, todo))) if todo else 1
  logging.info("Study: %d row-seeds in %s (%d finished before), %d worker process(es); digit "
               "classifier val accuracy %.3f", len(jobs), workdir, len(jobs) - len(todo), workers,
               clf.val_accuracy)
  progress = Progress(config, jobs, out_dir, settings, workers, t_start)
  for i in range(len(jobs)):
    if i not in todo:
      progress.record(i, job_lib.run_job(jobs[i]), True, 0.0)
  if workers == 1:
    for i in todo:
      t0 = time.time()
      progress.record(i, job_lib.run_job(jobs[i]), False, time.time() - t0)
  else:
    pool.run_parallel(config, workdir, pool.units_of(jobs, todo), workers, progress)
  logging.info("Study done in %.0f s (%d run, %d skipped): %s", time.time() - t_start,
               progress.ran, len(jobs) - progress.ran, os.path.join(out_dir, "table.md"))
  return progress.table


class Progress:
  """The parent's bookkeeping: a progress line with an ETA per row-seed, and the table, the
  figures and run_info.json rewritten after each one."""

  def __init__(self, config, jobs, out_dir, settings, workers, t_start):
    self.config, self.jobs, self.out_dir = config, jobs, out_dir
    self.settings, self.workers, self.t_start = settings, workers, t_start
    self.results, self.ran, self.loads, self.table = [], 0, [], {}
    self.t_runs = None  # when the first row-seed that runs began (after the classifier)

  def record(self, i: int, result: dict, was_done: bool, seconds: float) -> None:
    self.results.append(result)
    if self.t_runs is None and not was_done:
      self.t_runs = time.time() - seconds
    self.ran += not was_done
    left = len(self.jobs) - len(self.results)
    eta = left * (time.time() - self.t_runs) / self.ran if self.ran else float("nan")
    job, m = self.jobs[i], result["metrics"]
    logging.info("[study %d/%d] %s seed %d: %s in %.0fs; gen FD %.1f (guided %.1f), rFD %.1f, "
                 "PSNR %.2f; ETA %.0f min", len(self.results), len(self.jobs), job["row"].name,
                 job["seed"], "skipped (done)" if was_done else "trained+evaluated", seconds,
                 m["gen_fd"] or np.nan, m["gen_fd_guided"] or np.nan, m["rfd"] or np.nan,
                 m["psnr"] or np.nan, eta / 60)
    self.table = report.aggregate(self.results, plan_lib.table_order(plan_lib.resolve_rows(self.config)))
    report.write_outputs(self.table, self.results, self.out_dir)
    self.loads.append(os.getloadavg()[1])
    with open(os.path.join(self.out_dir, "run_info.json"), "w") as f:
      json.dump({"wall_seconds": time.time() - self.t_start, "ran": self.ran,
                 "skipped": len(self.results) - self.ran, "of": len(self.jobs),
                 "workers": self.workers, "settings": self.settings,
                 "mean_loadavg_5min": float(np.mean(self.loads)), "cpu_count": os.cpu_count(),
                 "devices": str(jax.devices())}, f, indent=2)
