"""`main.py --mode=sample`: a sample grid and a resumable, sharded ADM-evaluator .npz export.

From the latest checkpoint in WORKDIR (EMA parameters unless sample.use_ema=False):

  WORKDIR/samples/sample_grid.png        one row per class of sample.classes (empty: the first
                                         up to 10), train.grid_per_class columns;
  WORKDIR/samples/npz/shard_{i:05d}.npz  samples [i B, (i + 1) B), B = sample.batch_size, with
                                         settings.json (what decides the samples);
  WORKDIR/samples/samples_{N}x{H}x{W}x3.npz   the shards merged, the layout of the ADM evaluator
                                         (guided-diffusion/evaluations): arr_0 uint8 (N, H, W, 3),
                                         arr_1 int64 labels (N,).

Sample j has class j % data.num_classes; shard i uses noise fold_in(key(seed), i), so an
interrupted export resumes bit-identically (existing shards are kept when settings.json
matches; other settings are a clear error). Each sampling step is one global batch split
over all devices of every host (sharding.py), with the generator's parameters restored alone
(EMA or raw, never the optimiser state) straight into the shardings of the config's mesh rules
(checkpoint.restore_generator_params; split over mesh.fsdp as trained); images are gathered to
every process and process 0 writes.

SIGINT / SIGTERM (signals.py) stop the export after the shard in hand: the shards written are
kept and a rerun of the same command resumes (exit 130 / 143).
"""
import copy
import functools
import json
import os
import shutil
import tempfile
import time
from typing import Sequence

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from configs import base
from simflow_jax import checkpoint, files, progress, sample, sharding, signals
from simflow_jax.evals import figures
from simflow_jax.models import build


# ------------------------------------------------------------------------------------
# The ADM evaluator .npz layout (host side, numpy).
# ------------------------------------------------------------------------------------
def write_npz_shard(path: str, images_uint8, labels) -> None:
  """Writes the ADM evaluator layout: arr_0 uint8 (N, H, W, 3) (grayscale repeated to 3
  channels) and arr_1 int64 labels (N,). Atomic: a temporary file in the same folder is
  renamed onto `path`."""
  images = np.asarray(images_uint8)
  labels = np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 (N, H, W, 1 or 3) (see figures.to_uint8), "
                     f"got {images.dtype} {images.shape}.")
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be {images.shape[0]} integers, one per image, "
                     f"got {labels.dtype} {labels.shape}.")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # (N, H, W, 3)
  files.write_atomic(epath.Path(path),
                     lambda tmp: np.savez(tmp, arr_0=images, arr_1=labels.astype(np.int64)))


def merge_npz_shards(paths: Sequence[str], out: str) -> int:
  """Concatenates shards written by write_npz_shard, in the given order, into `out`
  (atomically); returns the number of images. Holds the merged array plus one shard."""
  if not paths:
    raise ValueError("merge_npz_shards needs at least one shard path.")
  labels = []
  for p in paths:
    with np.load(p) as shard:  # reads only the labels member
      labels.append(shard["arr_1"])
  labels = np.concatenate(labels)
  images, offset = None, 0
  for p in paths:
    with np.load(p) as shard:
      part = shard["arr_0"]
    if images is None:
      images = np.empty((labels.shape[0], *part.shape[1:]), part.dtype)  # (N, H, W, 3)
    if part.shape[1:] != images.shape[1:]:
      raise ValueError(f"shard {p} has images of shape {part.shape[1:]}, not {images.shape[1:]}; "
                       "merge shards of one run only.")
    images[offset:offset + part.shape[0]] = part
    offset += part.shape[0]
  write_npz_shard(out, images, labels)
  return offset


# ------------------------------------------------------------------------------------
# The command: a grid PNG and a resumable, sharded .npz export.
# ------------------------------------------------------------------------------------
GRID_NAME = "sample_grid.png"
SHARD_NAME = "shard_{:05d}.npz"
SETTINGS_NAME = "settings.json"
# config.sample fields that change the samples (with the seed, counts and checkpoint step).
_SAMPLER_FIELDS = tuple(f.split(".", 1)[1] for f in base.SAMPLER_FIELDS)


