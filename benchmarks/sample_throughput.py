"""Sampling throughput of the flow inverse: sequential (KV cache), Jacobi and selective.

  python benchmarks/sample_throughput.py                         # tarflow256, batch 8 and 64
  python benchmarks/sample_throughput.py --batches=8 --guidance=0,2 --rounds=3 \
      --baseline_repo=/tmp/base --tarflow_repo=/tmp/ml-tarflow --scaling=tarflow64,tarflow1024

Times noise -> tokens (the flow's inverse, no VAE: the PyTorch reference has none) on the
flow config --config (benchmarks/common.py: 'tarflow256' is the model of
benchmarks/train_throughput.py --configs=tarflow256), random non-trivial weights
(--perturb), for every batch x guidance weight x method (cached | jacobi | selective).
With --baseline_repo (a checkout of commit 4746437, e.g. `git worktree add /tmp/base
4746437`) and --tarflow_repo (a checkout of apple/ml-tarflow) the same samplers of those
run in worker processes (benchmarks/sample_worker.py), interleaved call by call with
ours (A, B, C, A, B, C, ...), so the ratios compare runs under the same machine load.

Prints one JSON object {"machine", "config", "load_average_{before,after}", "results",
"scaling"}. Per (batch, guidance):
  METHOD: compile_s, seconds (median over --rounds), images_per_s, seconds_per_token_step
          (seconds / (blocks x tokens): one cached step of every layer of a block),
          peak_memory_mb (XLA's temp + argument + output buffers of the compiled sampler),
          mean_steps (Jacobi iterations per chunk; the sequential blocks count tokens)
  baseline, tarflow: seconds (median), images_per_s, compile_s (baseline)
  speedup_vs_baseline, speedup_vs_tarflow: cached images/s over theirs
  selective_speedup: selective over cached
  METHOD_bfloat16 (with --kv_cache_dtypes=float32,bfloat16): the same sampler with a
          bfloat16 KV cache (sample.kv_cache_dtype), and METHOD_bfloat16_speedup over float32;
          e.g. `--batches=64 --guidance=0 --methods=cached --kv_cache_dtypes=float32,bfloat16`
          reports batch-64 speed and peak memory of both
"scaling": for the --scaling configs (and --config), batch 8, unguided, cached: time per
image, FLOPs per image (flops_per_image) and their rate as a fraction of this process's
2048^2 f32 matmul rate (matmul_flops_per_s), compile time and peak memory.
Each (batch, guidance) result is also printed to stderr as one JSON line when it is done.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)
from simflow_jax.models import guidance as guidance_lib
from simflow_jax.models import inverse as inverse_lib

_CONFIG = flags.DEFINE_string("config", "tarflow256", f"Flow config: {tuple(common.FLOW_CONFIGS)}.")
_BATCHES = flags.DEFINE_list("batches", ["8", "64"], "Batch sizes.")
_GUIDANCE = flags.DEFINE_list("guidance", ["0", "2"], "Guidance weights (0 = unguided).")
_METHODS = flags.DEFINE_list("methods", ["cached", "jacobi", "selective"], "Inverse methods.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed calls of each sampler (interleaved).")
_CHUNK = flags.DEFINE_integer("jacobi_chunk", 32, "Jacobi chunk (0 = the whole sequence).")
_THRESHOLD = flags.DEFINE_float("jacobi_threshold", 1e-3, "Jacobi stopping threshold.")
_WINDOWS = flags.DEFINE_integer("kv_windows", 8, "KV-cache windows of a sequentially decoded block.")
_KV_DTYPES = flags.DEFINE_list("kv_cache_dtypes", ["float32"], "KV-cache dtypes (sample.kv_cache_dtype): "
                                "float32, bfloat16; each beside float32 is timed as METHOD_DTYPE.")
_PERTURB = flags.DEFINE_float("perturb", 0.02, "Std of the noise added to the flow parameters.")
_BASELINE = flags.DEFINE_string("baseline_repo", "", "Checkout of commit 4746437 to time side by side.")
_TARFLOW = flags.DEFINE_string("tarflow_repo", "", "Checkout of apple/ml-tarflow to time side by side.")
_SCALING = flags.DEFINE_list("scaling", [], "Extra flow configs for time per image vs tokens.")


class Worker:
  """benchmarks/sample_worker.py in a subprocess: one timed sampler call per request."""

  def __init__(self, impl: str, config: str, baseline_repo: str = "", tarflow_repo: str = ""):
    here = os.path.dirname(os.path.abspath(__file__))
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(here, "sample_worker.py"), f"--impl={impl}", f"--config={config}",
         f"--baseline_repo={os.path.abspath(baseline_repo) if baseline_repo else ''}",
         f"--tarflow_repo={tarflow_repo}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(self.proc.stdout.readline())["ready"]

  def __call__(self, batch: int, guidance: float) -> dict:
    self.proc.stdin.write(json.dumps({"batch": batch, "guidance": guidance}) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the sampler worker died (see its stderr above)")
    return json.loads(line)

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def build_sampler(flow, params, batch: int, guidance: float, method: str, kv_dtype: str = "float32"):
  """Compiles noise -> tokens; returns (call() -> (tokens, steps), compile seconds, peak MB)."""
  guides = guidance_lib.block_guides(flow, guidance)
  cache_dtype = inverse_lib.kv_cache_dtype(kv_dtype)
  fn = jax.jit(lambda p, z, y: inverse_lib.inverse(flow, p, z, y, method, guides, chunk=_CHUNK.value,
                                                   threshold=_THRESHOLD.value, windows=_WINDOWS.value,
                                                   cache_dtype=cache_dtype))
  z = jax.random.normal(jax.random.key(batch), (batch, flow.seq_len, flow.token_dim))
  y = jnp.arange(batch, dtype=jnp.int32) % flow.num_classes
  t0 = time.perf_counter()
  compiled = fn.lower(params, z, y).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2 ** 20
  return (lambda: compiled(params, z, y)), compile_s, peak


def flops_per_image(flow) -> float:
  """FLOPs of one image's sequential inverse (unguided): per token of every block, the
  dense layers' matmuls (2 x weights) and causal attention over the t + 1 tokens so far
  (q.k and weights.v: 4 x width x (t + 1)), plus the block's input and output projections."""
  w, d, t = flow.width, flow.token_dim, flow.seq_len
  layer = 2 * (4 * w * w + 2 * flow.mlp_ratio * w * w)   # q, k, v, out, fc1, fc2
  attention = 4 * w * t * (t + 1) / 2                    # summed over the tokens of a block
  per_block = lambda depth: t * (depth * layer + 2 * (d * w + w * 2 * d)) + depth * attention
  return float(sum(per_block(depth) for depth in flow.layers_per_block))


