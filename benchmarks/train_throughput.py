"""Train-step throughput: compile time, step time, images/s, memory, FLOP/s vs the matmul peak.

  python benchmarks/train_throughput.py                     # demo and mid, 10 steps each
  python benchmarks/train_throughput.py --configs=mid --steps=20 --batch=128

Prints one JSON object: {"machine": {...}, "results": {CONFIG: {...}}}. Per config:
  trace_lower_s, compile_s   building the real step (the one simflow_jax.train runs:
                             sharded, state-donating) for the config's global batch
  step_time_s_{median,mean,min}, images_per_s (median step)
  flops_per_step             XLA cost analysis of the lowered step, layers unrolled
                             (simflow_jax.dry_run.step_flops)
  achieved_flops_per_s       flops_per_step / median step time
  matmul                     the matmul peak on the same devices, measured in this
                             process right after the steps (benchmarks/common.py)
  fraction_of_matmul_peak    achieved_flops_per_s / matmul.flops_per_s
  step_cpu_s_median, achieved_flops_per_cpu_s, fraction_of_matmul_peak_cpu
                             the same per CPU second of this process (all threads): on
                             a machine shared with other jobs, the wall-clock ratio
                             mixes in their load, the CPU-time ratio much less
  peak_rss_mb                this process's peak host memory after the config ran
                             (cumulative: configs run in the order given)
Random batches are placed on the devices once, and the frozen networks (if the config
uses LPIPS or REPA) get random parameters of the right shapes: the numbers are the
step's, not the input pipeline's. Configs: tiny | demo | mid (common.get_config).
"""
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)
from simflow_jax import dry_run, sharding

_CONFIGS = flags.DEFINE_list("configs", ["demo", "mid"], f"Benchmark configs: {common.CONFIGS}.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per config.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch size (0 = the config's data.batch_size).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Mesh size (0 = all local devices).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the matmul-peak matrices.")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 10, "Timed matmuls.")


def random_inputs(spec, seed: int = 0):
  """A random batch and random frozen-network params, placed on the devices."""
  k_img, k_lab, k_frozen = jax.random.split(jax.random.key(seed), 3)
  image, label, n_classes = spec.batch["image"], spec.batch["label"], spec.models.num_classes
  batch = {"image": jax.jit(lambda k: jax.random.uniform(k, image.shape, jnp.float32, -1.0, 1.0),
                            out_shardings=image.sharding)(k_img),
           "label": jax.jit(lambda k: jax.random.randint(k, label.shape, 0, n_classes),
                            out_shardings=label.sharding)(k_lab)}
  leaves, treedef = jax.tree.flatten(spec.frozen)
  keys = jax.random.split(k_frozen, max(len(leaves), 1))
  frozen = jax.tree.unflatten(treedef, [
      jax.device_put(0.02 * jax.random.normal(k, x.shape, x.dtype), x.sharding)
      for k, x in zip(keys, leaves)])
  return batch, frozen


def bench_config(name: str) -> dict:
  config = common.get_config(name, _BATCH.value)
  devs = common.devices(_NUM_DEVICES.value)
  mesh = sharding.make_mesh(config.mesh, devs)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    spec = dry_run.build_step(config, mesh)
    lowered = spec.fn.lower(spec.state, spec.batch, spec.frozen)
    t_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = lowered.compile()
    t_compile = time.perf_counter() - t0

    state = spec.create_state(jax.random.key(config.seed))
    batch, frozen = random_inputs(spec, config.seed)

    def one_step():
      nonlocal state
      state, metrics = step(state, batch, frozen)
      return state, metrics

    common.timed(one_step, _WARMUP.value)
    times, cpu = common.timed(one_step, _STEPS.value)
    flops = dry_run.step_flops(config, mesh)
  peak = common.matmul_peak(devs, _MATMUL_SIZE.value, _MATMUL_REPS.value)
  median, median_cpu = statistics.median(times), statistics.median(cpu)
  achieved = flops / median
  b = config.data.batch_size
  return {"global_batch": b, "devices": len(devs), "steps": len(times),
          "params": dry_run.param_counts(spec.state.params)["total"],
          "trace_lower_s": t_lower, "compile_s": t_compile,
          "step_time_s_median": median, "step_time_s_mean": statistics.fmean(times),
          "step_time_s_min": min(times), "images_per_s": b / median,
          "flops_per_step": flops, "achieved_flops_per_s": achieved, "matmul": peak,
          "fraction_of_matmul_peak": achieved / peak["flops_per_s"],
          "step_cpu_s_median": median_cpu, "achieved_flops_per_cpu_s": flops / median_cpu,
          "fraction_of_matmul_peak_cpu": flops / median_cpu / peak["flops_per_cpu_s"],
          "peak_rss_mb": common.peak_rss_mb()}


def main(argv):
  del argv
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--steps must be >= 1 and --warmup >= 0.")
  results = {name: bench_config(name) for name in _CONFIGS.value}
  common.emit({"machine": common.machine(), "results": results})


if __name__ == "__main__":
  app.run(main)
