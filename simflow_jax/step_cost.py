"""What a run's train step costs: parameters, FLOPs, per-device memory, compile time, price.

`analyze(config, num_devices)` is the work of `main.py --mode=dry_run` (commands/dry_run.py):

  python main.py --config=configs/imagenet256.py --mode=dry_run --config.dry_run.devices=64

Nothing is trained, no data is read, no weights file is opened and nothing large is
allocated: the train state, the batch and the frozen networks (LPIPS VGG16, REPA
encoder) are abstract shapes (jax.ShapeDtypeStruct with shardings), and the real,
sharded, state-donating train step (steps.build_step: the one the training loop runs) is
lowered and compiled for them. The result (the command writes it to WORKDIR/dry_run.json and
logs it as a table):

  params          parameter counts: total, per model ('vae', 'flow', ...) and per
                  second-level subtree ('vae/encoder', 'flow/block_5', ...).
  flops           FLOPs of one train step over the global batch, from XLA's cost
                  analysis of the lowered step. HloCostAnalysis counts a while loop's
                  body once, so a scanned layer stack (flow.scan_layers) would count
                  one layer; the count is therefore taken from a copy of the step with
                  the layers unrolled (same math, same remat recompute).
  memory, train   per device, for the mesh of the run: the compiled step's
                  memory_analysis (arguments + outputs - donated aliases + temporaries)
                  and, exactly from the shardings, the bytes of params / optimiser
                  state / EMA each device holds. The compiler is the local one (XLA:CPU
                  when no accelerator is attached): TPU and GPU compilers fuse and
                  rematerialise differently, so read the temporaries as an estimate of
                  the right order, the state bytes as exact.
  timing_s        trace+lower and compile seconds of the real step on this machine: wall
                  clock, and CPU seconds of this process ('_cpu': all its threads; on a
                  machine shared with other jobs the wall clock overstates the cost).
  sample, evaluate  per-device memory of inference on the same mesh (below).
  host_peak_rss_mb  this process's peak resident memory (the dry run allocates no state).
  estimates       step time, images/s, run time and cost on REFERENCE_CHIPS, as many
                  chips as devices in the mesh: step time = FLOPs / (chips x bf16 peak x
                  `mfu`), i.e. compute-bound at the assumed model FLOP utilisation.

The mesh: config.mesh over `num_devices` devices. The command takes the number from
config.dry_run.devices (0: every local device); when it exceeds the local device count, the
analysis runs in a subprocess with that many simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N), so a laptop prices a 64-chip pod.
config.dry_run.mfu sets the assumed model FLOP utilisation. jax.distributed is never
initialised.

Inference is priced beside training (`inference_memory`), per device, on the same mesh:

  train     the train step: compiled peak (else params + optimiser + EMA + frozen nets).
  sample    --mode=sample / the evaluators' sampler: the generator's parameters (EMA, float32,
            every tree but the discriminator: what checkpoint.restore_generator_params reads)
            sharded by the mesh rules (mesh.fsdp); the KV cache of the block that needs the
            most, `kv_cache_per_device_bytes` = layers x 2 (keys, values) x per-device batch
            (x 2 when the block is guided: the [conditional; null] batch) x T tokens x width x
            bytes of sample.kv_cache_dtype, the batch being sample.batch_size rounded up to the
            device count and split over every device; and the compiled sampler's
            memory_analysis (noise -> flow inverse -> VAE decode, on abstract sharded
            parameters and labels), whose temporaries hold the caches and one step's
            activations. total: the compiled peak, else params + KV cache.
  evaluate  sampling, then the FID Inception features of each sampled batch, data-parallel
            over the mesh: the generator's parameters stay resident while the Inception
            network (float32 parameters, replicated) runs on the batch; total =
            max(sample total, generator params + the compiled Inception peak (its
            parameters, one batch's activations and features)), else the parameters alone.

"""
import dataclasses
import math
import resource
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from simflow_jax import sample as sample_lib
from simflow_jax import sharding
from simflow_jax.models import build, guidance, inverse
from simflow_jax.pretrained import inception
from simflow_jax.steps import build_step


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float        # dense bf16 FLOP/s per chip (vendor data sheet)
  hbm_bytes: float         # accelerator memory per chip
  usd_per_chip_hour: float  # ASSUMED on-demand price; edit for your contract


