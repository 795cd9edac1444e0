"""A small deterministic CNN digit classifier and the CPU metrics built on it.

The MNIST demo has no pretrained FID network, so a tiny classifier trained on the
embedded training split (`simflow_jax.data.mnist5k`) supplies features for a
Frechet distance ("digit FD", the CPU stand-in for FID) and a class accuracy of
class-conditional samples. Training is deterministic (fixed seed, fixed batch
order) and takes tens of seconds on 2 CPU cores; the result is cached.

Shapes: images NHWC float in [-1, 1], (N, 32, 32, 1) -> penultimate features (N, 128)
(the Frechet distance's features) and logits (N, 10). The cache (get_digit_classifier) is
keyed by (steps, seed); steps come from config.eval.classifier_steps.
"""
import dataclasses
import functools
import json
import os
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simflow_jax import sharding
from simflow_jax.data import mnist5k
from simflow_jax.evals import metrics

IMAGE_SHAPE = (32, 32, 1)
FEATURE_DIM = 128
_EVAL_CHUNK = 500  # images per jitted forward call in features()/logits()


class DigitCNN(nn.Module):
  """conv5x5/2(32)-relu, conv3x3/2(64)-relu, dense(128)-relu (features), dense(10)."""
  num_classes: int = mnist5k.NUM_CLASSES
  feature_dim: int = FEATURE_DIM

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (5, 5), strides=2, name="conv1")(x))  # (N, 16, 16, 32)
    x = nn.relu(nn.Conv(64, (3, 3), strides=2, name="conv2")(x))  # (N, 8, 8, 64)
    x = x.reshape(x.shape[0], -1)  # (N, 4096)
    feats = nn.relu(nn.Dense(self.feature_dim, name="dense_features")(x))
    logits = nn.Dense(self.num_classes, name="dense_logits")(feats)
    return logits, feats


def _check_images(images) -> jnp.ndarray:
  if getattr(images, "dtype", None) == np.uint8:
    raise ValueError("digit classifier expects float images in [-1, 1], got uint8; "
                     "convert with images.astype(np.float32) / 127.5 - 1.")
  x = jnp.asarray(images, jnp.float32)
  if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
    raise ValueError(f"digit classifier expects images shaped (N, 32, 32, 1), got {x.shape}")
  return x


@jax.jit
def _apply(params, x):
  return DigitCNN().apply({"params": params}, x)


