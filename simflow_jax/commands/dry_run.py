"""`main.py --mode=dry_run`: prices a run before it starts (step_cost.py says what is measured).

  python main.py --config=configs/imagenet256.py --mode=dry_run --workdir=/tmp/price
  python main.py --config=configs/imagenet256.py --mode=dry_run --config.dry_run.devices=64

Nothing is trained, no data is read and no weights file is opened. The mesh has
config.dry_run.devices devices (0: the local ones); more than this machine has are simulated
CPU devices in a subprocess. Writes WORKDIR/dry_run.json (atomically, at the end) and logs it
as a table: parameters, FLOPs, cost, and the per-device memory of training, sampling and
evaluation (step_cost.py says what each counts).

SIGINT / SIGTERM stop it between its phases (lowering, each compile): the subprocess, if any, is
ended, nothing is written, exit 130 / 143 (signals.py).
"""
import json
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time

import jax
from absl import logging
from etils import epath

from simflow_jax import files, signals, step_cost
from simflow_jax.models import build

_RERUN = "nothing written; rerun the same command to price the run"


def _analyze_in_subprocess(config, num_devices: int, mfu: float = step_cost.DEFAULT_MFU,
                           compile: bool = True,  # noqa: A002
                           stop: signals.StopOnSignal | None = None) -> dict:
  """step_cost.analyze() in a fresh CPU process with `num_devices` simulated devices. The child
  has its own session (a Ctrl-C reaches this process only); when `stop` records a signal the
  child is terminated (killed if it lingers) and stop.interrupted is raised."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(
      flags + [f"--xla_force_host_platform_device_count={num_devices}"]))
  with tempfile.TemporaryDirectory() as tmp:
    cfg_path, out_path = os.path.join(tmp, "config.pkl"), os.path.join(tmp, "out.json")
    err_path = os.path.join(tmp, "stderr.txt")
    with open(cfg_path, "wb") as f:
      pickle.dump(config, f)
    with open(err_path, "w") as err:
      proc = subprocess.Popen([sys.executable, "-m", "simflow_jax.commands.dry_run", cfg_path,
                               out_path, str(num_devices), str(mfu), str(int(compile))],
                              env=env, stdout=subprocess.DEVNULL, stderr=err,
                              start_new_session=True)
      try:
        while proc.poll() is None:
          if stop is not None and stop.signum is not None:
            break
          time.sleep(0.2)
      finally:
        if proc.poll() is None:  # a signal, or an exception here: the child must not outlive us
          proc.terminate()
          try:
            proc.wait(timeout=10)
          except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if stop is not None and stop.signum is not None:
      raise stop.interrupted(_RERUN + ".")
    if proc.returncode != 0:
      with open(err_path) as f:
        raise RuntimeError(f"The dry run on {num_devices} simulated CPU devices failed:\n"
                           f"{f.read()[-4000:]}")
    with open(out_path) as f:
      return json.load(f)


def _gib(x) -> str:
  """Bytes in the largest binary unit that keeps the number >= 1."""
  if x is None:
    return "-"
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if x >= size:
      return f"{x / size:.2f} {unit}"
  return f"{x} B"


def _log_table(r: dict) -> None:
  lines = [f"Dry run: {r['mesh']['devices']} x {r['mesh']['platform']} devices, mesh "
           f"{r['mesh']['shape']}, global batch {r['config']['global_batch']} "
           f"({r['mesh']['per_device_batch']} per device)"]
  lines.append("Parameters:")
  lines += [f"  {k:<24s} {v:>15,d}" for k, v in r["params"].items()]
  lines += [f"  {'frozen ' + k:<24s} {v:>15,d}" for k, v in r["frozen_params"].items()]
  f = r["flops"]
  lines.append(f"FLOPs/step {f['per_step']:.4g} (global batch), {f['per_example']:.4g}/example")
  m = r["memory"]
  lines.append("Per device: params " + _gib(m["state_per_device_bytes"]["params"]) +
               ", optimiser " + _gib(m["state_per_device_bytes"]["opt_state"]) +
               ", EMA " + _gib(m["state_per_device_bytes"]["ema"]) +
               ", frozen nets " + _gib(m["frozen_per_device_bytes"]))
  c = m["compiled_per_device_bytes"]
  if c:
    lines.append(f"Compiled step per device: peak {_gib(c['peak'])} "
                 f"(temporaries {_gib(c['temp'])}, arguments {_gib(c['argument'])}, "
                 f"donated {_gib(c['alias'])})")
  t = r["timing_s"]
  compile_s = ("-" if t["compile"] is None
               else f"{t['compile']:.1f} s ({t['compile_cpu']:.1f} s CPU)")
  lines.append(f"Trace+lower {t['trace_and_lower']:.1f} s ({t['trace_and_lower_cpu']:.1f} s CPU), "
               f"compile {compile_s}, FLOP count lowering {t['flop_count_lowering']:.1f} s; "
               f"host peak RSS {r['host_peak_rss_mb']:.0f} MiB")
  lines.append(f"Memory per device ({r['mesh']['devices']} devices, mesh {r['mesh']['shape']}):")
  lines.append(f"  {'':<9s} {'total':>11s} {'params':>11s} {'KV cache':>11s} {'compiled':>11s}")
  tr, sa, ev = r["train"], r["sample"], r["evaluate"]
  compiled = lambda m: None if m is None else m["peak"]
  lines.append(f"  {'train':<9s} {_gib(tr['total_per_device_bytes']):>11s} "
               f"{_gib(tr['state_per_device_bytes']):>11s} {'-':>11s} "
               f"{_gib(tr['compiled_peak_per_device_bytes']):>11s}  (params + optimiser + EMA "
               f"state; batch {r['mesh']['per_device_batch']}/device)")
  lines.append(f"  {'sample':<9s} {_gib(sa['total_per_device_bytes']):>11s} "
               f"{_gib(sa['params_per_device_bytes']):>11s} "
               f"{_gib(sa['kv_cache_per_device_bytes']):>11s} "
               f"{_gib(compiled(sa['compiled_per_device_bytes'])):>11s}  (generator EMA; batch "
               f"{sa['per_device_batch']}/device, {sa['kv_cache_dtype']} KV cache)")
  ev_params = ev["generator_params_per_device_bytes"] + ev["inception_params_per_device_bytes"]
  lines.append(f"  {'evaluate':<9s} {_gib(ev['total_per_device_bytes']):>11s} "
               f"{_gib(ev_params):>11s} "
               f"{'-':>11s} {_gib(compiled(ev['inception_compiled_per_device_bytes'])):>11s}  "
               "(generator + Inception; compiled: the Inception forward)")
  e = r["estimates"]
  lines.append(f"On {e['chips']} chips at {e['mfu']:.0%} MFU ({r['config']['num_steps']:,d} steps; "
               "prices are assumptions, see step_cost.REFERENCE_CHIPS):")
  lines.append(f"  {'chip':<10s} {'step s':>9s} {'img/s':>10s} {'run h':>9s} {'$/100k steps':>13s} "
               f"{'$/run':>11s} fits")
  for name, x in e["per_chip"].items():
    lines.append(f"  {name:<10s} {x['step_time_s']:9.3g} {x['images_per_s']:10.4g} "
                 f"{x['run_hours']:9.3g} {x['usd_per_100k_steps']:13,.0f} "
                 f"{x['usd_per_run']:11,.0f} {x['fits_in_hbm']}")
  for line in lines:
    logging.info("%s", line)


def run(config, workdir: str) -> dict:
  """Analyzes the config's step on config.dry_run.devices devices, writes WORKDIR/dry_run.json.
  Stops on SIGINT / SIGTERM (errors.Interrupted) with nothing written."""
  build.validate_config(config)
  n = int(config.dry_run.devices) or jax.device_count()
  mfu = float(config.dry_run.mfu)
  with signals.StopOnSignal(unit="phase (lowering or compiling)",
                            then="exit without writing dry_run.json") as stop:

    def between():
      if stop.signum is not None:
        raise stop.interrupted(_RERUN + ".")

    if n <= jax.device_count():
      result = step_cost.analyze(config, num_devices=n, mfu=mfu, between=between)
    else:
      logging.info("Simulating %d CPU devices in a subprocess (this process has %d).", n,
                   jax.device_count())
      result = _analyze_in_subprocess(config, n, mfu, stop=stop)
    between()
    path = epath.Path(workdir) / "dry_run.json"
    text = json.dumps(result, indent=2, sort_keys=True)
    files.write_atomic(path, lambda tmp: epath.Path(tmp).write_text(text))
  _log_table(result)
  logging.info("Wrote %s", path)
  return result


def _exit_with_parent() -> None:
  """The subprocess ends itself when its parent is gone (a second signal kills the parent at
  once, without terminating the child it started in its own session)."""
  parent = os.getppid()

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(1)

  threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
  # Subprocess entry of _analyze_in_subprocess: CONFIG_PICKLE OUT_JSON NUM_DEVICES MFU COMPILE.
  _exit_with_parent()
  _cfg_path, _out_path, _n, _mfu, _compile = sys.argv[1:6]
  with open(_cfg_path, "rb") as _f:
    _config = pickle.load(_f)
  with open(_out_path, "w") as _f:
    json.dump(step_cost.analyze(_config, num_devices=int(_n), compile=bool(int(_compile)),
                                mfu=float(_mfu)), _f)
