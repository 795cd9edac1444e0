"""Sampling from a trained SimFlow: noise -> flow inverse -> VAE decode (SimFlow, arXiv 2512.04084).

The library part: pure, batch-polymorphic functions (no mesh, no checkpoints, no files
except the .npz writers); the inverse and the guidance rules are models/inverse.py and
models/guidance.py. The last section is the `main.py --mode=sample` command built on it.

`sample_cfg` is `config.sample` (configs/base.py): temperature, guidance and its rule,
schedule and blocks, and the inverse (cached | jacobi | selective) with its Jacobi chunk,
threshold and iteration cap. Tokens are (B, T, D), images (B, H, W, C) in [-1, 1].
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
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simflow_jax import checkpoint, files, sharding
from simflow_jax.evals import robustness
from simflow_jax.models import build
from simflow_jax.models import guidance as guidance_lib
from simflow_jax.models import inverse as inverse_lib
from simflow_jax.models import vae as vae_lib


def guide_for_block(flow, sample_cfg):
  """The per-block guides of sample_cfg (models/guidance.py: guides_from_config)."""
  return guidance_lib.guides_from_config(flow, sample_cfg)


def check_labels(labels, num_classes: int) -> None:
  """Raises ValueError unless labels is a 1-D integer array with ids in [0, num_classes)."""
  arr = np.asarray(labels)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array (B,), got shape {arr.shape} dtype {arr.dtype}.")
  bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
  if bad.size:
    raise ValueError(f"class ids {bad.tolist()} are outside [0, {num_classes}); use ids 0..{num_classes - 1} "
                     f"(the null class {num_classes} is reserved for guidance).")


def sample_tokens(models, flow_params, labels, rng, sample_cfg):
  """labels (B,) int -> (tokens (B, T, D) float32, {'steps': (K, num_chunks) int32}).
  z ~ N(0, temperature^2 I), inverted by sample_cfg.inverse (models/inverse.py); steps
  are the Jacobi iterations (or sequential tokens) per chunk of each block."""
  labels = jnp.asarray(labels, jnp.int32)
  z = sample_cfg.temperature * jax.random.normal(rng, (labels.shape[0], *models.token_shape), jnp.float32)
  tokens, steps = inverse_lib.inverse(
      models.flow, flow_params, z, labels, sample_cfg.inverse,
      guidance_lib.guides_from_config(models.flow, sample_cfg), chunk=sample_cfg.jacobi_chunk,
      threshold=sample_cfg.jacobi_threshold, max_iters=sample_cfg.jacobi_max_iters)
  return tokens, {"steps": steps}


def sample_images(models, params, labels, rng, sample_cfg):
  """params {'vae', 'flow'} -> images (B, H, W, C) in [-1, 1] (decoder output clipped)."""
  tokens, _ = sample_tokens(models, params["flow"], labels, rng, sample_cfg)
  latents = models.to_latents(tokens)  # (B, h, w, c)
  images = models.vae.apply({"params": params["vae"]}, latents, method=vae_lib.VAE.decode)
  return jnp.clip(images, -1.0, 1.0)


def make_sample_fn(models, sample_cfg):
  """fn(params, labels, rng) -> images, jitted once per batch shape. A snapshot of
  sample_cfg is taken now (later edits do not apply). Concrete, fully addressable labels
  are checked with check_labels before the call."""
  sample_cfg = copy.deepcopy(sample_cfg)
  jitted = jax.jit(functools.partial(sample_images, models, sample_cfg=sample_cfg))

  def sample_fn(params, labels, rng):
    """params {'vae', 'flow'}, labels (B,) int, rng key -> images (B, H, W, C) in [-1, 1]."""
    concrete = not isinstance(labels, jax.core.Tracer)
    if concrete and (not isinstance(labels, jax.Array) or labels.is_fully_addressable):
      check_labels(labels, models.num_classes)
    return jitted(params, labels, rng)

  return sample_fn


# ------------------------------------------------------------------------------------
# ADM evaluator .npz export.
# ------------------------------------------------------------------------------------
def to_uint8(images) -> np.ndarray:
  """Images in [-1, 1] -> uint8 round((x + 1) * 127.5), clipped to [0, 255]."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def write_npz_shard(path: str, images_uint8, labels) -> None:
  """Writes the ADM evaluator layout: arr_0 uint8 (N, H, W, 3) (grayscale repeated to 3
  channels) and arr_1 int64 labels (N,). Atomic: a temporary file in the same folder is
  renamed onto `path`."""
  images = np.asarray(images_uint8)
  labels = np.asarray(labels)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 (N, H, W, 1 or 3) (see to_uint8), "
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
# `main.py --mode=sample`: a grid PNG and a resumable, sharded ADM .npz export.
# ------------------------------------------------------------------------------------
GRID_NAME = "sample_grid.png"
SHARD_NAME = "shard_{:05d}.npz"
SETTINGS_NAME = "settings.json"
# config.sample fields that change the samples (with the seed, counts and checkpoint step).
_SAMPLER_FIELDS = ("temperature", "guidance", "guidance_rule", "guidance_schedule", "guidance_blocks",
                   "inverse", "jacobi_chunk", "jacobi_threshold", "jacobi_max_iters")


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


