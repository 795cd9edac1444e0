"""Checkpoints with orbax: train state + data-iterator position + run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Saves are atomic (orbax
writes to a temporary directory and renames), optionally asynchronous, and the
last `train.keep_ckpts` are kept. `meta` records the step and a fingerprint of the
model-shaping config, so resuming with an incompatible config is a clear error
instead of a shape crash or, worse, a silent fresh start.
"""
import hashlib
import json
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from configs import base
from simflow_jax.models import build


class CheckpointError(RuntimeError):
  pass


_BASE = base.get_base_config()


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def fingerprint(config) -> dict:
  """The config's PARAMETER_FIELDS (configs/base.py), less its SPEED_FIELDS and the
  FINGERPRINT_AT_DEFAULT_OMITTED fields that hold their defaults."""
  out = {}
  for key in base.PARAMETER_FIELDS:
    node = _get(config, key)
    out[key] = node.to_dict() if hasattr(node, "to_dict") else node
  for dotted in base.SPEED_FIELDS + base.FINGERPRINT_AT_DEFAULT_OMITTED:
    section, field = dotted.rsplit(".", 1)
    if isinstance(out.get(section), dict) and field in out[section]:
      if dotted in base.SPEED_FIELDS or out[section][field] == _get(_BASE, dotted):
        del out[section][field]
  return json.loads(json.dumps(out, default=list, sort_keys=True))


def _digest(fp: dict) -> str:
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
  def __init__(self, workdir: str, config, *, read_only: bool = False):
    self.directory = epath.Path(workdir) / "checkpoints"
    self.config = config
    t = config.train
    options = ocp.CheckpointManagerOptions(
        max_to_keep=t.keep_ckpts, create=not read_only, read_only=read_only,
        enable_async_checkpointing=t.async_ckpt)
    items = ("state", "data", "meta")
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, item_names=items, item_handlers=handlers,
                                         options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
    fp = fingerprint(self.config)
    args = {"state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({"step": int(step), "fingerprint": fp, "digest": _digest(fp)})}
    if data_iterator is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)

  def unreadable(self, step: int, error: Exception) -> CheckpointError:
    """The error for a checkpoint that cannot be read: what to move away, what remains."""
    folder = self.directory / str(step)
    older = sorted((s for s in self.manager.all_steps() if s < step), reverse=True)
    then = (f"step {older[0]}, the newest older checkpoint, is then used"
            if older else "there is no older checkpoint: training then starts from step 0")
    detail = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return CheckpointError(
        f"Checkpoint {folder} is unreadable ({detail}). It is partial or corrupt: move that step "
        f"folder away (mv {folder} {folder}.corrupt) and rerun; {then}. Or use a fresh --workdir.")

  def _check_meta(self, step: int) -> None:
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any failure here means an unreadable checkpoint
      raise self.unreadable(step, e) from e
    fp = fingerprint(self.config)
    if meta.get("digest") != _digest(fp):
      diffs = [k for k in fp if meta.get("fingerprint", {}).get(k) != fp[k]]
      raise CheckpointError(
          f"Checkpoint {self.directory / str(step)} was written with a different model config "
          f"(differs in: {', '.join(diffs) or 'unknown fields'}). Resume with the config it was "
          "trained with, or use a fresh --workdir.")

  def restore(self, abstract_state, data_iterator=None, step: Optional[int] = None):
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint found in {self.directory}.")
    self._check_meta(step)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    rescale = data_iterator is not None and self._data_saved_by_other_count(step)
    if data_iterator is not None and not rescale:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001 - corrupt, partial, or from an incompatible version
      raise self.unreadable(step, e) from e
    if rescale:
      self._restore_rescaled_data(step, data_iterator)
    return restored["state"]

  def _data_saved_by_other_count(self, step: int) -> bool:
    """Whether step's data position was saved by a different number of processes."""
    folder = self.directory / str(step) / "data"
    own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return folder.exists() and not own.exists() and any(folder.glob("process_0-of-*.json"))

  def _restore_rescaled_data(self, step: int, data_iterator) -> None:
    """The data position of a run saved by another number of processes, moved to this one
    (data/pipeline.py, rescale_train_state), or a clear error saying why it cannot be."""
    from simflow_jax.data import pipeline  # local: only a host-count change needs it
    saved = next((self.directory / str(step) / "data").glob("process_0-of-*.json"))
    saved_count = int(saved.name[len("process_0-of-"):-len(".json")])
    state = pipeline.rescale_train_state(json.loads(saved.read_text()), saved_count,
                                         jax.process_count())
    data_iterator.set_state(state)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir: str, config) -> int:
  """The step of WORKDIR's latest checkpoint (read-only; the caller has loaded it)."""
  ckpt = Checkpointer(workdir, config, read_only=True)
  step = ckpt.latest_step()
  ckpt.close()
  return int(step)


