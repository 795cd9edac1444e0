"""The paper's variant study (Sec. 4.3, Fig. 3a, 4, 5) on the embedded digits: `--mode=study`.

  python main.py --config=configs/study_digits.py --mode=study --workdir=DIR

Every row of configs/variants.py ROWS (or the ones in config.study.rows), for every seed
in config.study.seeds, is trained with the one trainer (train.train_and_evaluate) and
measured with the one evaluator (evaluate.evaluate), each row-seed in its own workdir:
  DIR/stage1/<preset>/seed<k>/   a VAE trained alone (train.freeze='flow'), shared by the
                                 two-stage rows that need that same VAE
  DIR/rows/<row>/seed<k>/        the row's run; study.json there marks it finished
Every row gets the same step budget (config.study.steps); a two-stage row spends
stage1_fraction of it on its stage-1 VAE (those steps count in every row that uses the
VAE, even when it is trained once). Rerunning skips finished runs; an existing workdir
whose config differs from the one the study would write is an error (nothing is
overwritten): delete it, or use another DIR.

Each row-seed is evaluated twice with the same samples' noise: without guidance
(sample.guidance=0) and with the config's default guidance. Both evaluations use seed 0
for their own randomness (sampling noise, eval noise), so the digit classifier, trained
once in DIR/study/classifier (eval.classifier_dir), is shared by every row and seed, and
rows differ only by their trained models.

Outputs in DIR/study/: table.md, table.json (mean and std over seeds of every metric,
the paper's ImageNet numbers beside them), gen_fd.png (generation FD per row with
error bars), robustness.png (decoder PSNR under latent noise: the sigma_bar sweep
against learnable variance, Fig. 3a), latent_stats.png (Fig. 4), samples/<row>.png.
With config.study.workers = N > 1 the row-seeds run in N spawned worker processes, each
taking the next one when it is free (row-seeds that share a stage-1 VAE go to one worker,
in order); this process trains the classifier first, then writes the table, the figures and
a progress line with an ETA as results arrive. One jax process keeps 2 CPU cores only ~70 %
busy (compiles, evaluation, small convolutions), so two workers shorten the study there.
Each worker's XLA_FLAGS get config.study.worker_xla_flags (default: single-threaded XLA
CPU, so N workers on N cores do not fight over each other's thread pools).
SIGINT / SIGTERM: each worker gets one SIGTERM, saves its training checkpoint and stops;
rerunning the command resumes.
Compiled programs are cached in DIR/study/xla_cache (unless a JAX compilation cache is
already configured, e.g. by JAX_COMPILATION_CACHE_DIR), so seeds and reruns reuse them.
"""
import copy
import json
import math
import multiprocessing
import os
import pickle
import queue
import shutil
import signal
import threading
import time
import traceback
from typing import Optional

import jax
import numpy as np
from absl import logging

from configs import variants
from simflow_jax import evaluate, train
from simflow_jax.evals import digits, figures

STUDY_FILE = "study.json"          # written last in a finished row-seed's workdir
STAT_NAMES = ("spectral_entropy", "high_freq_ratio", "total_variation", "lag1_autocorrelation")
# (name in table.json, label in table.md, path in the row-seed's result)
METRICS = (
    ("rfd", "rFD", ("guided", "generation", "digit_rfd")),
    ("psnr", "PSNR", ("guided", "reconstruction", "psnr")),
    ("gen_fd", "gen FD w/o guidance", ("unguided", "generation", "digit_fd")),
    ("gen_fd_guided", "gen FD guided", ("guided", "generation", "digit_fd")),
    ("class_acc", "class acc. guided", ("guided", "generation", "digit_class_accuracy")),
    ("class_acc_unguided", "class acc. w/o guidance", ("unguided", "generation",
                                                        "digit_class_accuracy")),
    ("bits_per_dim", "bits/dim", ("guided", "likelihood", "bits_per_dim_sampled")),
) + tuple((f"latent_{s}", s.replace("_", " "), ("guided", "latent_stats", "mu", s))
          for s in STAT_NAMES)
QUICK = {"steps": 300, "seeds": (0,), "num_eval_examples": 300, "num_samples": 300}
QUICK_ROWS = ("frozen_vae_fixed", "end_to_end_noise", "simflow")  # when study.rows is empty


class StudyError(ValueError):
  pass


