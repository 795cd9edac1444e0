"""The jitted train step of a config on a mesh, and the frozen networks it reads.

`build_step(config, mesh)` gives the models, the optimiser, the state's shardings and the
sharded, state-donating jit of train_step.train_step (the one the training loop runs, the dry
run prices and the benchmarks time); `abstract_frozen` the frozen networks' parameters as
shapes (no file read), `load_frozen_networks` the real ones (replicated).
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from simflow_jax import optim, sharding, train_step
from simflow_jax.models import build
from simflow_jax.pretrained import dinov2, lpips


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The jitted train step of `config` on `mesh`, and abstract arguments for it."""
  models: build.Models
  tx: Any
  fn: Callable                # jit(train_step) with in/out shardings, donates the state
  create_state: Callable      # jit(rng -> TrainState) with the state's out_shardings
  state: Any                  # TrainState of ShapeDtypeStructs (with shardings)
  batch: dict                 # {'image', 'label'} ShapeDtypeStructs, global batch
  frozen: dict                # frozen networks' params as ShapeDtypeStructs
  mesh: jax.sharding.Mesh


def _with_sharding(tree, shard):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shard)


def abstract_frozen(config) -> dict:
  """The frozen networks' parameters the step needs, as ShapeDtypeStructs (float32).

  The same tree load_frozen_networks loads from files, built from the known
  architectures only: LPIPS VGG16 (loss.w_lpips > 0), the REPA encoder (repa.enabled).
  """
  frozen = {}
  if config.loss.w_lpips > 0:
    tree = {}
    for path, shape in lpips.expected_shapes().items():
      node = tree
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
    frozen["lpips"] = tree
  if config.repa.enabled:
    encoder = dinov2.make_dinov2(config.repa.encoder)
    x = jax.ShapeDtypeStruct((1, 14, 14, 3), jnp.float32)
    frozen["repa_encoder"] = jax.eval_shape(encoder.init, jax.random.key(0), x)["params"]
  return frozen


def build_step(config, mesh) -> StepSpec:
  """Models, optimiser, state shardings and the jitted step (module docstring)."""
  d = config.data
  n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
  if d.batch_size % n_batch:
    raise ValueError(f"data.batch_size={d.batch_size} (the global batch) must be divisible by the "
                     f"{n_batch} devices of the mesh: change --config.data.batch_size or the "
                     "device count.")
  models = build.build_models(config)
  rng = jax.random.key(config.seed)
  abstract_params = jax.eval_shape(lambda r: build.init_params(models, r), rng)
  tx = optim.make_optimizer(config, abstract_params)
  create = functools.partial(train_step.create_train_state, models, config, tx)
  abstract_state = jax.eval_shape(create, rng)
  state_sh = sharding.tree_shardings(abstract_state, mesh, config.mesh)
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  batch = {"image": jax.ShapeDtypeStruct((d.batch_size, d.image_size, d.image_size, d.channels),
                                         jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((d.batch_size,), jnp.int32, sharding=batch_sh)}
  frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        abstract_frozen(config))
  fn = jax.jit(functools.partial(train_step.train_step, models=models, config=config, tx=tx),
               in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
               donate_argnums=0)
  return StepSpec(models=models, tx=tx, fn=fn,
                  create_state=jax.jit(create, out_shardings=state_sh),
                  state=_with_sharding(abstract_state, state_sh), batch=batch, frozen=frozen,
                  mesh=mesh)


def load_frozen_networks(config, mesh) -> dict:
  """LPIPS and REPA encoder parameters (replicated); clear errors when files are missing."""
  frozen = {}
  if config.loss.w_lpips > 0:
    frozen["lpips"] = lpips.load_lpips_params(config.loss.lpips_weights)
  if config.repa.enabled:
    r = config.repa
    if r.encoder == "tiny" and not r.weights:
      frozen["repa_encoder"] = dinov2.init_random_dinov2_params(jax.random.key(config.seed), "tiny")
    else:
      frozen["repa_encoder"] = dinov2.load_dinov2_params(r.weights, r.encoder)
  return jax.device_put(frozen, sharding.replicated(mesh))
