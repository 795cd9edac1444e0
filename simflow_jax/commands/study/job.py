"""One job of the study (plan.py): train it with the library's training loop, then run its
config's evaluators; study.json in its workdir marks it done.

A row that freezes a stage-1 VAE needs that VAE finished first (the phases in __init__.py);
it never trains one itself, so a VAE is trained once however many rows and seeds share it.
The evaluation uses seed 0 for its own randomness (sampling and posterior noise), so the digit
classifier, trained once in DIR/study/classifier, is shared by every row and seed, and rows
differ only by their trained models.
"""
import copy
import json
import os
import time

from simflow_jax import trainer
from simflow_jax.commands.study.plan import StudyError, config_json
from simflow_jax.evals import declared

STUDY_FILE = "study.json"          # written last in a finished job's workdir
STAT_NAMES = ("spectral_entropy", "high_freq_ratio", "total_variation", "lag1_autocorrelation")
NOISY = "reconstruction_noisy"     # the reconstruction evaluator with noisy=True
# (name in table.json, label in table.md, (evaluator name, metric) in the evaluation report)
METRICS = (
    ("rfd", "rFD", ("generation", "digit_rfd")),
    ("psnr", "PSNR", ("reconstruction", "psnr")),
    ("rfd_noisy", "rFD noisy", (NOISY, "rfd")),
    ("psnr_noisy", "PSNR noisy", (NOISY, "psnr")),
    ("latent_std", "latent std", (NOISY, "mu_std")),
    ("noise_std", "noise std", (NOISY, "noise_std")),
    ("gen_fd", "gen FD w/o guidance", ("generation_unguided", "digit_fd")),
    ("gen_fd_guided", "gen FD guided", ("generation", "digit_fd")),
    ("class_acc", "class acc. guided", ("generation", "digit_class_accuracy")),
    ("class_acc_unguided", "class acc. w/o guidance", ("generation_unguided",
                                                        "digit_class_accuracy")),
    ("bits_per_dim", "bits/dim", ("likelihood", "bits_per_dim_sampled")),
) + tuple((f"latent_{s}", s.replace("_", " "), ("latent_stats", f"mu_{s}")) for s in STAT_NAMES)
ROBUSTNESS = "robustness"          # the evaluator whose PSNR curve draws Fig. 3a


def finished(run_dir: str, config) -> bool:
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
  want = config_json(config)
  if saved != want:
    diffs = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    raise StudyError(f"{run_dir} holds a run of a different config (sections {diffs} differ), "
                     "e.g. from another study.steps or an older version. Nothing was overwritten: "
                     "delete that folder to retrain it, or use another --workdir.")
  return os.path.exists(os.path.join(run_dir, "checkpoints", str(config.train.num_steps)))


def check(jobs: list) -> None:
  """Checks every existing workdir before anything runs (so a bad one stops the study first)."""
  for job in jobs:
    finished(job["dir"], job["config"])


def _train(config, run_dir: str) -> float:
  if finished(run_dir, config):
    return 0.0
  t0 = time.time()
  trainer.train(config, run_dir)
  return time.time() - t0


def done(job: dict) -> bool:
  """Whether the job is trained and evaluated (its study.json is written last)."""
  return os.path.exists(os.path.join(job["dir"], STUDY_FILE)) and finished(job["dir"], job["config"])


def robustness_curve(config, report: dict):
  """[{'s', 'psnr'}] of the robustness evaluator's report, or None without one."""
  entry, metrics = config.evals.get(ROBUSTNESS), report.get(ROBUSTNESS)
  if entry is None or metrics is None:
    return None
  return [{"s": float(s), "psnr": metrics.get(f"psnr_s{s:g}")} for s in entry.noise_sweep]


def metrics_of(job: dict, report: dict) -> dict:
  """The table's numbers (METRICS) of one job's evaluation report. A stage-1 VAE's rFD is
  its noisy reconstruction's (it has no flow noise: decode(x)); the noisy rFD/PSNR are kept
  only where the row adds noise."""
  out = {name: (report.get(ev) or {}).get(metric) for name, _, (ev, metric) in METRICS}
  if job["kind"] == "stage1":
    out["rfd"] = out["rfd_noisy"]
  if job["kind"] == "stage1" or not float(job["config"].loss.flow_noise_std) > 0:
    out["rfd_noisy"] = out["psnr_noisy"] = None
  return out


def run_job(job: dict) -> dict:
  """Trains and evaluates one job; returns its study.json."""
  out = os.path.join(job["dir"], STUDY_FILE)
  if done(job):
    with open(out) as f:
      return json.load(f)
  if job["stage1"] is not None and not finished(job["stage1"]["dir"], job["stage1"]["config"]):
    raise StudyError(f"{job['row'].name} seed {job['seed']} needs the stage-1 VAE in "
                     f"{job['stage1']['dir']}, which is not trained: the study trains it first "
                     "(rerun the same command).")
  seconds = {"train": _train(job["config"], job["dir"])}
  t0 = time.time()
  c = copy.deepcopy(job["config"])
  c.seed = 0  # the evaluation's randomness and the shared classifier (module docstring)
  report = declared.evaluate_checkpoint(c, job["dir"])
  seconds["evaluate"] = time.time() - t0
  result = {"row": job["row"].name, "kind": job["kind"], "seed": job["seed"], "seconds": seconds,
            "flow": job["flow"], "metrics": metrics_of(job, report),
            "robustness": robustness_curve(c, report),
            "samples_png": os.path.join(job["dir"], "eval", "generation.png"),
            "report": report}
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(tmp, out)
  return result