# Assumptions, not measurements. Peak: dense (no sparsity) bf16 matmul FLOP/s from the
# vendors' data sheets. Prices: approximate public on-demand list prices (2025, US
# regions; GPUs: typical cloud H100 / A100 hourly rates); spot, committed-use and
# reserved prices are lower. The estimates scale linearly in both.
REFERENCE_CHIPS = {
    "tpu_v5p": Chip(459e12, 95 * 2 ** 30, 4.20),
    "tpu_v5e": Chip(197e12, 16 * 2 ** 30, 1.20),
    "tpu_v6e": Chip(918e12, 32 * 2 ** 30, 2.70),
    "h100_sxm": Chip(989e12, 80e9, 3.00),
    "a100_sxm": Chip(312e12, 80e9, 1.80),
}
DEFAULT_MFU = 0.4  # configs/base.py dry_run.mfu
COST_STEPS = 100_000  # estimates.*.usd_per_100k_steps


def _unrolled(config):
  """A copy of `config` with the flow's layer stacks unrolled (see the module docstring)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.flow.scan_layers = False
  return c


def _flops(cost) -> float:
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0]
  return float((cost or {}).get("flops", 0.0))


def _scanned(config) -> bool:
  """True when the step has a scanned layer stack of more than one layer."""
  return bool(config.flow.scan_layers) and max(config.flow.layers) > 1


def step_flops(config, mesh, lowered=None) -> float:
  """FLOPs of one train step over the global batch (XLA cost analysis, layers unrolled).

  `lowered` (the config's lowered step) is reused when no layer stack is scanned over
  more than one layer; otherwise a copy of the step with unrolled stacks is lowered.
  """
  if lowered is None or _scanned(config):
    spec = build_step(_unrolled(config), mesh)
    with jax.set_mesh(mesh):
      lowered = spec.fn.lower(spec.state, spec.batch, spec.frozen)
  flops = _flops(lowered.cost_analysis())
  if flops <= 0:
    raise RuntimeError("XLA's cost analysis returned no FLOP count for the train step.")
  return flops


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def param_counts(params: dict) -> dict:
  """{'total': n, 'vae': n, 'vae/encoder': n, ...} for a (possibly abstract) param tree."""
  counts = {"total": _count(params)}
  for name, sub in params.items():
    counts[name] = _count(sub)
    if isinstance(sub, dict):
      for child, leaf in sub.items():
        counts[f"{name}/{child}"] = _count(leaf)
  return counts


def _device_bytes(tree) -> int:
  """Bytes of a tree of sharded ShapeDtypeStructs that one device holds."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def _global_bytes(tree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _compiled_memory(compiled) -> Optional[dict]:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  m = {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in
       ("argument", "output", "alias", "temp", "generated_code")}
  m["peak"] = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  return m


def _peak_rss_mb() -> float:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, macOS: bytes
  return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def _estimates(flops: float, num_devices: int, batch_size: int, num_steps: int, mfu: float,
               peak_bytes: Optional[int]) -> dict:
  out = {}
  for name, chip in REFERENCE_CHIPS.items():
    step_s = flops / (num_devices * chip.peak_flops * mfu)
    dollars_per_s = num_devices * chip.usd_per_chip_hour / 3600.0
    out[name] = {
        "step_time_s": step_s,
        "images_per_s": batch_size / step_s,
        "run_hours": step_s * num_steps / 3600.0,
        "usd_per_100k_steps": step_s * COST_STEPS * dollars_per_s,
        "usd_per_run": step_s * num_steps * dollars_per_s,
        "fits_in_hbm": None if peak_bytes is None else bool(peak_bytes <= chip.hbm_bytes),
    }
  return out


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def generator_params(config, mesh) -> dict:
  """The abstract generator parameters as inference restores them (every tree but the
  discriminator, in the EMA's shardings: checkpoint.restore_generator_params)."""
  models = build.build_models(config)
  params = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  params = {k: v for k, v in params.items() if k != "disc"}
  return _abstract(params, sharding.tree_shardings(params, mesh, config.mesh, prefix=".ema"))


