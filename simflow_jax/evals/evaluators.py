"""Generation evaluators: each turns images into features and features into metrics.

One evaluator per feature network, chosen from the config in one place (`make_evaluator`):

  InceptionEvaluator  config.eval.inception_weights set: FID Inception features ('pool'
                      (N, 2048), 'spatial' (N, 2023), 'logits_unbiased' (N, 1008)) -> FID,
                      sFID, IS, precision/recall against config.eval.ref_stats (or the eval
                      split's real images when that is ""), and rFID of reconstructions.
  DigitEvaluator      no Inception weights, the embedded digits (data.source 'mnist5k',
                      32x32x1): the digit classifier's features ('pool' (N, 128), 'logits'
                      (N, 10)) -> digit Frechet distance, class accuracy of the samples, and
                      the same distance for reconstructions (digit rFD).
  SkippedEvaluator    otherwise: no features; the report says why and which weights to get.

Every evaluator has `name` (the report's generation_mode), `note` (its generation_note),
`features(images (N, H, W, C) in [-1, 1]) -> {name: (N, ...) numpy}` and
`metrics(samples, sample_labels (N,), split) -> dict`, where `samples` holds the features of
the samples and `split` {'real', 'recon', 'recon_mu'} those of the eval split's images, of
decode(x) and of decode(mu). Networks load lazily, at the first features() call, so choosing
an evaluator costs nothing. Metric definitions: docs/evaluation.md.
"""
import os
import tempfile
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from simflow_jax import files, sharding
from simflow_jax.evals import digits, metrics
from simflow_jax.pretrained import inception

IS_SPLITS = 10                   # ADM: 50k samples in 10 splits of 5k
PR_K = 3                         # ADM's precision/recall neighbourhood
CLASSIFIER_SUBDIR = "digit_classifier"