def _open_finished(workdir: str, config, step: Optional[int] = None):
  """A read-only Checkpointer of WORKDIR and its latest (or `step`'s) checkpoint, whose
  metadata fits the config; clear errors when there is none."""
  path = epath.Path(workdir) / "checkpoints"
  if not path.exists():
    raise FileNotFoundError(f"No checkpoints in {path}: train first with "
                            f"`python main.py --config=... --workdir={workdir}`, or pass the "
                            "--workdir of a finished run.")
  ckpt = Checkpointer(workdir, config, read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    ckpt.close()
    raise FileNotFoundError(f"{path} holds no finished checkpoint.")
  ckpt._check_meta(step)
  return ckpt, step


def load_params(workdir: str, config, use_ema: Optional[bool] = None) -> dict:
  """Generator parameters {'vae', 'flow'[, 'repa_proj']} of the latest checkpoint on this
  process's first device, whatever device count wrote it: the EMA ones when `use_ema`
  (None: config.sample.use_ema), else the raw ones. Clear errors when there is none.
  It reads the whole saved state: the inference commands use restore_generator_params (the
  generator alone, sharded by the mesh rules); this serves the trainer's VAE warm start, the
  notebook, the benchmarks and tests that want one device's copy."""
  use_ema = bool(config.sample.use_ema) if use_ema is None else use_ema
  path = epath.Path(workdir) / "checkpoints"
  ckpt, step = _open_finished(workdir, config)
  try:
    # Restored onto this process's first device whatever mesh wrote it (a run trained on 8
    # devices is evaluated or sampled on 1): a target tree of the saved shapes and dtypes.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = ckpt.manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    raw = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001 - corrupt or partial: the same advice training gives
    raise ckpt.unreadable(step, e) from e
  ckpt.close()
  tree = raw["ema"] if use_ema else {k: v for k, v in raw["params"].items() if k != "disc"}
  models = build.build_models(config)
  expected = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  expected = {k: v for k, v in expected.items() if k in tree}
  if jax.tree.structure(expected) != jax.tree.structure(tree):
    raise CheckpointError(f"Checkpoint {path / str(step)} does not match the config's models.")
  return jax.tree.map(jax.numpy.asarray, tree)



def restore_generator_params(workdir: str, config, mesh, use_ema: bool = True,
                             step: Optional[int] = None) -> dict:
  """Generator parameters {'vae', 'flow'[, 'repa_proj']} of the latest (or `step`'s)
  checkpoint, EMA by default (raw training parameters with use_ema=False), restored straight
  into the shardings the config's mesh rules give on `mesh` (sharding.tree_shardings: split
  over 'fsdp' as they were trained). An orbax partial restore: only these arrays are read,
  each device reading its own shard; the optimiser moments, the other copy of the
  parameters and the discriminator are never read. Works whatever mesh or process count
  wrote the checkpoint. Clear errors when there is none or it does not fit the config."""
  from simflow_jax import sharding  # local: checkpoint.py is imported by sharding's users
  path = epath.Path(workdir) / "checkpoints"
  ckpt, step = _open_finished(workdir, config, step)
  ckpt.close()
  models = build.build_models(config)
  abstract = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  abstract = {k: v for k, v in abstract.items() if k != "disc"}
  key = "ema" if use_ema else "params"
  shardings = sharding.tree_shardings(abstract, mesh, config.mesh, prefix="." + key)
  target = {key: jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)}
  restore = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                   restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  manager = ocp.CheckpointManager(
      path, item_names=("state",), item_handlers={"state": ocp.PyTreeCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))["state"]
  except Exception as e:  # noqa: BLE001 - corrupt, partial, or saved with other shapes
    raise ckpt.unreadable(step, e) from e
  finally:
    manager.close()
  return restored[key]