# ------------------------------------------------------------------------------------
# The plan: which runs, with which configs, in which workdirs.
# ------------------------------------------------------------------------------------
def _settings(config) -> dict:
  """The study's knobs, after study.quick."""
  st = config.study
  out = {"steps": int(st.steps), "seeds": tuple(int(s) for s in st.seeds),
         "num_eval_examples": int(st.num_eval_examples), "num_samples": int(config.eval.num_samples)}
  if st.quick:
    out.update(QUICK)
  out["workers"] = int(st.workers)
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
  names = list(config.study.rows) or list(QUICK_ROWS if config.study.quick else variants.ROWS)
  unknown = [n for n in names if n not in variants.ROWS]
  if unknown:
    raise StudyError(f"Unknown study row(s) {unknown}; choose from {tuple(variants.ROWS)} "
                     "(config.study.rows, or configs/study_digits.py:ROW1,ROW2).")
  return [variants.ROWS[n] for n in dict.fromkeys(names)]


def _table_order(rows: list) -> list:
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
  return c


def _config_json(c) -> dict:
  """The parts of a run's config that define it (the study section is bookkeeping)."""
  d = json.loads(c.to_json_best_effort(sort_keys=True))
  d.pop("study", None)
  return d


def plan(config, workdir: str) -> list:
  """One entry per row-seed: its configs and workdirs, stage 1 included."""
  s = _settings(config)
  frac = float(config.study.stage1_fraction)
  if not 0.0 < frac < 1.0:
    raise StudyError(f"config.study.stage1_fraction must be in (0, 1), got {frac}.")
  base = copy.deepcopy(config)
  base.eval.num_samples = s["num_samples"]
  base.eval.classifier_dir = os.path.join(workdir, "study", "classifier")
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


