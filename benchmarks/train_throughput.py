"""Train-step throughput: compile time, step time, images/s, memory, FLOP/s vs the matmul peak.

  python benchmarks/train_throughput.py                     # demo and mid, 10 steps each
  python benchmarks/train_throughput.py --configs=mid --steps=20 --batch=128

Prints one JSON object: {"machine": {...}, "results": {CONFIG: {...}}}. Per config:
  trace_lower_s, compile_s   building the real step (the one simflow_jax.trainer runs:
                             sharded, state-donating) for the config's global batch
  step_time_s_{median,mean,min}, images_per_s (median step)
  flops_per_step             XLA cost analysis of the lowered step, layers unrolled
                             (simflow_jax.step_cost.step_flops)
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

Flow-only configs (common.FLOW_CONFIGS, e.g. --configs=tarflow256, the model of
benchmarks/sample_throughput.py): the flow's own train step, NLL in nats per dimension,
AdamW (lr 1e-4), parameters and optimiser state donated, batch --batch (default 32),
random tokens and labels, layers scanned (--flow_scan_unroll layers per scan
iteration) or unrolled (--flow_scan_layers=false). With
--tarflow_repo=PATH (a checkout of apple/ml-tarflow) the
same step of its PyTorch transformer_flow.Model (model.get_loss, AdamW) is timed in a
worker process (benchmarks/train_worker.py), alternating step by step with ours; the result then holds "tarflow" (its step
times) and "speedup_vs_tarflow" (its median step over ours), and the load averages.
"""
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)
from simflow_jax import sharding, step_cost, steps

_CONFIGS = flags.DEFINE_list("configs", ["demo", "tarflow256"],
                             f"Benchmark configs: {common.CONFIGS + tuple(common.FLOW_CONFIGS)}.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per config.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch size (0 = the config's data.batch_size).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Mesh size (0 = all local devices).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the matmul-peak matrices.")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 10, "Timed matmuls.")
_TARFLOW = flags.DEFINE_string("tarflow_repo", "", "Checkout of apple/ml-tarflow (flow configs).")
_SCAN = flags.DEFINE_bool("flow_scan_layers", True, "Flow configs: layers stacked with nn.scan "
                          "(the library default) or unrolled (flow.scan_layers=False).")
_UNROLL = flags.DEFINE_integer("flow_scan_unroll", None, "Flow configs: layers per scan iteration "
                               "(flow.scan_unroll; unset: the library default, 2, which unrolls "
                               "their two-layer blocks).")


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
    spec = steps.build_step(config, mesh)
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
    flops = step_cost.step_flops(config, mesh)
  peak = common.matmul_peak(devs, _MATMUL_SIZE.value, _MATMUL_REPS.value)
  median, median_cpu = statistics.median(times), statistics.median(cpu)
  achieved = flops / median
  b = config.data.batch_size
  return {"global_batch": b, "devices": len(devs), "steps": len(times),
          "params": step_cost.param_counts(spec.state.params)["total"],
          "trace_lower_s": t_lower, "compile_s": t_compile,
          "step_time_s_median": median, "step_time_s_mean": statistics.fmean(times),
          "step_time_s_min": min(times), "images_per_s": b / median,
          "flops_per_step": flops, "achieved_flops_per_s": achieved, "matmul": peak,
          "fraction_of_matmul_peak": achieved / peak["flops_per_s"],
          "step_cpu_s_median": median_cpu, "achieved_flops_per_cpu_s": flops / median_cpu,
          "fraction_of_matmul_peak_cpu": flops / median_cpu / peak["flops_per_cpu_s"],
          "peak_rss_mb": common.peak_rss_mb()}


def flow_nll_per_dim(flow, params, tokens, labels):
  z, logdet = flow.apply({"params": params}, tokens, labels)[:2]
  return jnp.mean(0.5 * jnp.sum(z ** 2, axis=(1, 2)) - logdet) / (flow.seq_len * flow.token_dim)


