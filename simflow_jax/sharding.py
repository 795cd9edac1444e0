"""Device mesh, sharding rules, and the host <-> device plumbing of the CLIs.

Mesh axes: ('data', 'fsdp'), built by jax.make_mesh (topology-aware). The batch is split over both axes (every device sees
its own examples). Parameters and optimiser state are replicated, except leaves
whose path matches `mesh.fsdp_regex` and that have at least `mesh.fsdp_min_size`
elements: those are split over 'fsdp' along their largest dimension divisible by
the fsdp size (ZeRO-3 / FSDP; XLA inserts the all-gathers).

Host <-> device (sampling, evaluation, export): a host array (N, ...) present in full on
every process is padded with zero rows to a multiple of the device count (N_pad, ...),
split over the batch axes, and results (N_pad, ...) are gathered back in full to every
process, where the padding rows are dropped.
"""
import math
import os
import re
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(initialization_timeout: int = 300) -> None:
  """Multi-host TPU pods, SLURM clusters and explicit coordinators need
  jax.distributed.initialize() before any other JAX call; single hosts do not."""
  multi = ("JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_NTASKS" in os.environ
           and int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"])
  if multi:
    initialize_distributed(initialization_timeout=initialization_timeout)


# A process of a multi-process run that stops answering (killed, its host lost) is declared
# dead after this many seconds; the coordination service then ends every other process with
# an error naming it, instead of leaving them blocked in a collective. SIMFLOW_HEARTBEAT_TIMEOUT
# (seconds) overrides it.
HEARTBEAT_TIMEOUT_S = 100


def initialize_distributed(num_processes: int | None = None, process_id: int | None = None,
                           coordinator_address: str | None = None,
                           initialization_timeout: int = 300) -> None:
  """jax.distributed.initialize with a bounded wait for a dead peer (HEARTBEAT_TIMEOUT_S).
  The coordinator defaults to JAX_COORDINATOR_ADDRESS (or the cluster's auto-detection); the
  processes must all join within `initialization_timeout` seconds."""
  timeout = int(os.environ.get("SIMFLOW_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT_S))
  if timeout < 1:
    raise ValueError(f"SIMFLOW_HEARTBEAT_TIMEOUT={timeout} must be a positive number of seconds.")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=timeout)


def wait_for_processes(name: str, timeout_s: int = 3600) -> None:
  """A barrier of every process through the coordination service (no device collective):
  for meeting after long, uneven work such as compiling, where a collective would give up
  (XLA:CPU's gloo waits 30 s for the other processes at its first use). Nothing single-host."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # the client jax.distributed.initialize started
  client = distributed.global_state.client
  if client is None:
    multihost_utils.sync_global_devices(name)
  else:
    client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = mesh_cfg.fsdp
  data = mesh_cfg.data if mesh_cfg.data > 0 else n // max(fsdp, 1)
  if fsdp < 1 or data * fsdp != n:
    raise ValueError(f"mesh.data={mesh_cfg.data} x mesh.fsdp={fsdp} must multiply to the "
                     f"{n} available devices (use mesh.data=-1 to take the rest).")
  auto = (jax.sharding.AxisType.Auto,) * 2  # linen's sharding constraints need Auto axes
  # jax.make_mesh orders the devices by the physical topology (TPU ICI rings, GPU NVLink
  # islands), so that 'fsdp' neighbours are near each other; on CPU it keeps their order.
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto, devices=devices)


def process_batch_slot(mesh, batch_size: int) -> tuple[int, int]:
  """(slot, count): this process's devices hold rows [slot * B/count, (slot + 1) * B/count)
  of a global batch of batch_size split over the batch axes, count = the process count: the
  slice the data pipeline must load on this host (pipeline.make_train_loader's process_index).
  A clear error where the mesh gives a process no contiguous slice of the batch."""
  count = jax.process_count()
  per = batch_size // count
  rows = batch_sharding(mesh).addressable_devices_indices_map((batch_size,)).values()
  lo = min(r[0].start or 0 for r in rows)
  hi = max(batch_size if r[0].stop is None else r[0].stop for r in rows)
  if batch_size % count or hi - lo != per or lo % per:
    raise ValueError(f"Process {jax.process_index()} holds rows {lo}..{hi} of the global batch "
                     f"of {batch_size} on this mesh, not one contiguous 1/{count} of it; use "
                     "mesh.fsdp that divides each host's device count.")
  return lo // per, count


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _leaf_spec(path: str, shape, fsdp: int, mesh_cfg) -> P:
  size = int(np.prod(shape)) if shape else 1
  if fsdp <= 1 or size < mesh_cfg.fsdp_min_size or not re.search(mesh_cfg.fsdp_regex, path):
    return P()
  # Largest dimension divisible by the fsdp size (ties: the later one).
  dims = sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True)
  for i in dims:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(abstract_tree, mesh, mesh_cfg, prefix: str = ""):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, opt state, EMA).
  `prefix` is put before each leaf's path, for a subtree matched as it sits in the train state
  (e.g. '.ema' for the EMA parameters alone: the shardings they were trained with)."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    return NamedSharding(mesh, _leaf_spec(prefix + jax.tree_util.keystr(path),
                                          getattr(leaf, "shape", ()), fsdp, mesh_cfg))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict, mesh) -> dict:
  """Host-local numpy arrays (B_host, ...) -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


# ------------------------------------------------------------------------------------
# Host <-> device: pad -> shard -> gather.
# ------------------------------------------------------------------------------------
def device_multiple(batch_size: int) -> int:
  """batch_size rounded up to a multiple of the device count (a batch is split over all)."""
  n = jax.device_count()
  return max(n, math.ceil(batch_size / n) * n)


def pad_batch(array, size: int) -> np.ndarray:
  """(n <= size, ...) -> (size, ...): zero rows appended, dtype kept."""
  array = np.asarray(array)
  if array.shape[0] > size:
    raise ValueError(f"a batch of {array.shape[0]} rows does not fit in {size}.")
  pad = np.zeros((size - array.shape[0],) + array.shape[1:], array.dtype)
  return np.concatenate([array, pad])


def shard_host_array(mesh, array) -> jax.Array:
  """(N, ...) numpy, the same full array on every process -> a global array split over the
  batch axes (N must be divisible by the device count: pad_batch)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda idx: array[idx])


def fetch(tree):
  """Global (possibly multi-process) arrays -> full numpy arrays on every process."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def map_batches(fn: Callable, x, mesh, batch_size: int) -> np.ndarray:
  """fn (jitted, batch-parallel) over x (N, ...) float32 in zero-padded batches of
  batch_size (a multiple of the device count: device_multiple) -> (N, ...) numpy."""
  x = np.asarray(x, np.float32)
  out = []
  for start in range(0, x.shape[0], batch_size):
    part = x[start:start + batch_size]
    out.append(fetch(fn(shard_host_array(mesh, pad_batch(part, batch_size))))[:part.shape[0]])
  return np.concatenate(out)


def on_mesh(tree, mesh):
  """Arrays already placed on `mesh` (e.g. parameters restored by the mesh rules) are kept as
  they are; anything else (numpy, single-device arrays) is replicated over the mesh."""
  def one(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and s.mesh == mesh:
      return x
    return jax.device_put(x, replicated(mesh))
  return jax.tree.map(one, tree)


def local_data_mesh() -> jax.sharding.Mesh:
  """This process's devices as a ('data', 'fsdp') mesh of shape (n, 1): for per-host work that
  is split over the local devices and needs no other process (e.g. feature networks fed the
  same full host arrays on every process)."""
  devices = jax.local_devices()
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((len(devices), 1), BATCH_AXES, axis_types=auto, devices=devices)


def map_fixed_batches(fn: Callable, x, mesh, batch_size: int):
  """fn (jitted, per-example, batch-parallel; any pytree out) over x (N, ...) in batches of
  exactly batch_size rows (a multiple of the mesh size): the last, shorter batch is padded
  with zero rows, which are dropped from the outputs, so one compilation serves every batch.
  The batches are split over the mesh's devices; outputs come back as numpy (N, ...)."""
  x = np.asarray(x)
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the mesh's {mesh.size} devices.")
  parts = []
  for start in range(0, x.shape[0], batch_size):
    part = x[start:start + batch_size]
    out = fn(shard_host_array(mesh, pad_batch(part, batch_size)))
    local = all(a.is_fully_addressable for a in jax.tree.leaves(out))
    out = jax.tree.map(np.asarray, out) if local else fetch(out)
    parts.append(jax.tree.map(lambda a, n=part.shape[0]: a[:n], out))
  return jax.tree.map(lambda *a: np.concatenate(a), *parts)