def _make_sharded_sampler(models, sample_cfg, mesh, batch_size: int):
  """fn(params, labels (n <= batch_size,) numpy int, rng) -> images (batch_size, H, W, C) in
  [-1, 1], a global array split over the mesh's batch axes, returned before it is computed.
  sample_images jitted once for the padded batch (class 0 fills it) with parameters
  replicated and labels, noise and images split over all devices (batch_size must be
  divisible by the device count)."""
  sample_cfg = copy.deepcopy(sample_cfg)
  guide_for_block(models.flow, sample_cfg)  # configuration errors now, not at the first call
  batch, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  jitted = jax.jit(functools.partial(sample_images, models, sample_cfg=sample_cfg),
                   in_shardings=(repl, batch, repl), out_shardings=batch)

  def fn(params, labels, rng):
    padded = np.zeros(batch_size, np.int32)
    padded[:labels.shape[0]] = labels
    global_labels = jax.make_array_from_callback(padded.shape, batch, lambda idx: padded[idx])
    return jitted(params, global_labels, rng)

  return fn


def _fetch(images, n: int) -> np.ndarray:
  """A global batch (possibly over several processes) -> its first n images, numpy, on every process."""
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]


def _check_run_config(config, num_devices: int) -> None:
  """The user-facing checks of `--mode=sample` that need no checkpoint."""
  s = config.sample
  if s.classes:
    check_labels(np.asarray(list(s.classes)), config.data.num_classes)
  if config.train.grid_per_class < 1:
    raise ValueError(f"config.train.grid_per_class must be >= 1 (grid columns), "
                     f"got {config.train.grid_per_class}.")
  if s.num_samples < 0:
    raise ValueError(f"config.sample.num_samples must be >= 0 (0 = grid only), got {s.num_samples}.")
  if s.batch_size < 1 or s.batch_size % num_devices:
    raise ValueError(f"config.sample.batch_size={s.batch_size} (the global batch per sampling step) must be "
                     f"a positive multiple of the {num_devices} devices it is split over: e.g. "
                     f"--config.sample.batch_size={max(1, s.batch_size // num_devices) * num_devices}.")


