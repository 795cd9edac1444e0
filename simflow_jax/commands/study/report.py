"""The study's report: table.json, table.md and figures (evals/figures.py).

table.json = {
  'rows':     {row: {label, kind ('stage1' | 'row'), seeds, paper, sigma_bar, fig3a, stage1,
                     flow {steps, warmup, ema_decay}, metrics {name: {mean, std, n}},
                     robustness [{s, psnr, psnr_std}], train_seconds}}   (table order)
  'paired':   {metric: {diff: [per seed], seeds, mean, ci95 [lo, hi], n, better, finding}}:
              variants.PAIR[0] - PAIR[1] on the same seed, mean and 95 % Student t interval
              (n - 1 degrees of freedom); 'better' names the row only where the interval
              excludes zero, else 'not resolved'
  'findings': the paired findings as sentences, each naming its numbers
  'floors':   the digit FD of real held-out digits against real training digits, and the
              digit classifier's held-out accuracy (what no model can beat)
}
"""
import json
import math
import os
import shutil

import numpy as np
from scipy import stats as scipy_stats

from configs import variants
from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.evals import figures

STAT_NAMES = job_lib.STAT_NAMES
# The paired metrics: (name, label, lower is better).
PAIRED = (("gen_fd", "gen FD w/o guidance", True), ("gen_fd_guided", "gen FD guided", True),
          ("class_acc", "class accuracy (guided)", False), ("rfd", "rFD", True),
          ("psnr", "PSNR", False))
FLOORS_FILE = "floors.json"


def _finite(v):
  return v is not None and math.isfinite(float(v))


def _mean_std(values):
  vals = [float(v) for v in values if _finite(v)]
  if not vals:
    return None, None, 0
  return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def t_interval(values, level: float = 0.95) -> tuple:
  """(mean, (lo, hi)): the mean of `values` and its Student t interval (n - 1 df)."""
  x = np.asarray(values, np.float64)
  if x.size < plan_lib.MIN_PAIRED_SEEDS:
    raise plan_lib.StudyError(f"a t interval needs at least {plan_lib.MIN_PAIRED_SEEDS} values, "
                              f"got {x.size}.")
  mean = float(x.mean())
  half = float(scipy_stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
  return mean, (mean - half, mean + half)


def paired(results: list, pair: tuple = variants.PAIR) -> dict:
  """Per-seed paired differences pair[0] - pair[1] of PAIRED metrics (module docstring); {}
  when the pair has fewer than MIN_PAIRED_SEEDS shared seeds."""
  a, b = ({r["seed"]: r["metrics"] for r in results if r["row"] == name and r.get("kind", "row") == "row"}
          for name in pair)
  out = {}
  for name, label, lower in PAIRED:
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s][name]) and _finite(b[s][name]))
    if len(seeds) < plan_lib.MIN_PAIRED_SEEDS:
      continue
    diff = [float(a[s][name]) - float(b[s][name]) for s in seeds]
    mean, (lo, hi) = t_interval(diff)
    if lo > 0 or hi < 0:
      better = pair[0] if (mean < 0) == lower else pair[1]
    else:
      better = "not resolved"
    verdict = f"{better} better" if better != "not resolved" else "not resolved"
    finding = (f"{label}: {pair[0]} - {pair[1]} = {mean:.3g} (95 % interval {lo:.3g} to "
               f"{hi:.3g}, {len(seeds)} paired seeds; {'lower' if lower else 'higher'} is better): "
               f"{verdict}.")
    out[name] = {"diff": diff, "seeds": seeds, "mean": mean, "ci95": [lo, hi], "n": len(seeds),
                 "better": better, "finding": finding}
  return out


def aggregate_rows(results: list, rows: list) -> dict:
  table = {}
  for row in rows:
    mine = [r for r in results if r["row"] == row.name]
    if not mine:
      continue
    entry = {"label": row.label, "kind": mine[0].get("kind", "row"),
             "seeds": sorted(r["seed"] for r in mine),
             "paper": None if row.paper is None else dict(zip(("rfid", "psnr", "gfid_no_cfg"), row.paper)),
             "sigma_bar": row.sigma_bar, "fig3a": row.fig3a, "stage1": row.stage1,
             "flow": mine[0].get("flow"), "metrics": {}}
    for name, _, _ in job_lib.METRICS:
      mean, std, n = _mean_std(r["metrics"].get(name) for r in mine)
      entry["metrics"][name] = {"mean": mean, "std": std, "n": n}
    curves = [r["robustness"] for r in mine if r.get("robustness")]
    if curves:
      s_values = [p["s"] for p in curves[0]]
      entry["robustness"] = [{"s": s, "psnr": _mean_std(c[i]["psnr"] for c in curves)[0],
                              "psnr_std": _mean_std(c[i]["psnr"] for c in curves)[1]}
                             for i, s in enumerate(s_values)]
    entry["train_seconds"] = float(np.mean([r["seconds"]["train"] for r in mine]))
    table[row.name] = entry
  return table