def _finished(run_dir: str, config) -> bool:
  """Whether run_dir holds a finished run of `config`; an error if it holds another config's."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    if os.path.isdir(run_dir) and os.listdir(run_dir):
      raise StudyError(f"{run_dir} exists, is not empty and has no config.json: it is not a run "
                       "of this study. Delete it or use another --workdir.")
    return False
  with open(path) as f:
    saved = json.load(f)
  saved.pop("study", None)
  want = _config_json(config)
  if saved != want:
    diffs = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    raise StudyError(f"{run_dir} holds a run of a different config (sections {diffs} differ), "
                     "e.g. from another study.steps or an older version. Nothing was overwritten: "
                     "delete that folder to retrain it, or use another --workdir.")
  return os.path.exists(os.path.join(run_dir, "checkpoints", str(config.train.num_steps)))


def check(jobs: list) -> None:
  """Checks every existing workdir before anything runs (so a bad one stops the study first)."""
  for job in jobs:
    if job["stage1"] is not None:
      _finished(job["stage1"]["dir"], job["stage1"]["config"])
    _finished(job["dir"], job["config"])


# ------------------------------------------------------------------------------------
# Running one row-seed.
# ------------------------------------------------------------------------------------
def _train(config, run_dir: str) -> float:
  if _finished(run_dir, config):
    return 0.0
  t0 = time.time()
  train.train_and_evaluate(config, run_dir)
  return time.time() - t0


def _pick(tree, path):
  for key in path:
    if tree is None:
      return None
    tree = tree.get(key)
  return tree


def _done(job: dict) -> bool:
  """Whether the row-seed is trained and evaluated (its study.json is written last)."""
  return os.path.exists(os.path.join(job["dir"], STUDY_FILE)) and _finished(job["dir"], job["config"])


def run_job(job: dict, num_eval_examples: Optional[int]) -> dict:
  """Trains (stage 1 if needed, then the row) and evaluates one row-seed; returns study.json."""
  out = os.path.join(job["dir"], STUDY_FILE)
  if _done(job):
    with open(out) as f:
      return json.load(f)
  seconds = {"stage1": 0.0}
  if job["stage1"] is not None:
    stage1_dir = job["stage1"]["dir"]
    if not _finished(stage1_dir, job["stage1"]["config"]):
      seconds["stage1"] = _train(job["stage1"]["config"], stage1_dir)
  seconds["train"] = _train(job["config"], job["dir"])
  t0 = time.time()
  reports = {}
  for name, guidance in (("unguided", 0.0), ("guided", float(job["config"].sample.guidance))):
    c = copy.deepcopy(job["config"])
    c.sample.guidance = guidance
    c.seed = 0  # the evaluation's randomness and the shared classifier (module docstring)
    reports[name] = evaluate.evaluate(c, job["dir"], num_eval_examples)
  seconds["evaluate"] = time.time() - t0
  result = {"row": job["row"].name, "seed": job["seed"], "seconds": seconds,
            "metrics": {name: _pick(reports, path) for name, _, path in METRICS},
            "robustness": reports["guided"].get("robustness", {}).get("curve"),
            "samples_png": os.path.join(job["dir"], "eval", "samples.png"),
            "reports": reports}
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(tmp, out)
  return result


# ------------------------------------------------------------------------------------
# Aggregation: table and figures.
# ------------------------------------------------------------------------------------
def _mean_std(values):
  vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  if not vals:
    return None, None, 0
  return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def aggregate(results: list, rows: list) -> dict:
  table = {}
  for row in rows:
    mine = [r for r in results if r["row"] == row.name]
    if not mine:
      continue
    entry = {"label": row.label, "seeds": sorted(r["seed"] for r in mine),
             "paper": None if row.paper is None else dict(zip(("rfid", "psnr", "gfid_no_cfg"), row.paper)),
             "sigma_bar": row.sigma_bar, "fig3a": row.fig3a, "stage1": row.stage1, "metrics": {}}
    for name, _, _ in METRICS:
      mean, std, n = _mean_std(r["metrics"][name] for r in mine)
      entry["metrics"][name] = {"mean": mean, "std": std, "n": n}
    curves = [r["robustness"] for r in mine if r.get("robustness")]
    if curves:
      s_values = [p["s"] for p in curves[0]]
      entry["robustness"] = [{"s": s, "psnr": _mean_std(c[i]["psnr"] for c in curves)[0],
                              "psnr_std": _mean_std(c[i]["psnr"] for c in curves)[1]}
                             for i, s in enumerate(s_values)]
    entry["train_seconds"] = float(np.mean([r["seconds"]["train"] + r["seconds"]["stage1"]
                                            for r in mine]))
    table[row.name] = entry
  return table


def _fmt(m, digits_after=2):
  if m["mean"] is None:
    return "n/a"
  if m["n"] < 2:
    return f"{m['mean']:.{digits_after}f}"
  return f"{m['mean']:.{digits_after}f} ± {m['std']:.{digits_after}f}"


def table_markdown(table: dict) -> str:
  cols = [("rfd", 1), ("psnr", 2), ("gen_fd", 1), ("gen_fd_guided", 1), ("class_acc", 3),
          ("bits_per_dim", 3)]
  labels = dict((n, l) for n, l, _ in METRICS)
  head = (["row", "config / method", "seeds"] + [labels[c] for c, _ in cols]
          + ["paper rFID / PSNR / gFID"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, e in table.items():
    paper = "-" if e["paper"] is None else " / ".join(f"{v:g}" for v in e["paper"].values())
    lines.append("| " + " | ".join([name, e["label"], str(len(e["seeds"]))]
                                   + [_fmt(e["metrics"][c], d) for c, d in cols] + [paper]) + " |")
  stats = ["| row | " + " | ".join(s.replace("_", " ") for s in STAT_NAMES) + " |",
           "|" + "---|" * (len(STAT_NAMES) + 1)]
  for name, e in table.items():
    stats.append(f"| {name} | " + " | ".join(_fmt(e["metrics"][f"latent_{s}"], 3) for s in STAT_NAMES)
                 + " |")
  return "\n".join(lines) + "\n\nLatent statistics of mu (Fig. 4):\n\n" + "\n".join(stats) + "\n"


def _figure():
  from matplotlib.figure import Figure  # local: only the study's figures need matplotlib
  return Figure


def plot_gen_fd(table: dict, path: str) -> None:
  names = list(table)
  fig = _figure()(figsize=(1.0 + 0.9 * len(names), 4.0))
  ax = fig.add_subplot(1, 1, 1)
  x = np.arange(len(names))
  for off, key, label in ((-0.2, "gen_fd", "w/o guidance"), (0.2, "gen_fd_guided", "guided")):
    mean = [table[n]["metrics"][key]["mean"] or np.nan for n in names]
    std = [table[n]["metrics"][key]["std"] or 0.0 for n in names]
    ax.bar(x + off, mean, 0.4, yerr=std, capsize=3, label=label)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right")
  ax.set_ylabel("digit FD of samples (lower is better)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def plot_robustness_sweep(table: dict, path: str) -> None:
  """Fig. 3a: decoder PSNR under latent noise, end-to-end fixed sigma_bar vs learnable."""
  chosen = [n for n, e in table.items() if e.get("robustness") and e["fig3a"]]
  if not chosen:
    return
  fig = _figure()(figsize=(5.5, 3.8))
  ax = fig.add_subplot(1, 1, 1)
  for n in sorted(chosen, key=lambda k: table[k]["sigma_bar"] or 0.0):
    curve = table[n]["robustness"]
    label = table[n]["label"].replace("end-to-end / ", "")
    ax.errorbar([p["s"] for p in curve], [p["psnr"] for p in curve],
                yerr=[p["psnr_std"] or 0.0 for p in curve], marker="o", capsize=2, label=label)
  ax.set_xlabel("noise scale s (decode mu + s * eps)")
  ax.set_ylabel("PSNR (dB)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def write_outputs(table: dict, results: list, out_dir: str) -> None:
  os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
  with open(os.path.join(out_dir, "table.json"), "w") as f:
    json.dump(table, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table_markdown(table))
  plot_gen_fd(table, os.path.join(out_dir, "gen_fd.png"))
  plot_robustness_sweep(table, os.path.join(out_dir, "robustness.png"))
  figures.plot_latent_stats(
      {n: {s: (e["metrics"][f"latent_{s}"]["mean"] or np.nan) for s in STAT_NAMES}
       for n, e in table.items()}, os.path.join(out_dir, "latent_stats.png"))
  for name in table:  # one sample grid per row: its first seed's guided samples
    first = min((r for r in results if r["row"] == name), key=lambda r: r["seed"])
    if os.path.exists(first["samples_png"]):
      shutil.copyfile(first["samples_png"], os.path.join(out_dir, "samples", f"{name}.png"))


def report(config, workdir: str) -> dict:
  """Rewrites DIR/study's table and figures from the row-seeds finished so far (no training)."""
  results = []
  for job in filter(_done, plan(config, workdir)):
    with open(os.path.join(job["dir"], STUDY_FILE)) as f:
      results.append(json.load(f))
  if not results:
    raise StudyError(f"No finished row-seed in {workdir}: run the study first.")
  table = aggregate(results, _table_order(resolve_rows(config)))
  write_outputs(table, results, os.path.join(workdir, "study"))
  return table