def run(config, workdir: str) -> dict:
  """`main.py --mode=sample`: samples the latest checkpoint in WORKDIR (EMA parameters unless
  sample.use_ema=False) and writes

    WORKDIR/samples/sample_grid.png    one row per class of sample.classes (empty: the first
                                       up to 10), train.grid_per_class columns;
    WORKDIR/samples/npz/shard_{i:05d}.npz and settings.json   if sample.num_samples > 0:
        shard i holds samples [i B, (i + 1) B) (B = sample.batch_size, the last shard
        shorter), sample j of class j % data.num_classes, noise from
        fold_in(key(seed), i), so a resumed export is bit-identical; shards already
        there are kept (resume) when settings.json matches, else a ValueError;
    WORKDIR/samples/samples_{N}x{H}x{W}x3.npz   the shards merged: the ADM evaluator
        layout, arr_0 uint8 (N, H, W, 3) and arr_1 int64 labels (N,).

  Each sampling step draws one global batch split over all devices of config.mesh (B must
  be divisible by the device count); images are gathered to every process and process 0
  writes. The grid uses noise fold_in(key(seed + 1), j) for its j-th batch. Returns
  {'grid_path', 'npz_path' (None without an export), 'num_samples', 'images_per_sec' (of
  the shards sampled by this call; None if none was), 'checkpoint_step',
  'shards_sampled', 'shards_resumed'}.
  """
  build.validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  _check_run_config(config, mesh.size)
  s = config.sample
  models = build.build_models(config)
  params = checkpoint.load_params(workdir, config, use_ema=s.use_ema)
  params = jax.device_put({"vae": params["vae"], "flow": params["flow"]}, sharding.replicated(mesh))
  ckpt = checkpoint.Checkpointer(workdir, config, read_only=True)
  step = int(ckpt.latest_step())
  ckpt.close()
  out_dir = epath.Path(workdir) / "samples"
  npz_dir = out_dir / "npz"
  writer = jax.process_index() == 0
  batch, n, h = int(s.batch_size), int(s.num_samples), models.image_size
  num_shards = -(-n // batch)
  # Settings of earlier shards are checked before any sampling.
  pending = _pending_shards(npz_dir, _export_settings(config, step, (h, h, 3)), num_shards) if n else []
  fn = _make_sharded_sampler(models, s, mesh, batch)

  # The grid (its first batch also compiles the sampler).
  t0 = time.time()
  labels = _grid_labels(config)
  grid_key = jax.random.key(config.seed + 1)
  grid = []
  for j, start in enumerate(range(0, labels.shape[0], batch)):
    part = labels[start:start + batch]
    grid.append(_fetch(fn(params, part, jax.random.fold_in(grid_key, j)), part.shape[0]))
  grid = np.concatenate(grid)  # (rows * cols, H, W, C)
  grid_path = out_dir / GRID_NAME
  if writer:
    cols = config.train.grid_per_class
    files.write_atomic(grid_path, lambda tmp: robustness.save_image_grid(grid, tmp, nrow=cols))
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

  to_do = sum(min(batch, n - i * batch) for i in pending)
  t0, done_images = time.time(), 0
  in_flight = dispatch(pending[0]) if pending else None
  for k, i in enumerate(pending):
    labels = _shard_labels(i, batch, n, models.num_classes)
    images = to_uint8(_fetch(in_flight, labels.shape[0]))
    if k + 1 < len(pending):
      in_flight = dispatch(pending[k + 1])
    if writer:
      files.write_atomic(npz_dir / SHARD_NAME.format(i),
                    lambda tmp, im=images, lab=labels: write_npz_shard(tmp, im, lab))
    done_images += labels.shape[0]
    rate = done_images / max(time.time() - t0, 1e-9)
    logging.info("Shard %d/%d written (%d/%d samples this run, %.1f images/s, ETA %.0fs)", i + 1, num_shards,
                 done_images, to_do, rate, (to_do - done_images) / max(rate, 1e-9))
  if pending:
    result["images_per_sec"] = done_images / max(time.time() - t0, 1e-9)

  npz_path = out_dir / f"samples_{n}x{h}x{h}x3.npz"
  if writer:
    count = _merge_shards([npz_dir / SHARD_NAME.format(i) for i in range(num_shards)], npz_path)
    logging.info("%d samples (ADM evaluator layout) written to %s", count, npz_path)
  multihost_utils.sync_global_devices("simflow_sample_export_done")
  result["npz_path"] = str(npz_path)
  return result
