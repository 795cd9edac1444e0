"""The study's report: mean and std over seeds of every metric per row (table.json, table.md
with the paper's ImageNet numbers beside them) and its figures (evals/figures.py)."""
import json
import math
import os
import shutil

import numpy as np

from simflow_jax.commands.study import job as job_lib
from simflow_jax.commands.study import plan as plan_lib
from simflow_jax.evals import figures

STAT_NAMES = job_lib.STAT_NAMES


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
    for name, _, _ in job_lib.METRICS:
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
  labels = dict((n, l) for n, l, _ in job_lib.METRICS)
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


def write_outputs(table: dict, results: list, out_dir: str) -> None:
  """table.json, table.md, gen_fd.png, robustness.png, latent_stats.png, samples/<row>.png."""
  os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
  with open(os.path.join(out_dir, "table.json"), "w") as f:
    json.dump(table, f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table_markdown(table))
  figures.plot_gen_fd(table, os.path.join(out_dir, "gen_fd.png"))
  figures.plot_robustness_sweep(table, os.path.join(out_dir, "robustness.png"))
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
  for job in filter(job_lib.done, plan_lib.plan(config, workdir)):
    with open(os.path.join(job["dir"], job_lib.STUDY_FILE)) as f:
      results.append(json.load(f))
  if not results:
    raise plan_lib.StudyError(f"No finished row-seed in {workdir}: run the study first.")
  table = aggregate(results, plan_lib.table_order(plan_lib.resolve_rows(config)))
  write_outputs(table, results, os.path.join(workdir, "study"))
  return table