@dataclasses.dataclass
class DigitClassifier:
  """Trained DigitCNN parameters with batched, jitted feature and logit functions. The
  forward runs data-parallel over `mesh` (None: this process's devices) in batches of a fixed
  size (_EVAL_CHUNK rounded up to the device count; the last one zero-padded, its padding
  dropped), so one compilation serves any number of images."""
  params: Any
  val_accuracy: float
  steps: int
  seed: int
  mesh: Any = None

  def _forward(self, images, index: int) -> np.ndarray:
    x = np.asarray(_check_images(images))
    mesh = self.mesh if self.mesh is not None else sharding.local_data_mesh()
    chunk = -(-_EVAL_CHUNK // mesh.size) * mesh.size
    params = sharding.on_mesh(self.params, mesh)
    return sharding.map_fixed_batches(lambda b: _apply(params, b)[index], x, mesh, chunk)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features, (N, 128) float32 numpy."""
    return self._forward(images, 1)

  def logits(self, images) -> np.ndarray:
    """Class logits, (N, 10) float32 numpy."""
    return self._forward(images, 0)


def _to_float(images_uint8: np.ndarray) -> np.ndarray:
  return images_uint8.astype(np.float32) / 127.5 - 1.0


def _init_params(seed: int):
  return DigitCNN().init(jax.random.key(seed), jnp.zeros((1,) + IMAGE_SHAPE))["params"]


def _random_shift(x: np.ndarray, rng: np.random.RandomState, max_shift: int) -> np.ndarray:
  """Translates each image by its own random (dy, dx) in [-max_shift, max_shift]."""
  n, h, w, _ = x.shape
  padded = np.pad(x, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)), constant_values=-1.0)
  oy = rng.randint(0, 2 * max_shift + 1, size=n)
  ox = rng.randint(0, 2 * max_shift + 1, size=n)
  rows = (oy[:, None] + np.arange(h))[:, :, None]  # (n, h, 1)
  cols = (ox[:, None] + np.arange(w))[:, None, :]  # (n, 1, w)
  return padded[np.arange(n)[:, None, None], rows, cols]  # (n, h, w, 1)


def _optimizer(steps: int, lr: float) -> optax.GradientTransformation:
  return optax.adam(optax.cosine_decay_schedule(lr, steps))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _train_step(params, opt_state, x, y, steps: int, lr: float):
  def loss_fn(p):
    logits, _ = DigitCNN().apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grads = jax.grad(loss_fn)(params)
  updates, opt_state = _optimizer(steps, lr).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_digit_classifier(steps: int = 600, seed: int = 0, batch_size: int = 128,
                           lr: float = 3e-3, max_shift: int = 2) -> DigitClassifier:
  """Trains DigitCNN on mnist5k 'train'; reports its 'validation' accuracy.

  Adam with a cosine decay of the learning rate from `lr` to 0 over `steps`,
  softmax cross-entropy, each training image translated by a random shift of up
  to `max_shift` pixels (background-filled). Deterministic: parameters come from
  jax.random.key(seed); batches (epoch-wise permutations) and shifts come from
  np.random.RandomState(seed).
  """
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
  images, labels = mnist5k.load_mnist5k("train")
  images = _to_float(images)
  params = _init_params(seed)
  opt_state = _optimizer(steps, lr).init(params)
  rng = np.random.RandomState(seed)
  order = np.empty(0, np.int64)
  for _ in range(steps):
    if len(order) < batch_size:
      order = np.concatenate([order, rng.permutation(len(labels))])
    idx, order = order[:batch_size], order[batch_size:]
    x = _random_shift(images[idx], rng, max_shift) if max_shift else images[idx]
    params, opt_state = _train_step(params, opt_state, x, labels[idx], steps, lr)

  clf = DigitClassifier(params=jax.tree.map(np.asarray, params), val_accuracy=float("nan"),
                        steps=steps, seed=seed)
  val_images, val_labels = mnist5k.load_mnist5k("validation")
  return dataclasses.replace(
      clf, val_accuracy=class_accuracy(clf, _to_float(val_images), val_labels))


def _cache_paths(cache_dir: str, steps: int, seed: int) -> tuple[str, str]:
  stem = os.path.join(cache_dir, f"digit_cnn_steps{steps}_seed{seed}")
  return stem + ".msgpack", stem + ".json"


def get_digit_classifier(cache_dir: str, steps: int = 600, seed: int = 0) -> DigitClassifier:
  """Loads the classifier for (steps, seed) from cache_dir, or trains and caches it.

  Files: `digit_cnn_steps{steps}_seed{seed}.msgpack` (flax-serialised params) and
  `.json` ({"val_accuracy", "steps", "seed"}).
  """
  params_path, meta_path = _cache_paths(cache_dir, steps, seed)
  if os.path.exists(params_path) and os.path.exists(meta_path):
    with open(params_path, "rb") as f:
      params = flax.serialization.from_bytes(_init_params(seed), f.read())
    with open(meta_path) as f:
      meta = json.load(f)
    return DigitClassifier(params=jax.tree.map(np.asarray, params),
                           val_accuracy=float(meta["val_accuracy"]), steps=steps, seed=seed)
  clf = train_digit_classifier(steps=steps, seed=seed)
  os.makedirs(cache_dir, exist_ok=True)
  with open(params_path, "wb") as f:
    f.write(flax.serialization.to_bytes(clf.params))
  with open(meta_path, "w") as f:
    json.dump({"val_accuracy": clf.val_accuracy, "steps": steps, "seed": seed}, f)
  return clf


def digit_frechet_distance(clf: DigitClassifier, images_a, images_b) -> float:
  """Frechet distance between the classifier's penultimate features of two image sets
  (the same eigenvalue-form distance as FID: evals/metrics.py)."""
  return metrics.fid_from_stats(*metrics.stats(clf.features(images_a)),
                                *metrics.stats(clf.features(images_b)))


def class_accuracy(clf: DigitClassifier, images, labels) -> float:
  """Fraction of images whose argmax logit equals the label (labels int (N,))."""
  labels = np.asarray(labels)
  if labels.shape != (np.shape(images)[0],):
    raise ValueError(f"labels must be shaped (N,) = ({np.shape(images)[0]},), got {labels.shape}")
  return float(np.mean(clf.logits(images).argmax(axis=-1) == labels))
