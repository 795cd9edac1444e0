"""checkpoint.restore_generator_params: the generator's EMA (or raw) parameters alone, restored
straight into the mesh rules' shardings (8 simulated devices, fsdp 8), nothing else read."""
import jax
import numpy as np
import pytest

from configs import tiny
from simflow_jax import checkpoint, sharding, steps


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A tiny train state on a (1, 8) mesh with fsdp 8, EMA made different from the params, saved."""
  config = tiny.get_config()
  with config.unlocked():
    config.mesh.fsdp, config.mesh.fsdp_min_size = 8, 256  # the tiny model's larger kernels split
  mesh = sharding.make_mesh(config.mesh)
  spec = steps.build_step(config, mesh)
  state = spec.create_state(jax.random.key(0))
  state = state.replace(ema=jax.tree.map(lambda x: x * 0.5 + 1.0, state.ema))
  workdir = str(tmp_path_factory.mktemp("restore"))
  ckpt = checkpoint.Checkpointer(workdir, config)
  ckpt.save(3, state, force=True)
  ckpt.wait()
  ckpt.close()
  return config, mesh, spec, jax.device_get(state), workdir


@pytest.mark.parametrize("use_ema", [True, False])
def test_restores_the_generator_sharded_as_trained(saved, use_ema):
  config, mesh, spec, state, workdir = saved
  before = {id(a) for a in jax.live_arrays()}
  params = checkpoint.restore_generator_params(workdir, config, mesh, use_ema=use_ema)
  new = [a for a in jax.live_arrays() if id(a) not in before]

  expected = state.ema if use_ema else {k: v for k, v in state.params.items() if k != "disc"}
  trained = spec.state.ema if use_ema else {k: v for k, v in spec.state.params.items() if k != "disc"}
  assert set(params) == set(expected) == {"vae", "flow"}  # no discriminator, no optimiser
  split = 0
  for got, want, abstract in zip(jax.tree.leaves(params), jax.tree.leaves(expected),
                                 jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(got), want)
    assert got.sharding == abstract.sharding  # the shardings the train step used
    shard = got.addressable_shards[0].data
    if "fsdp" in tuple(abstract.sharding.spec):
      split += 1
      assert shard.size == got.size // 8
    else:
      assert shard.size == got.size
  assert split > 0
  # Allocated once, sharded: the only arrays the restore leaves alive are these parameters.
  leaves = jax.tree.leaves(params)
  assert {id(a) for a in new} == {id(a) for a in leaves}
  on_devices = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
  replicated = sum(a.nbytes for a in leaves) * 8
  assert on_devices < replicated


def test_restore_errors_without_a_checkpoint(tmp_path):
  config = tiny.get_config()
  with pytest.raises(FileNotFoundError, match="train first"):
    checkpoint.restore_generator_params(str(tmp_path), config, sharding.make_mesh(config.mesh))