def kv_cache_bytes(config, per_device_batch: int) -> int:
  """Bytes of the largest block's KV cache (all T slots) for `per_device_batch` examples."""
  flow = build.build_models(config).flow
  itemsize = jnp.dtype(inverse.kv_cache_dtype(config.sample.kv_cache_dtype)).itemsize
  guides = guidance.guides_from_config(flow, config.sample)
  return max(depth * 2 * per_device_batch * (1 if guides[k] is None else 2) * flow.seq_len
             * flow.width * itemsize for k, depth in enumerate(flow.layers_per_block))


def inference_memory(config, mesh, compile: bool = True,  # noqa: A002
                     between: Callable[[], None] = lambda: None) -> dict:
  """{'sample': ..., 'evaluate': ...}: per-device memory of sampling and evaluation on `mesh`
  (the module docstring says what is counted). With compile, the sampler and the Inception
  forward are lowered and compiled on abstract inputs for their memory analysis."""
  n = mesh.size
  batch = sharding.device_multiple(int(config.sample.batch_size))
  batch += -batch % n  # split over every device of the mesh
  params = generator_params(config, mesh)
  models = build.build_models(config)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))
  rng = jax.eval_shape(lambda: jax.random.key(0))
  params_bytes = _device_bytes(params)
  sample = {
      "batch_size": batch, "per_device_batch": batch // n,
      "kv_cache_dtype": config.sample.kv_cache_dtype, "inverse": config.sample.inverse,
      "guidance": float(config.sample.guidance),
      "params_global_bytes": _global_bytes(params), "params_per_device_bytes": params_bytes,
      "kv_cache_per_device_bytes": kv_cache_bytes(config, batch // n),
      "compiled_per_device_bytes": None, "compile_s": None,
  }
  image_shape = (batch, config.data.image_size, config.data.image_size, 3)
  inception_params = jax.eval_shape(
      inception.InceptionV3().init, jax.random.key(0),
      jax.ShapeDtypeStruct((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.float32))
  inception_params = _abstract(inception_params["params"],
                               jax.tree.map(lambda _: sharding.replicated(mesh),
                                            inception_params["params"]))
  evaluate = {
      "batch_size": batch, "generator_params_per_device_bytes": params_bytes,
      "inception_params_per_device_bytes": _device_bytes(inception_params),
      "inception_compiled_per_device_bytes": None, "compile_s": None,
  }
  if compile:
    fn = jax.jit(lambda p, l, r: sample_lib.sample_images(models, p, l, r, config.sample),
                 keep_unused=True)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = fn.lower(params, labels, rng).compile()
    sample["compile_s"] = time.perf_counter() - t0
    sample["compiled_per_device_bytes"] = _compiled_memory(compiled)
    between()
    images = jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=sharding.batch_sharding(mesh))
    net = inception.InceptionV3()
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = jax.jit(lambda p, x: net.apply({"params": p}, x)).lower(
          inception_params, images).compile()
    evaluate["compile_s"] = time.perf_counter() - t0
    evaluate["inception_compiled_per_device_bytes"] = _compiled_memory(compiled)
  sample_peak = (sample["compiled_per_device_bytes"] or {}).get("peak")
  sample["total_per_device_bytes"] = (sample_peak if sample_peak is not None else
                                      params_bytes + sample["kv_cache_per_device_bytes"])
  inception_peak = (evaluate["inception_compiled_per_device_bytes"] or {}).get(
      "peak", evaluate["inception_params_per_device_bytes"])
  evaluate["total_per_device_bytes"] = max(sample["total_per_device_bytes"],
                                           params_bytes + inception_peak)
  return {"sample": sample, "evaluate": evaluate}


def analyze(config, num_devices: Optional[int] = None, compile: bool = True,  # noqa: A002
            mfu: float = DEFAULT_MFU, between: Callable[[], None] = lambda: None) -> dict:
  """Parameter counts, FLOPs, per-device memory, compile time and cost of one train step.

  Args:
    config: a full simflow-jax config (configs/*.py).
    num_devices: size of the mesh, taken from the first local devices (default: all).
      To price more devices than this machine has, use --mode=dry_run with
      --config.dry_run.devices=N, or
      start Python with XLA_FLAGS=--xla_force_host_platform_device_count=N (CPU).
    compile: also compile the step (memory analysis and compile time); lowering alone
      gives parameter counts and FLOPs.
    mfu: the assumed model FLOP utilisation of the reference-chip estimates.
    between: called between the phases (lowering, compiling the train step, the sampler,
      the Inception network): the dry run's check for a stop signal, which may raise.
  Returns:
    a JSON-serialisable dict (see the module docstring).
  """
  available = jax.device_count()
  n = available if num_devices is None else int(num_devices)
  if not 1 <= n <= available:
    raise ValueError(f"num_devices={num_devices} but this process has {available} devices: to "
                     f"simulate {num_devices} set --config.dry_run.devices={num_devices} for "
                     "`main.py --mode=dry_run`, or start Python with "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={num_devices} on CPU.")
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu={mfu} must be in (0, 1].")
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:n])

  t0, c0 = time.perf_counter(), time.process_time()
  spec = build_step(config, mesh)
  with jax.set_mesh(mesh):
    lowered = spec.fn.lower(spec.state, spec.batch, spec.frozen)
  timing = {"trace_and_lower": time.perf_counter() - t0,
            "trace_and_lower_cpu": time.process_time() - c0}
  t0 = time.perf_counter()
  flops = step_flops(config, mesh, lowered)
  timing["flop_count_lowering"] = time.perf_counter() - t0
  timing["compile"] = timing["compile_cpu"] = None
  between()

  state = spec.state
  memory = {
      "state_global_bytes": {"params": _global_bytes(state.params),
                             "opt_state": _global_bytes(state.opt_state),
                             "ema": _global_bytes(state.ema)},
      "state_per_device_bytes": {"params": _device_bytes(state.params),
                                 "opt_state": _device_bytes(state.opt_state),
                                 "ema": _device_bytes(state.ema)},
      "frozen_per_device_bytes": _device_bytes(spec.frozen),
      "compiled_per_device_bytes": None,
  }
  if compile:
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    timing["compile"], timing["compile_cpu"] = time.perf_counter() - t0, time.process_time() - c0
    memory["compiled_per_device_bytes"] = _compiled_memory(compiled)
    between()
  peak = (memory["compiled_per_device_bytes"] or {}).get("peak")
  spec_frozen_bytes = memory["frozen_per_device_bytes"]
  train = {"state_per_device_bytes": sum(memory["state_per_device_bytes"].values()),
           "frozen_per_device_bytes": spec_frozen_bytes,
           "compiled_peak_per_device_bytes": peak}
  train["total_per_device_bytes"] = (peak if peak is not None else
                                     train["state_per_device_bytes"] + spec_frozen_bytes)
  inference = inference_memory(config, mesh, compile=compile, between=between)

  b = config.data.batch_size
  return {
      "config": {"image_size": config.data.image_size, "channels": config.data.channels,
                 "global_batch": b, "num_steps": config.train.num_steps,
                 "freeze": config.train.freeze, "flow_dtype": config.flow.dtype,
                 "vae_dtype": config.vae.dtype},
      "mesh": {"devices": n, "shape": dict(mesh.shape), "platform": jax.devices()[0].platform,
               "per_device_batch": b // n},
      "params": param_counts(state.params),
      "frozen_params": {k: _count(v) for k, v in spec.frozen.items()},
      "flops": {"per_step": flops, "per_example": flops / b, "per_device_per_step": flops / n},
      "memory": memory,
      "train": train,
      "sample": inference["sample"],
      "evaluate": inference["evaluate"],
      "timing_s": timing,
      "host_peak_rss_mb": _peak_rss_mb(),
      "estimates": {"mfu": mfu, "chips": n,
                    "per_chip": _estimates(flops, n, b, config.train.num_steps, mfu, peak)},
  }