# ------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------
def run(config, workdir: str) -> dict:
  """`main.py --mode=study`: runs (or resumes) the study in `workdir`; returns table.json."""
  if config.data.source != "mnist5k":
    raise StudyError(f"The study measures digits with the digit classifier: data.source must be "
                     f"'mnist5k', got {config.data.source!r}.")
  settings = _settings(config)
  jobs = plan(config, workdir)
  check(jobs)
  out_dir = os.path.join(workdir, "study")
  os.makedirs(out_dir, exist_ok=True)
  if not jax.config.jax_compilation_cache_dir:  # a cache the user configured is kept
    jax.config.update("jax_compilation_cache_dir", os.path.join(out_dir, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  t_start = time.time()
  clf = digits.get_digit_classifier(jobs[0]["config"].eval.classifier_dir,
                                    steps=config.eval.classifier_steps, seed=0)
  todo = [i for i, job in enumerate(jobs) if not _done(job)]
  workers = min(settings["workers"], len(_units(jobs, todo))) if todo else 1
  logging.info("Study: %d row-seeds in %s (%d finished before), %d worker process(es); digit "
               "classifier val accuracy %.3f", len(jobs), workdir, len(jobs) - len(todo), workers,
               clf.val_accuracy)
  progress = _Progress(config, jobs, out_dir, settings, workers, t_start)
  for i in range(len(jobs)):
    if i not in todo:
      progress.record(i, run_job(jobs[i], None), True, 0.0)
  n_eval = settings["num_eval_examples"] or None
  if workers == 1:
    for i in todo:
      t0 = time.time()
      progress.record(i, run_job(jobs[i], n_eval), False, time.time() - t0)
  else:
    _run_parallel(config, workdir, n_eval, _units(jobs, todo), workers, progress)
  logging.info("Study done in %.0f s (%d run, %d skipped): %s", time.time() - t_start,
               progress.ran, len(jobs) - progress.ran, os.path.join(out_dir, "table.md"))
  return progress.table


class _Progress:
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
    self.table = aggregate(self.results, _table_order(resolve_rows(self.config)))
    write_outputs(self.table, self.results, self.out_dir)
    self.loads.append(os.getloadavg()[1])
    with open(os.path.join(self.out_dir, "run_info.json"), "w") as f:
      json.dump({"wall_seconds": time.time() - self.t_start, "ran": self.ran,
                 "skipped": len(self.results) - self.ran, "of": len(self.jobs),
                 "workers": self.workers, "settings": self.settings,
                 "mean_loadavg_5min": float(np.mean(self.loads)), "cpu_count": os.cpu_count(),
                 "devices": str(jax.devices())}, f, indent=2)


# ------------------------------------------------------------------------------------
# study.workers > 1: row-seeds in worker processes.
# ------------------------------------------------------------------------------------
def _units(jobs: list, todo: list) -> list:
  """The job indices of `todo`, grouped so that row-seeds sharing a stage-1 VAE run one after
  another in one worker (the first trains the VAE, the others reuse it); plan order."""
  units, shared = [], {}
  for i in todo:
    key = jobs[i]["stage1"] and jobs[i]["stage1"]["dir"]
    if key and key in shared:
      shared[key].append(i)
      continue
    units.append([i])
    if key:
      shared[key] = units[-1]
  return units


def _worker(config, workdir, n_eval, cache, parent_pid, tasks, results) -> None:
  """A worker process: runs units from `tasks` until it reads None (or its parent is gone);
  reports ('done', unit, [(i, result, seconds)]), ('interrupted', unit, None) or
  ('error', unit, (exception, traceback text))."""
  os.setpgrp()  # a Ctrl-C at the terminal reaches the parent only; it forwards one SIGTERM
  logging.set_verbosity(logging.INFO)
  jax.config.update("jax_compilation_cache_dir", cache[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", cache[1])
  jobs = plan(config, workdir)
  while os.getppid() == parent_pid:
    unit = tasks.get()
    if unit is None:
      return
    try:
      done = []
      for i in unit:
        t0 = time.time()
        done.append((i, run_job(jobs[i], n_eval), time.time() - t0))
    except train.Interrupted:
      results.put(("interrupted", unit, None))
      return
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which re-raises it
      try:
        pickle.dumps(e)
      except Exception:  # noqa: BLE001 - an exception that does not pickle goes as text
        e = RuntimeError(f"{type(e).__name__}: {e}")
      results.put(("error", unit, (e, traceback.format_exc())))
      return
    results.put(("done", unit, done))


def _start(procs, extra_xla_flags: str) -> None:
  """Starts the workers with extra_xla_flags added to XLA_FLAGS (each worker's jax reads
  them when it starts); this process's environment is left as it was."""
  env_flags = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = " ".join(filter(None, (env_flags, extra_xla_flags)))
  try:
    for p in procs:
      p.start()
  finally:
    if env_flags is None:
      del os.environ["XLA_FLAGS"]
    else:
      os.environ["XLA_FLAGS"] = env_flags


def _run_parallel(config, workdir, n_eval, units, workers, progress) -> None:
  """Runs `units` in `workers` spawned processes (each takes the next unit when it is free).
  SIGINT / SIGTERM to this process: the workers get one SIGTERM, save their training
  checkpoints and stop; then train.Interrupted is raised (rerun to resume). A worker's error
  stops the others the same way and is raised here."""
  ctx = multiprocessing.get_context("spawn")
  tasks, results = ctx.Queue(), ctx.Queue()
  for unit in units:
    tasks.put(unit)
  for _ in range(workers):
    tasks.put(None)
  cache = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  procs = [ctx.Process(target=_worker, name=f"study-worker-{k}",
                       args=(config, workdir, n_eval, cache, os.getpid(), tasks, results))
           for k in range(workers)]
  stop = []

  def stop_workers(signum=None, frame=None):
    if signum is not None:
      stop.append(signum)
    for p in procs:
      if p.is_alive():
        os.kill(p.pid, signal.SIGTERM)

  main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, stop_workers) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
  failure = None
  try:
    _start(procs, str(config.study.worker_xla_flags))
    pending = len(units)
    while pending:
      try:
        kind, unit, payload = results.get(timeout=2.0)
      except queue.Empty:
        if not any(p.is_alive() for p in procs):
          break
        continue
      pending -= 1
      if kind == "done":
        for i, result, seconds in payload:
          progress.record(i, result, False, seconds)
      elif kind == "error" and failure is None:
        failure = payload
        logging.error("A study worker failed on %s:\n%s",
                      [progress.jobs[i]["row"].name for i in unit], payload[1])
        stop_workers()
  finally:
    for p in procs:
      if p.pid is not None:  # started
        p.join()
    for s, handler in previous.items():
      signal.signal(s, handler)
  if stop:
    raise train.Interrupted(f"The study stopped on {signal.Signals(stop[0]).name}: the workers "
                            "saved their training checkpoints; rerun the same command to resume.",
                            stop[0])
  if failure is not None:
    raise failure[0]
  if pending:
    raise StudyError(f"The study's worker processes ended with {pending} unit(s) unreported (exit "
                     f"codes {[p.exitcode for p in procs]}; e.g. killed for memory): rerun the same "
                     "command to resume, or set config.study.workers=1.")
