"""The training loop: mesh, sharded init, jitted step, checkpoints, logging, sample grids.

`train(config, workdir)` runs a run (`main.py --mode=train`, each run of the study), for a
config the caller has validated (models/build.validate_config):
  1. check the VAE run that train.vae_checkpoint names, if any;
  2. build the mesh and the models; create the train state already sharded
     (eval_shape -> shardings -> jit(init, out_shardings)), or restore the latest
     checkpoint in WORKDIR (state, EMA, optimiser, step and data position), so a
     preempted run continues exactly where it stopped. Only once the checkpoint
     has accepted the config is anything in WORKDIR written: config.json (atomically),
     and metrics.jsonl loses the rows of steps after the restored one;
  3. run the jitted, state-donating train step; metrics stay on device and are
     summed there, fetched only every `train.log_every` steps (JSONL + TensorBoard +
     console with steps/s and ETA);
  4. save every `train.ckpt_every` steps and at the end (never a non-finite state;
     a NaN/inf loss stops the run with its step, the last good checkpoint kept);
  5. write a class-conditional sample grid (rows: sample.classes) every `train.sample_every`
     steps and at the end; run the evaluators of config.evals whose every_steps is due
     (evals/declared.py) on the EMA parameters and log their numbers as eval/NAME/metric.
SIGINT / SIGTERM (Ctrl-C, a preemption notice) make the loop stop after the current
step, save a checkpoint there and raise `Interrupted`; a second signal ends the
process at once. Returns the last logged metrics (a dict of floats).
"""
import json
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from absl import logging
from etils import epath

from configs import base
from simflow_jax import checkpoint, files, metric_writers, sample, sharding, signals, steps
from simflow_jax.data import pipeline
from simflow_jax.errors import Interrupted, NonFiniteLossError
from simflow_jax.evals import declared, figures


def _grid_labels(config) -> np.ndarray:
  classes = list(config.sample.classes) or list(range(min(config.data.num_classes, 10)))
  return np.repeat(np.asarray(classes, np.int32), config.train.grid_per_class)


def write_sample_grid(sample_fn, config, params, step, workdir, writer) -> str:
  """Samples one row per class with the EMA generator and writes one PNG grid (also shown in
  TensorBoard); returns its path."""
  labels = _grid_labels(config)
  images = sample_fn(params, jnp.asarray(labels), jax.random.key(config.seed + 1))
  images = np.asarray(jax.device_get(images))
  path = epath.Path(workdir) / "samples" / f"grid_{step:08d}.png"
  if jax.process_index() == 0:
    files.write_atomic(path, lambda tmp: figures.save_image_grid(images, tmp,
                                                                nrow=config.train.grid_per_class))
    with epath.Path(path).open("rb") as f:  # the same grid, rows = classes, in TensorBoard
      grid = np.asarray(Image.open(f).convert("L" if images.shape[-1] == 1 else "RGB"))
    writer.write_images(step, {"samples": grid.reshape(*grid.shape[:2], -1)}, png=False)
  return str(path)


def _save_config(config, workdir) -> None:
  """WORKDIR/config.json, complete or not at all; written once the checkpoint accepted the config."""
  if jax.process_index() == 0:
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    files.write_atomic(epath.Path(workdir) / "config.json",
                       lambda tmp: epath.Path(tmp).write_text(text))


def _load_frozen_vae(state, config, models):
  """Starts from a pretrained VAE (the EMA weights of the run in train.vae_checkpoint)."""
  source = _vae_source_config(config)
  src = checkpoint.load_params(config.train.vae_checkpoint, source, use_ema=True)
  vae = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), src["vae"], state.params["vae"])
  ema = jax.tree.map(jnp.copy, vae)  # own buffers: the step donates params and EMA separately
  return state.replace(params={**state.params, "vae": vae}, ema={**state.ema, "vae": ema})


# The fields that must agree between a run and the run its VAE comes from: the vae section
# but its compute dtype (configs/base.py).
_VAE_FIELDS = tuple(k for k in base.get_base_config().vae if f"vae.{k}" not in base.DTYPE_FIELDS)