def timed_call(call) -> tuple[float, object]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(call())
  return time.perf_counter() - t0, out


def make_params(flow):
  tokens = jnp.zeros((1, flow.seq_len, flow.token_dim))
  init = jax.jit(flow.init)(jax.random.key(0), tokens, jnp.zeros((1,), jnp.int32))["params"]
  return common.random_params(init, _PERTURB.value)


def bench_case(flow, params, batch, guidance, workers) -> dict:
  steps_per_call = flow.num_blocks * flow.seq_len
  samplers, out = {}, {}
  for kv_dtype in _KV_DTYPES.value:
    for method in _METHODS.value:
      name = method if kv_dtype == "float32" else f"{method}_{kv_dtype}"
      call, compile_s, peak = build_sampler(flow, params, batch, guidance, method, kv_dtype)
      samplers[name] = call
      out[name] = {"compile_s": compile_s, "peak_memory_mb": peak, "times": []}
  for name in workers:
    out[name] = {"times": []}
  for _ in range(_ROUNDS.value):  # interleaved: ours, then each worker, every round
    for method, call in samplers.items():
      seconds, (_, steps) = timed_call(call)
      out[method]["times"].append(seconds)
      out[method]["mean_steps"] = float(np.asarray(steps).mean())
    for name, worker in workers.items():
      reply = worker(batch, guidance)
      out[name]["times"].append(reply["seconds"])
      if reply["compile_s"] > 0.5:
        out[name]["compile_s"] = reply["compile_s"]
  for entry in out.values():
    entry["seconds"] = statistics.median(entry["times"])
    entry["images_per_s"] = batch / entry["seconds"]
    entry["seconds_per_token_step"] = entry["seconds"] / steps_per_call
  for name in workers:
    if "cached" in out:
      out[f"speedup_vs_{name}"] = out[name]["seconds"] / out["cached"]["seconds"]
  if "cached" in out and "selective" in out:
    out["selective_speedup"] = out["cached"]["seconds"] / out["selective"]["seconds"]
  for kv_dtype in _KV_DTYPES.value:
    for method in _METHODS.value:
      if kv_dtype != "float32" and method in out:
        out[f"{method}_{kv_dtype}_speedup"] = out[method]["seconds"] / out[f"{method}_{kv_dtype}"]["seconds"]
  return out


