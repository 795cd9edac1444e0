"""Device mesh and sharding rules.

Mesh axes: ('data', 'fsdp'). The batch is split over both axes (every device sees
its own examples). Parameters and optimiser state are replicated, except leaves
whose path matches `mesh.fsdp_regex` and that have at least `mesh.fsdp_min_size`
elements: those are split over 'fsdp' along their largest dimension divisible by
the fsdp size (ZeRO-3 / FSDP; XLA inserts the all-gathers).

Public API:
  maybe_initialize_distributed()        jax.distributed.initialize() on multi-host runs
  make_mesh(mesh_cfg, devices=None)     -> jax.sharding.Mesh
  batch_sharding(mesh)                  -> NamedSharding for (B, ...) batches
  replicated(mesh)                      -> NamedSharding
  tree_shardings(abstract_tree, mesh, mesh_cfg) -> pytree of NamedSharding
  global_batch(local_batch, mesh)       host-local numpy dict -> global jax.Arrays
"""
import os
import re

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
  """Multi-host TPU pods, SLURM clusters and explicit coordinators need
  jax.distributed.initialize() before any other JAX call; single hosts do not."""
  multi = ("JAX_COORDINATOR_ADDRESS" in os.environ or "SLURM_NTASKS" in os.environ
           and int(os.environ.get("SLURM_NTASKS", "1")) > 1
           or "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"])
  if multi:
    jax.distributed.initialize()


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = mesh_cfg.fsdp
  data = mesh_cfg.data if mesh_cfg.data > 0 else n // max(fsdp, 1)
  if fsdp < 1 or data * fsdp != n:
    raise ValueError(f"mesh.data={mesh_cfg.data} x mesh.fsdp={fsdp} must multiply to the "
                     f"{n} available devices (use mesh.data=-1 to take the rest).")
  grid = np.asarray(devices).reshape(data, fsdp)
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.sharding.Mesh(grid, BATCH_AXES, axis_types=auto)


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


def tree_shardings(abstract_tree, mesh, mesh_cfg):
  """NamedShardings for a pytree of arrays / ShapeDtypeStructs (params, opt state, EMA)."""
  fsdp = mesh.shape["fsdp"]

  def one(path, leaf):
    return NamedSharding(mesh, _leaf_spec(jax.tree_util.keystr(path), getattr(leaf, "shape", ()),
                                          fsdp, mesh_cfg))

  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def global_batch(local_batch: dict, mesh) -> dict:
  """Host-local numpy arrays (B_host, ...) -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