def aggregate(results: list, rows: list, floors: dict = None) -> dict:
  """table.json (module docstring) of the finished jobs' results."""
  pair = paired(results)
  return {"rows": aggregate_rows(results, rows), "paired": pair,
          "findings": [p["finding"] for p in pair.values()], "floors": floors or {}}


def _fmt(m, digits_after=2):
  if m["mean"] is None:
    return "-"
  if m["n"] < 2:
    return f"{m['mean']:.{digits_after}f}"
  return f"{m['mean']:.{digits_after}f} ± {m['std']:.{digits_after}f}"


def table_markdown(table: dict) -> str:
  rows = table["rows"]
  cols = [("rfd", 1), ("psnr", 2), ("rfd_noisy", 1), ("psnr_noisy", 2), ("latent_std", 3),
          ("noise_std", 3), ("gen_fd", 1), ("gen_fd_guided", 1), ("class_acc", 3),
          ("bits_per_dim", 3)]
  labels = dict((n, l) for n, l, _ in job_lib.METRICS)
  head = (["row", "config / method", "seeds"] + [labels[c] for c, _ in cols]
          + ["paper rFID / PSNR / gFID"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, e in rows.items():
    paper = "-" if e["paper"] is None else " / ".join(f"{v:g}" for v in e["paper"].values())
    lines.append("| " + " | ".join([name, e["label"], str(len(e["seeds"]))]
                                   + [_fmt(e["metrics"][c], d) for c, d in cols] + [paper]) + " |")
  out = "\n".join(lines) + "\n"
  flow = sorted({json.dumps(e["flow"], sort_keys=True) for e in rows.values() if e.get("flow")})
  if flow:
    out += "\nEvery row's flow: " + "; ".join(flow) + " (steps, warmup, EMA decay).\n"
  floors = table.get("floors") or {}
  if floors:
    out += (f"\nFloors: digit FD of {floors['num_heldout']} real held-out digits against "
            f"{floors['num_train']} real training digits {floors['digit_fd_real']:.2f}; the digit "
            f"classifier's held-out accuracy {floors['classifier_val_accuracy']:.3f}.\n")
  if table.get("paired"):
    a, b = variants.PAIR
    out += (f"\nPaired differences {a} - {b} (same seed; mean and 95 % Student t interval):\n\n"
            "| metric | per-seed differences | mean | 95 % interval | finding |\n|---|---|---|---|---|\n")
    for name, p in table["paired"].items():
      out += (f"| {name} | {', '.join(f'{d:.3g}' for d in p['diff'])} | {p['mean']:.3g} | "
              f"{p['ci95'][0]:.3g} to {p['ci95'][1]:.3g} | "
              f"{p['better'] + ' better' if p['better'] != 'not resolved' else 'not resolved'} |\n")
    out += "\n" + "\n".join(f"- {f}" for f in table["findings"]) + "\n"
  stats = ["| row | " + " | ".join(s.replace("_", " ") for s in STAT_NAMES) + " |",
           "|" + "---|" * (len(STAT_NAMES) + 1)]
  for name, e in rows.items():
    stats.append(f"| {name} | " + " | ".join(_fmt(e["metrics"][f"latent_{s}"], 3) for s in STAT_NAMES)
                 + " |")
  return out + "\nLatent statistics of mu (Fig. 4):\n\n" + "\n".join(stats) + "\n"


def write_outputs(table: dict, results: list, out_dir: str) -> None:
  """table.json, table.md, gen_fd.png, robustness.png, latent_stats.png, samples/<row>.png."""
  rows = table["rows"]
  os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
  with open(os.path.join(out_dir, "table.json"), "w") as f:
    json.dump(table, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table_markdown(table))
  flows = {n: e for n, e in rows.items() if e["kind"] == "row"}
  if flows:
    figures.plot_gen_fd(flows, os.path.join(out_dir, "gen_fd.png"))
  figures.plot_robustness_sweep(rows, os.path.join(out_dir, "robustness.png"))
  figures.plot_latent_stats(
      {n: {s: (e["metrics"][f"latent_{s}"]["mean"] or np.nan) for s in STAT_NAMES}
       for n, e in rows.items()}, os.path.join(out_dir, "latent_stats.png"))
  for name in flows:  # one sample grid per row: its first seed's guided samples
    first = min((r for r in results if r["row"] == name), key=lambda r: r["seed"])
    if os.path.exists(first["samples_png"]):
      shutil.copyfile(first["samples_png"], os.path.join(out_dir, "samples", f"{name}.png"))


def read_floors(out_dir: str) -> dict:
  path = os.path.join(out_dir, FLOORS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def report(config, workdir: str) -> dict:
  """Rewrites DIR/study's table and figures from the jobs finished so far (no training)."""
  results = []
  for job in filter(job_lib.done, plan_lib.plan(config, workdir)):
    with open(os.path.join(job["dir"], job_lib.STUDY_FILE)) as f:
      results.append(json.load(f))
  if not results:
    raise plan_lib.StudyError(f"No finished row-seed in {workdir}: run the study first.")
  out_dir = os.path.join(workdir, "study")
  table = aggregate(results, plan_lib.all_rows(config), read_floors(out_dir))
  write_outputs(table, results, out_dir)
  return table