def _vae_source_config(config):
  """The config of the run that trained the VAE, read from its workdir; checked against ours."""
  path = epath.Path(config.train.vae_checkpoint) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"train.vae_checkpoint={config.train.vae_checkpoint} has no config.json: "
                            "point it at the --workdir of a finished simflow-jax run.")
  import ml_collections  # local: only this path reads another run's config
  source = ml_collections.ConfigDict(json.loads(path.read_text()))
  ours = {k: config.vae[k] for k in _VAE_FIELDS}
  theirs = {k: source.vae.get(k) for k in _VAE_FIELDS}
  ours["ch_mult"], theirs["ch_mult"] = list(ours["ch_mult"]), list(theirs["ch_mult"] or ())
  diffs = [k for k in _VAE_FIELDS if ours[k] != theirs[k]]
  if diffs or source.data.channels != config.data.channels:
    raise ValueError(f"train.vae_checkpoint={config.train.vae_checkpoint} holds a VAE of a different "
                     f"config (vae.{', vae.'.join(diffs) or 'data.channels'}: theirs "
                     f"{ {k: theirs[k] for k in diffs} }, ours { {k: ours[k] for k in diffs} }). Point "
                     "it at a run trained with this config's vae section.")
  return source


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run of `config` in `workdir` (module docstring)."""
  if config.train.vae_checkpoint and not (epath.Path(workdir) / "checkpoints").exists():
    _vae_source_config(config)  # a missing or mismatched VAE run fails before anything is written
  mesh = sharding.make_mesh(config.mesh)
  spec = steps.build_step(config, mesh)
  models, t = spec.models, config.train
  rng = jax.random.key(config.seed)
  frozen = steps.load_frozen_networks(config, mesh)

  slot, count = sharding.process_batch_slot(mesh, config.data.batch_size)  # rows this host's devices hold
  data_iter = pipeline.make_train_loader(config.data, config.seed, slot, count)
  ckpt = checkpoint.Checkpointer(workdir, config)
  start = ckpt.latest_step()
  with jax.set_mesh(mesh), signals.StopOnSignal("step", "save a checkpoint") as stop:
    if start is None:
      state = spec.create_state(rng)
      if t.vae_checkpoint:
        state = _load_frozen_vae(state, config, models)
      start = 0
    else:
      state = ckpt.restore(spec.state, data_iter)
      logging.info("Resumed from checkpoint at step %d in %s", start, workdir)
    _save_config(config, workdir)  # the checkpoint (if any) accepted the config

    n_params = {k: int(sum(x.size for x in jax.tree.leaves(v))) for k, v in spec.state.params.items()}
    logging.info("Parameters: %s; mesh %s; %d steps, global batch %d", n_params, dict(mesh.shape),
                 t.num_steps, config.data.batch_size)
    writer = metric_writers.MetricWriter(workdir, just_logging=jax.process_index() > 0,
                                         drop_rows_after=start)
    if start == 0:
      writer.write_hparams(config)

    step_fn = spec.fn
    if jax.process_count() > 1:
      # Compile first, then meet: XLA:CPU's gloo waits only 30 s for the other processes at
      # the first collective, and their compiles of the step may drift further apart.
      step_fn = spec.fn.lower(spec.state, spec.batch, spec.frozen).compile()
      sharding.wait_for_processes("simflow_jax train step compiled")
    sample_fn = sample.make_sample_fn(models, config.sample)  # compiled once, used for every grid
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    periodic = declared.build_evaluators(config, models, mesh, workdir, periodic=True)

    acc, n_acc, last, t_log, step_log = None, 0, {}, time.time(), start
    done, metrics = start, None
    for step in range(start, t.num_steps):
      if signals.stop_agreed(stop, done, t.log_every):
        _stop(stop, ckpt, done, state, data_iter, metrics, workdir, writer)
      batch = sharding.global_batch(next(data_iter), mesh)
      state, metrics = step_fn(state, batch, frozen)
      acc = metrics if acc is None else add(acc, metrics)
      n_acc += 1
      done = step + 1
      if done % t.log_every == 0 or done == t.num_steps:
        last = {k: float(v) / n_acc for k, v in jax.device_get(acc).items()}
        if not np.isfinite(last["loss"]):
          ckpt.wait()
          raise NonFiniteLossError(
              f"Non-finite loss ({last['loss']}) in steps {done - n_acc + 1}..{done}. Training stopped; "
              f"{_kept(ckpt, workdir, t.ckpt_every)} Lower the learning rates or check the data.")
        now = time.time()
        rate = (done - step_log) / max(now - t_log, 1e-9)
        last["steps_per_sec"] = rate
        last["images_per_sec"] = rate * config.data.batch_size
        writer.write_scalars(done, last)
        eta = (t.num_steps - done) / max(rate, 1e-9)
        logging.info("step %d/%d  loss %.4f  bpd %.4f  l1 %.4f  %.2f steps/s  ETA %.0fs", done,
                     t.num_steps, last["loss"], last["bits_per_dim"], last.get("recon_l1", float("nan")),
                     rate, eta)
        acc, n_acc, t_log, step_log = None, 0, now, done
      if done % t.ckpt_every == 0 and done != t.num_steps:
        _save_checked(ckpt, done, state, data_iter, metrics, workdir)
      if t.sample_every and done % t.sample_every == 0 and done != t.num_steps:
        write_sample_grid(sample_fn, config, state.ema, done, workdir, writer)
      due = declared.due(periodic, done)
      if due:
        writer.write_scalars(done, declared.scalars(declared.run_all(due, state.ema)))

    if start < t.num_steps or ckpt.latest_step() != t.num_steps:
      _save_checked(ckpt, t.num_steps, state, data_iter, metrics if start < t.num_steps else None,
                    workdir, force=True)
    if signals.stop_agreed(stop, 0, 1):  # arrived after the last step: the final checkpoint is saved
      _stop(stop, ckpt, t.num_steps, state, data_iter, None, workdir, writer)
    grid = write_sample_grid(sample_fn, config, state.ema, t.num_steps, workdir, writer)
    last["grid_path"] = grid
    ckpt.wait()
    ckpt.close()
    writer.close()
  logging.info("Done: %d steps; sample grid %s", t.num_steps, grid)
  return last


def _stop(stop, ckpt, done, state, data_iter, metrics, workdir, writer):
  """Saves step `done` (unless saved already), waits for the save and raises Interrupted."""
  ckpt.wait()
  if done > 0 and ckpt.latest_step() != done:
    _save_checked(ckpt, done, state, data_iter, metrics, workdir, force=True)
    ckpt.wait()
  saved = ckpt.latest_step()
  ckpt.close()
  writer.close()
  name = signal.Signals(stop.signum).name
  if saved is None:
    raise Interrupted(f"Interrupted by {name} before the first step: no checkpoint to save; "
                      "rerun the same command to start again.", stop.signum)
  raise Interrupted(f"Interrupted by {name} at step {done}: checkpoint {saved} saved in "
                    f"{ckpt.directory}; rerun the same command to resume.", stop.signum)


def _kept(ckpt, workdir, first_save: int) -> str:
  """What a stopped run leaves to resume from, in words."""
  saved = ckpt.latest_step()
  if saved is None:
    return (f"No checkpoint was saved yet (the first comes at step {first_save}): nothing to "
            "resume from.")
  return f"The last good checkpoint (step {saved}) in {workdir} is kept."


def _save_checked(ckpt, step, state, data_iter, metrics, workdir, force=False):
  """Saves only a finite state (one host sync per checkpoint)."""
  if metrics is not None and not np.isfinite(float(metrics["loss"])):
    ckpt.wait()
    raise NonFiniteLossError(f"Non-finite loss at step {step}; not saving it. "
                             f"{_kept(ckpt, workdir, step)}")
  ckpt.save(step, state, data_iter, force=force)