class Features:
  """Accumulates per-batch feature dicts {name: (b, ...)} -> {name: (N, ...)}."""

  def __init__(self):
    self.parts = []

  def add(self, feats: dict) -> None:
    self.parts.append({k: np.asarray(v) for k, v in feats.items()})

  def get(self) -> dict:
    if not self.parts:
      return {}
    return {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Frechet distance between the Gaussians fitted to features a (N, D) and b (M, D)."""
  return metrics.fid_from_stats(*metrics.stats(a), *metrics.stats(b))


INCEPTION_BATCH = 200            # images per Inception forward (rounded up to the device count)


def inception_feature_fn(params: dict, mesh=None, batch_size: int = INCEPTION_BATCH,
                         precision=jax.lax.Precision.HIGHEST) -> Callable[[np.ndarray], dict]:
  """fn(images (N, H, W, 3) in [0, 255], any N) -> {inception.FEATURE_KEYS: numpy (N, ...)}:
  the FID Inception data-parallel over `mesh` (None: this process's devices), parameters
  replicated on it, in batches of exactly batch_size rounded up to the device count: the
  last, shorter batch is zero-padded (its padding rows dropped), so one compilation serves
  every batch. Every process must call it with the same images when the mesh spans several."""
  mesh = sharding.local_data_mesh() if mesh is None else mesh
  chunk = -(-max(1, batch_size) // mesh.size) * mesh.size
  model = inception.InceptionV3(precision=precision)
  params = sharding.on_mesh(params, mesh)
  apply = jax.jit(lambda p, x: {k: v for k, v in model.apply({"params": p}, x).items()
                                if k in inception.FEATURE_KEYS})

  def feature_fn(images) -> dict:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
      raise ValueError(f"expected a non-empty (N, H, W, C) image array, got {images.shape}")
    return sharding.map_fixed_batches(lambda x: apply(params, x), images, mesh, chunk)

  feature_fn.jitted = apply  # for compile counts
  return feature_fn


class InceptionEvaluator:
  """FID / sFID / IS / precision / recall of samples and rFID of reconstructions."""
  name = "inception"

  def __init__(self, config, feature_fn: Optional[Callable] = None, mesh=None):
    """feature_fn: features of images in [0, 255] (N, H, W, 3); default the FID Inception
    loaded from config.eval.inception_weights at the first call, data-parallel over `mesh`
    (None: this process's devices)."""
    self.weights = config.eval.inception_weights
    self.ref_stats = config.eval.ref_stats
    self.eval_split = config.data.eval_split
    self.note = f"Inception weights {self.weights}"
    self.mesh = mesh
    self._raw = feature_fn

  def raw_features(self, images_0_255) -> dict:
    if self._raw is None:
      self._raw = inception_feature_fn(inception.load_inception_params(self.weights), self.mesh)
    return self._raw(images_0_255)

  def features(self, images) -> dict:
    # [-1, 1] -> the integer values of a uint8 export -> features
    return self.raw_features(np.asarray(inception.to_inception_range(jnp.asarray(images))))

  def metrics(self, samples: dict, sample_labels: np.ndarray, split: dict) -> dict:
    del sample_labels  # FID and friends are unconditional
    real = split["real"]
    if self.ref_stats:
      ref = metrics.load_ref_batch(self.ref_stats, feature_fn=self.raw_features)
      ref_name = self.ref_stats
    else:
      ref = metrics.reference_from_features(real)
      ref_name = f"eval split {self.eval_split!r} ({real['pool'].shape[0]} real images)"
    n = samples["pool"].shape[0]
    out = metrics.evaluate_features(samples, ref, splits=min(IS_SPLITS, n), k=PR_K)
    real_stats = metrics.stats(real["pool"])
    for key, part in (("rfid", "recon"), ("rfid_mu", "recon_mu")):
      out[key] = metrics.fid_from_stats(*metrics.stats(split[part]["pool"]), *real_stats)
    out["reference"] = ref_name
    out["rfid_reference"] = f"eval split {self.eval_split!r} real images"
    return out


class DigitEvaluator:
  """Digit FD and class accuracy of samples, digit rFD of reconstructions (CPU stand-ins for
  FID / rFID on the embedded digits)."""
  name = "digits"
  note = "no config.eval.inception_weights; embedded digits: digit classifier"

  def __init__(self, cache_dir: str, steps: int, seed: int, mesh=None):
    self.cache_dir, self.steps, self.seed, self.mesh = cache_dir, steps, seed, mesh
    self._clf = None

  @property
  def classifier(self) -> digits.DigitClassifier:
    """Trained once (config.eval.classifier_steps), then read from cache_dir; its forward
    runs data-parallel over the mesh (None: this process's devices)."""
    if self._clf is None:
      self._clf = digits.get_digit_classifier(self.cache_dir, steps=self.steps, seed=self.seed)
      self._clf.mesh = self.mesh
    return self._clf

  def features(self, images) -> dict:
    return {"pool": self.classifier.features(images), "logits": self.classifier.logits(images)}

  def sample_metrics(self, samples: dict, sample_labels: np.ndarray, real_pool: np.ndarray) -> dict:
    """digit_fd (samples vs real_pool (M, 128)) and digit_class_accuracy (argmax == label)."""
    return {"digit_fd": frechet_distance(samples["pool"], real_pool),
            "digit_class_accuracy": float(np.mean(samples["logits"].argmax(-1) == sample_labels))}

  def metrics(self, samples: dict, sample_labels: np.ndarray, split: dict) -> dict:
    real = split["real"]["pool"]
    return {
        **self.sample_metrics(samples, sample_labels, real),
        "digit_rfd": frechet_distance(split["recon"]["pool"], real),
        "digit_rfd_mu": frechet_distance(split["recon_mu"]["pool"], real),
        "classifier_val_accuracy": self.classifier.val_accuracy,
        "classifier_steps": self.classifier.steps,
        "reference": "the eval split's real digits (classifier penultimate features)",
    }


class SkippedEvaluator:
  """No feature network for this data: no generation metrics, the reason in the report."""
  name = "skipped"

  def __init__(self, note: str):
    self.note = note

  def features(self, images) -> dict:
    del images
    return {}

  def metrics(self, samples: dict, sample_labels: np.ndarray, split: dict) -> dict:
    del samples, sample_labels, split
    return {"skipped": self.note}


def classifier_dir(config, workdir: str) -> str:
  """config.eval.classifier_dir, or WORKDIR/eval/digit_classifier when that is "" (a local
  temporary folder when WORKDIR is on an object store: the cache is written with os)."""
  chosen = config.eval.get("classifier_dir", "")
  if chosen:
    if not files.is_local(chosen):
      raise ValueError(f"config.eval.classifier_dir={chosen!r} must be a local folder (the digit "
                       "classifier cache is read and written with os); leave it '' for the default.")
    return chosen
  if files.is_local(workdir):
    return os.path.join(workdir, "eval", CLASSIFIER_SUBDIR)
  return os.path.join(tempfile.gettempdir(), "simflow_eval", CLASSIFIER_SUBDIR)


def make_evaluator(config, workdir: str, mesh=None):
  """The generation evaluator for this config (module docstring): the one place it is chosen.
  Its feature network runs data-parallel over `mesh` (None: this process's devices)."""
  if config.eval.inception_weights:
    return InceptionEvaluator(config, mesh=mesh)
  if config.data.source == "mnist5k":
    shape = (config.data.image_size, config.data.image_size, config.data.channels)
    if shape == digits.IMAGE_SHAPE:
      return DigitEvaluator(classifier_dir(config, workdir), config.eval.classifier_steps,
                            config.seed, mesh=mesh)
    why = f"digit classifier needs {digits.IMAGE_SHAPE} images, the config makes {shape}"
  else:
    why = f"data.source={config.data.source!r} is not the embedded digits"
  return SkippedEvaluator(
      f"FID/sFID/IS/precision/recall/rFID skipped: config.eval.inception_weights is empty and "
      f"{why}. Supply the FID Inception weights: download {inception.WEIGHTS_FILENAME} "
      f"({inception.WEIGHTS_URLS[0]}), convert it with `{inception.CONVERT_COMMAND}` and set "
      "--config.eval.inception_weights=/path/to/inception_fid.msgpack.")