def main(argv):
  del argv
  if _ROUNDS.value < 1:
    raise app.UsageError("--rounds must be >= 1.")
  for name in [_CONFIG.value, *_SCALING.value]:
    common.flow_model(name)  # unknown names fail before any work
  for kv_dtype in _KV_DTYPES.value:
    try:
      inverse_lib.kv_cache_dtype(kv_dtype)
    except ValueError as e:
      raise app.UsageError(f"--kv_cache_dtypes: {e}") from e
  load_before = os.getloadavg()
  workers = {}
  if _BASELINE.value:
    workers["baseline"] = Worker("baseline", _CONFIG.value, baseline_repo=_BASELINE.value)
  if _TARFLOW.value:
    workers["tarflow"] = Worker("tarflow", _CONFIG.value, tarflow_repo=_TARFLOW.value)
  flow, _, _ = common.flow_model(_CONFIG.value)
  params = make_params(flow)
  results = {}
  for batch in map(int, _BATCHES.value):
    for guidance in map(float, _GUIDANCE.value):
      name = f"batch{batch}_guidance{guidance:g}"
      results[name] = bench_case(flow, params, batch, guidance, workers)
      print(json.dumps({name: results[name], "load_average": os.getloadavg()}), file=sys.stderr, flush=True)
  for worker in workers.values():
    worker.close()
  scaling = {}
  peak_rate = common.matmul_peak(jax.local_devices()[:1])["flops_per_s"]
  for name in [_CONFIG.value, *_SCALING.value]:
    f, _, _ = common.flow_model(name)
    call, compile_s, peak = build_sampler(f, make_params(f), 8, 0.0, "cached")
    times = [timed_call(call)[0] for _ in range(_ROUNDS.value)]
    per_image = statistics.median(times) / 8
    scaling[name] = {"tokens": f.seq_len, "compile_s": compile_s, "peak_memory_mb": peak,
                     "seconds_per_image": per_image, "flops_per_image": flops_per_image(f),
                     "matmul_peak_fraction": flops_per_image(f) / per_image / peak_rate,
                     "seconds_per_token_step": statistics.median(times) / (f.num_blocks * f.seq_len)}
  common.emit({"machine": common.machine(), "config": _CONFIG.value, "rounds": _ROUNDS.value,
               "matmul_flops_per_s": peak_rate, "kv_windows": _WINDOWS.value, "jacobi_chunk": _CHUNK.value, "jacobi_threshold": _THRESHOLD.value, "perturb": _PERTURB.value,
               "kv_cache_dtypes": _KV_DTYPES.value,
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "results": results, "scaling": scaling})


if __name__ == "__main__":
  app.run(main)
