"""Shared pieces of the benchmark scripts: named configs, the matmul peak, host facts, JSON out.

The scripts run as files (`python benchmarks/NAME.py`), so benchmarks/ is on sys.path
and they `import common`.

Configs: 'tiny', 'demo' and 'mid' are whole SimFlow runs (the train step with its VAE);
FLOW_CONFIGS are flow-only models shared by the train and sample benchmarks and the
PyTorch reference (apple/ml-tarflow): 'tarflow256' is 256 tokens of 16 dims (16x16x16
latents, patch 1), width 256, 4 blocks x 2 layers, head_dim 64, 10 classes, additive
class conditioning, float32; 'tarflow64' and 'tarflow1024' are the same model over
8x8 and 32x32 latents.
"""
import json
import os
import platform
import resource
import statistics
import sys
import time

# This checkout's packages (configs, simflow_jax), after anything put first on purpose.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(1, ROOT)

if os.path.dirname(os.path.abspath(getattr(sys.modules["__main__"], "__file__", "") or ".")) == \
    os.path.dirname(os.path.abspath(__file__)):  # a benchmark script, before JAX loads
  from simflow_jax import host_memory  # noqa: E402
  host_memory.reexec_keeping_memory()  # malloc keeps freed memory, as main.py (simflow_jax/host_memory.py)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from configs import demo, tiny  # noqa: E402

CONFIGS = ("tiny", "demo", "mid")
FLOW_CONFIGS = {"tarflow64": 8, "tarflow256": 16, "tarflow1024": 32}  # name -> latent side


def flow_model(name: str):
  """The flow-only benchmark model `name` (FLOW_CONFIGS): (flow, latent side, channels)."""
  from simflow_jax.models import flow as flow_lib  # noqa: PLC0415 (scripts import common first)
  if name not in FLOW_CONFIGS:
    raise ValueError(f"Unknown benchmark config {name!r}; choose from {tuple(FLOW_CONFIGS)}.")
  side, channels = FLOW_CONFIGS[name], 16
  flow = flow_lib.Flow(seq_len=side * side, token_dim=channels, width=256, layers_per_block=(2, 2, 2, 2),
                       head_dim=64, cond="add", num_classes=10)
  return flow, side, channels


def random_params(tree, std: float = 0.02, seed: int = 0):
  """Adds N(0, std^2) noise to every leaf: non-trivial weights (proj_out starts at zero)."""
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [l + std * rng.standard_normal(l.shape).astype(np.float32)
                                      for l in leaves])


def tarflow_model(repo: str, name: str, std: float = 0.02, seed: int = 0):
  """ml-tarflow's transformer_flow.Model (imported from `repo`, a checkout of
  apple/ml-tarflow) for the flow config `name`, with random non-trivial weights."""
  import torch  # noqa: PLC0415
  sys.path.insert(0, repo)
  import transformer_flow  # noqa: PLC0415
  side = FLOW_CONFIGS[name]
  torch.manual_seed(seed)
  model = transformer_flow.Model(in_channels=16, img_size=side, patch_size=1, channels=256,
                                 num_blocks=4, layers_per_block=2, num_classes=10)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(std * torch.randn_like(p))
  return model


def get_config(name: str, batch_size: int = 0):
  """A benchmark config; batch_size > 0 replaces data.batch_size (the global batch).

  'tiny' and 'demo' are configs/tiny.py and configs/demo.py. 'mid' is the demo's
  losses and optimiser with its own, pinned model sizes: 32 x 32 x 3 synthetic images,
  batch 64, an f4 VAE (ch 32, ch_mult (1, 2, 2), one res block, 16 latent channels:
  8 x 8 x 16 latents) and a flow over 64 tokens of 16 dims (patch 1) of width 256,
  four blocks of two layers, head_dim 64.
  """
  if name not in CONFIGS:
    raise ValueError(f"Unknown benchmark config {name!r}; choose from {CONFIGS}.")
  c = tiny.get_config() if name == "tiny" else demo.get_config()
  if name == "mid":
    c.data.source, c.data.image_size, c.data.channels, c.data.batch_size = "synthetic", 32, 3, 64
    c.vae.ch, c.vae.ch_mult, c.vae.num_res_blocks, c.vae.attn_mid = 32, (1, 2, 2), 1, False
    c.vae.z_channels = 16
    c.flow.patch_size, c.flow.width, c.flow.layers, c.flow.head_dim = 1, 256, (2, 2, 2, 2), 64
  if batch_size > 0:
    c.data.batch_size = batch_size
  return c


def devices(num_devices: int = 0) -> list:
  local = jax.local_devices()
  if num_devices > len(local):
    raise ValueError(f"--num_devices={num_devices} but {len(local)} devices are present.")
  return local[:num_devices or len(local)]


def timed(fn, reps: int) -> tuple[list, list]:
  """Wall and CPU seconds of `reps` calls of fn(), each blocked until its outputs are ready.

  CPU seconds (all threads of this process) barely change when other jobs share the
  cores, wall seconds do: on a shared machine compare rates per CPU second.
  """
  wall, cpu = [], []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return wall, cpu


def matmul_peak(devs, size: int = 2048, reps: int = 10, dtype: str = "float32") -> dict:
  """FLOP/s of one (size x size) @ (size x size) matmul per device, all devices at once.

  This is the machine's achievable dense-matmul rate for the same devices a train step
  uses, measured in the calling process (same threads, same moment). Rates use the
  median call (robust to other load on a shared machine); the best call is reported too,
  and the rate per CPU second of this process (see `timed`).
  """
  n = len(devs)
  mesh = Mesh(np.asarray(devs), ("d",))
  sh = NamedSharding(mesh, P("d"))
  k1, k2 = jax.random.split(jax.random.key(0))
  make = jax.jit(lambda k: jax.random.normal(k, (n, size, size), dtype), out_shardings=sh)
  x, y = make(k1), make(k2)
  matmul = jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), out_shardings=sh)
  jax.block_until_ready(matmul(x, y))  # compile and warm up
  wall, cpu = timed(lambda: matmul(x, y), reps)
  flops = 2.0 * n * size ** 3
  return {"size": size, "dtype": dtype, "devices": n, "reps": reps, "flops_per_call": flops,
          "flops_per_s": flops / statistics.median(wall), "flops_per_s_best": flops / min(wall),
          "flops_per_cpu_s": flops / statistics.median(cpu)}


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def machine() -> dict:
  d = jax.devices()
  return {"platform": d[0].platform, "device_kind": d[0].device_kind, "device_count": len(d),
          "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
          "python": platform.python_version(), "jax": jax.__version__,
          "processor": platform.processor() or platform.machine()}


def emit(obj) -> None:
  print(json.dumps(obj, indent=2, sort_keys=True), flush=True)