def _merge_shards(paths: Sequence[epath.Path], out: epath.Path) -> int:
  """merge_npz_shards for local or object-store paths (remote shards are first copied to a
  local temporary folder: it needs room for the shards plus the merged file)."""
  if all(files.is_local(p) for p in paths):
    return files.write_atomic(out, lambda tmp: merge_npz_shards([str(p) for p in paths], tmp))
  with tempfile.TemporaryDirectory(prefix="simflow_merge_") as folder:
    local = []
    for p in paths:
      local.append(os.path.join(folder, p.name))
      with p.open("rb") as src, open(local[-1], "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    return files.write_atomic(out, lambda tmp: merge_npz_shards(local, tmp))


def _grid_labels(config) -> np.ndarray:
  """One row per class of sample.classes (empty: the first up to 10), grid_per_class each."""
  classes = list(config.sample.classes) or list(range(min(config.data.num_classes, 10)))
  return np.repeat(np.asarray(classes, np.int32), config.train.grid_per_class)  # (rows * cols,)


def _shard_labels(i: int, batch_size: int, num_samples: int, num_classes: int) -> np.ndarray:
  """Labels of shard i: sample j (of all num_samples) has class j % num_classes."""
  return (np.arange(i * batch_size, min((i + 1) * batch_size, num_samples)) % num_classes).astype(np.int32)


def _export_settings(config, step: int, image_shape: Sequence[int]) -> dict:
  """Everything that decides the exported samples; resuming requires all of it unchanged."""
  s = config.sample
  settings = {"checkpoint_step": int(step), "use_ema": bool(s.use_ema), "seed": int(config.seed),
              "num_samples": int(s.num_samples), "batch_size": int(s.batch_size),
              "image_shape": list(image_shape), "labels": "i % data.num_classes",
              **{k: s[k] for k in _SAMPLER_FIELDS}}
  return json.loads(json.dumps(settings, default=list))


def _pending_shards(npz_dir: epath.Path, settings: dict, num_shards: int) -> list[int]:
  """Indices of the shards still to write. Shards are written atomically, so one that exists
  is complete. Every process checks the settings of earlier shards (ValueError if they
  differ); process 0 lists the folder and broadcasts what it found, then records the
  settings, so all processes agree on the work to do."""
  settings_path = npz_dir / SETTINGS_NAME
  if settings_path.exists():
    old = json.loads(settings_path.read_text())
    diffs = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diffs:
      raise ValueError(
          f"{npz_dir} holds shards sampled with other settings (differ in: {', '.join(diffs)}; "
          f"there: {[old.get(k) for k in diffs]}, now: {[settings.get(k) for k in diffs]}). "
          f"Resume with the same settings, or delete {npz_dir} to start the export over.")
  done = np.zeros(num_shards, np.int32)
  if jax.process_index() == 0 and npz_dir.exists():
    names = {p.name for p in npz_dir.iterdir()}
    done = np.asarray([SHARD_NAME.format(i) in names for i in range(num_shards)], np.int32)
  done = multihost_utils.broadcast_one_to_all(done)
  if jax.process_index() == 0 and not settings_path.exists():
    text = json.dumps(settings, indent=2, sort_keys=True)
    files.write_atomic(settings_path, lambda tmp: epath.Path(tmp).write_text(text))
  return [i for i in range(num_shards) if not done[i]]


def _make_sharded_sampler(models, sample_cfg, mesh, batch_size: int, param_shardings):
  """fn(params, labels (n <= batch_size,) numpy int, rng) -> images (batch_size, H, W, C) in
  [-1, 1], a global array split over the mesh's batch axes, returned before it is computed.
  sample_images jitted once for the padded batch (class 0 fills it) with the parameters in
  `param_shardings` (the mesh rules': XLA gathers fsdp-split leaves where they are used) and
  labels, noise and images split over all devices (batch_size must be divisible by the
  device count)."""
  sample_cfg = copy.deepcopy(sample_cfg)
  batch, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  jitted = jax.jit(functools.partial(sample.sample_images, models, sample_cfg=sample_cfg),
                   in_shardings=(param_shardings, batch, repl), out_shardings=batch)

  def fn(params, labels, rng):
    padded = sharding.pad_batch(np.asarray(labels, np.int32), batch_size)  # (batch_size,)
    return jitted(params, sharding.shard_host_array(mesh, padded), rng)

  return fn


def _check_run_config(config, num_devices: int) -> None:
  """The user-facing checks of `--mode=sample` that need no checkpoint."""
  s = config.sample  # classes, grid columns and counts are checked by validate_config
  if s.batch_size < 1 or s.batch_size % num_devices:
    raise ValueError(f"config.sample.batch_size={s.batch_size} (the global batch per sampling step) must be "
                     f"a positive multiple of the {num_devices} devices it is split over: e.g. "
                     f"--config.sample.batch_size={max(1, s.batch_size // num_devices) * num_devices}.")


def run(config, workdir: str) -> dict:
  """`main.py --mode=sample` (module docstring). The grid uses noise fold_in(key(seed + 1), j)
  for its j-th batch. Returns {'grid_path', 'npz_path' (None without an export),
  'num_samples', 'images_per_sec' (of the shards sampled by this call; None if none was),
  'checkpoint_step', 'shards_sampled', 'shards_resumed'}. A signal stops it between shards
  (errors.Interrupted, after the shards written are kept)."""
  build.validate_config(config)  # the argument checks come before the checkpoint is read
  with signals.StopOnSignal("shard", "keep the shards written") as stop:
    return _run(config, workdir, stop)


def _run(config, workdir: str, stop: signals.StopOnSignal) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  _check_run_config(config, mesh.size)
  s = config.sample
  models = build.build_models(config)
  params = checkpoint.restore_generator_params(workdir, config, mesh, use_ema=bool(s.use_ema))
  params = {"vae": params["vae"], "flow": params["flow"]}  # sharded by the mesh rules
  step = checkpoint.latest_step(workdir, config)
  out_dir = epath.Path(workdir) / "samples"
  npz_dir = out_dir / "npz"
  writer = jax.process_index() == 0
  batch, n, h = int(s.batch_size), int(s.num_samples), models.image_size
  num_shards = -(-n // batch)
  # Settings of earlier shards are checked before any sampling.
  pending = _pending_shards(npz_dir, _export_settings(config, step, (h, h, 3)), num_shards) if n else []
  fn = _make_sharded_sampler(models, s, mesh, batch, jax.tree.map(lambda a: a.sharding, params))

  # The grid (its first batch also compiles the sampler).
  t0 = time.time()
  labels = _grid_labels(config)
  grid_key = jax.random.key(config.seed + 1)
  grid = []
  for j, start in enumerate(range(0, labels.shape[0], batch)):
    part = labels[start:start + batch]
    grid.append(sharding.fetch(fn(params, part, jax.random.fold_in(grid_key, j)))[:part.shape[0]])
  grid = np.concatenate(grid)  # (rows * cols, H, W, C)
  grid_path = out_dir / GRID_NAME
  if writer:
    cols = config.train.grid_per_class
    files.write_atomic(grid_path, lambda tmp: figures.save_image_grid(grid, tmp, nrow=cols))
  logging.info("Sample grid (%d classes x %d, checkpoint step %d, %s parameters) written to %s in %.1fs",
               labels.shape[0] // config.train.grid_per_class, config.train.grid_per_class, step,
               "EMA" if s.use_ema else "raw", grid_path, time.time() - t0)
  result = {"grid_path": str(grid_path), "npz_path": None, "num_samples": n,
            "images_per_sec": None, "checkpoint_step": step, "shards_sampled": len(pending),
            "shards_resumed": num_shards - len(pending)}
  if n == 0:
    return result

  # The .npz export, shard by shard; shard k + 1 is sampled while shard k is written.
  if result["shards_resumed"]:
    logging.info("Resuming the export: %d of %d shards already in %s", result["shards_resumed"],
                 num_shards, npz_dir)
  base_key = jax.random.key(config.seed)

  def dispatch(i):
    return fn(params, _shard_labels(i, batch, n, models.num_classes), jax.random.fold_in(base_key, i))

  t0, done_images = time.time(), 0
  bar = progress.Progress("Export", len(pending), "shards", stop=stop)
  try:
    if pending and signals.stop_agreed(stop):
      raise progress.Stopped("before the first shard")
    in_flight = dispatch(pending[0]) if pending else None
    for k, i in enumerate(pending):
      labels = _shard_labels(i, batch, n, models.num_classes)
      images = figures.to_uint8(sharding.fetch(in_flight)[:labels.shape[0]])
      if k + 1 < len(pending):
        in_flight = dispatch(pending[k + 1])
      if writer:
        files.write_atomic(npz_dir / SHARD_NAME.format(i),
                           lambda tmp, im=images, lab=labels: write_npz_shard(tmp, im, lab))
      done_images += labels.shape[0]
      bar.update()  # logs done/total shards, the rate and the ETA; raises Stopped when asked
  except progress.Stopped:
    multihost_utils.sync_global_devices("simflow_sample_export_stopped")  # process 0 wrote
    kept = result["shards_resumed"] + bar.done
    raise stop.interrupted(f"kept {kept} of {num_shards} export shards in {npz_dir} and the "
                           "grid; rerun the same command to resume the export.") from None
  if pending:
    result["images_per_sec"] = done_images / max(time.time() - t0, 1e-9)

  npz_path = out_dir / f"samples_{n}x{h}x{h}x3.npz"
  if writer:
    count = _merge_shards([npz_dir / SHARD_NAME.format(i) for i in range(num_shards)], npz_path)
    logging.info("%d samples (ADM evaluator layout) written to %s", count, npz_path)
  multihost_utils.sync_global_devices("simflow_sample_export_done")
  result["npz_path"] = str(npz_path)
  return result