class TarflowWorker:
  """benchmarks/train_worker.py in a subprocess: ml-tarflow's train step, N steps per request."""

  def __init__(self, name: str, batch: int):
    here = os.path.dirname(os.path.abspath(__file__))
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(here, "train_worker.py"), f"--tarflow_repo={_TARFLOW.value}",
         f"--config={name}", f"--batch={batch}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(self.proc.stdout.readline())["ready"]

  def __call__(self, steps: int) -> list:
    self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError("the ml-tarflow train worker died (see its stderr above)")
    return json.loads(line)["seconds"]

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def bench_flow_config(name: str) -> dict:
  """The flow-only train step of a FLOW_CONFIGS model (see the module docstring)."""
  flow, _, _ = common.flow_model(name)
  flow = flow.clone(scan_layers=_SCAN.value, scan_unroll=_UNROLL.value or flow.scan_unroll)
  b = _BATCH.value or 32
  tokens = jax.random.normal(jax.random.key(1), (b, flow.seq_len, flow.token_dim))
  labels = jnp.arange(b, dtype=jnp.int32) % flow.num_classes
  params = common.random_params(jax.jit(flow.init)(jax.random.key(0), tokens[:1], labels[:1])["params"])
  opt = optax.adamw(1e-4)

  def train_step(params, opt_state, tokens, labels):
    loss, grads = jax.value_and_grad(lambda p: flow_nll_per_dim(flow, p, tokens, labels))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  t0 = time.perf_counter()
  lowered = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, tokens, labels)
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  step = lowered.compile()
  t_compile = time.perf_counter() - t0
  unrolled = flow.clone(scan_layers=False)
  flops = jax.jit(lambda p, x, y: jax.value_and_grad(flow_nll_per_dim, argnums=1)(unrolled, p, x, y)).lower(
      jax.eval_shape(unrolled.init, jax.random.key(0), tokens[:1], labels[:1])["params"], tokens,
      labels).compile().cost_analysis()["flops"]
  state = [params, opt_state]

  def one_step():
    state[0], state[1], loss = step(state[0], state[1], tokens, labels)
    return loss

  torch_worker = TarflowWorker(name, b) if _TARFLOW.value else None
  load_before = os.getloadavg()
  common.timed(one_step, _WARMUP.value)
  if torch_worker is not None and _WARMUP.value:
    torch_worker(_WARMUP.value)
  times, cpu, torch_times = [], [], []
  for _ in range(_STEPS.value):  # alternating, so both see the same machine load
    wall, c = common.timed(one_step, 1)
    times += wall
    cpu += c
    if torch_worker is not None:
      torch_times += torch_worker(1)
  if torch_worker is not None:
    torch_worker.close()
  peak = common.matmul_peak(common.devices(1), _MATMUL_SIZE.value, _MATMUL_REPS.value)
  median, median_cpu = statistics.median(times), statistics.median(cpu)
  out = {"global_batch": b, "devices": 1, "steps": len(times), "flow_only": True,
         "scan_layers": _SCAN.value, "scan_unroll": flow.scan_unroll,
         "params": sum(x.size for x in jax.tree.leaves(params)),
         "trace_lower_s": t_lower, "compile_s": t_compile,
         "step_time_s_median": median, "step_time_s_mean": statistics.fmean(times),
         "step_time_s_min": min(times), "images_per_s": b / median,
         "flops_per_step": flops, "achieved_flops_per_s": flops / median, "matmul": peak,
         "fraction_of_matmul_peak": flops / median / peak["flops_per_s"],
         "step_cpu_s_median": median_cpu, "achieved_flops_per_cpu_s": flops / median_cpu,
         "fraction_of_matmul_peak_cpu": flops / median_cpu / peak["flops_per_cpu_s"],
         "peak_rss_mb": common.peak_rss_mb(), "load_average_before": load_before,
         "load_average_after": os.getloadavg()}
  if torch_times:
    out["tarflow"] = {"step_time_s_median": statistics.median(torch_times), "step_times_s": torch_times}
    out["speedup_vs_tarflow"] = statistics.median(torch_times) / median
  return out


def main(argv):
  del argv
  if _STEPS.value < 1 or _WARMUP.value < 0:
    raise app.UsageError("--steps must be >= 1 and --warmup >= 0.")
  if _UNROLL.value is not None and _UNROLL.value < 1:
    raise app.UsageError("--flow_scan_unroll must be >= 1 (layers per scan iteration).")
  results = {name: bench_flow_config(name) if name in common.FLOW_CONFIGS else bench_config(name)
             for name in _CONFIGS.value}
  common.emit({"machine": common.machine(), "results": results})


if __name__ == "__main__":
  app.run(main)
