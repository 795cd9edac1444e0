"""Tests of the digit classifier and its metrics (simflow_jax/evals/digits.py)."""
import json
import os

import jax
import numpy as np
import pytest

from configs.base import get_base_config
from simflow_jax.data import mnist5k
from simflow_jax.evals import digits, metrics


def _val_set():
  images, labels = mnist5k.load_mnist5k("validation")
  return images.astype(np.float32) / 127.5 - 1.0, labels


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digit_cache"))


@pytest.fixture(scope="module")
def clf(cache_dir):
  return digits.get_digit_classifier(cache_dir, steps=100, seed=0)


def test_fast_classifier_accuracy(clf):
  images, labels = _val_set()
  assert clf.val_accuracy > 0.8
  assert digits.class_accuracy(clf, images, labels) == clf.val_accuracy
  # Wrong labels (every class shifted by one) must score near zero.
  wrong = (labels + 1) % 10
  assert digits.class_accuracy(clf, images, wrong) < 0.1


def test_cache_reloads_identical_params(clf, cache_dir, monkeypatch):
  params_path = os.path.join(cache_dir, "digit_cnn_steps100_seed0.msgpack")
  meta_path = os.path.join(cache_dir, "digit_cnn_steps100_seed0.json")
  assert os.path.exists(params_path)
  with open(meta_path) as f:
    meta = json.load(f)
  assert meta == {"val_accuracy": clf.val_accuracy, "steps": 100, "seed": 0}

  def no_training(**kwargs):
    raise AssertionError("get_digit_classifier retrained although the cache exists")
  monkeypatch.setattr(digits, "train_digit_classifier", no_training)
  again = digits.get_digit_classifier(cache_dir, steps=100, seed=0)
  assert again.val_accuracy == clf.val_accuracy
  assert jax.tree.structure(again.params) == jax.tree.structure(clf.params)
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(clf.params)):
    np.testing.assert_array_equal(a, b)


def test_training_is_deterministic():
  a = digits.train_digit_classifier(steps=5, seed=3)
  b = digits.train_digit_classifier(steps=5, seed=3)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)
  init = digits._init_params(3)
  assert not np.array_equal(a.params["conv1"]["kernel"], init["conv1"]["kernel"])  # it trained
  assert not np.array_equal(init["conv1"]["kernel"], digits._init_params(4)["conv1"]["kernel"])


def test_feature_and_logit_shapes_and_chunking(clf):
  images, _ = _val_set()
  batch = np.concatenate([images, images, images[:200]])  # 1200 images: three chunks
  feats = clf.features(batch)
  logits = clf.logits(batch)
  assert feats.shape == (1200, digits.FEATURE_DIM) and logits.shape == (1200, 10)
  np.testing.assert_allclose(feats[:500], feats[500:1000], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(clf.features(images[:7]), feats[:7], rtol=1e-5, atol=1e-5)
  assert np.all(feats >= 0)  # post-ReLU


def test_digit_frechet_distance(clf):
  val, _ = _val_set()
  train, _ = mnist5k.load_mnist5k("train")  # sorted by class: take a random subset
  train = train[np.random.default_rng(0).permutation(len(train))[:500]]
  train = train.astype(np.float32) / 127.5 - 1.0
  noise = np.random.default_rng(0).uniform(-1, 1, val.shape).astype(np.float32)
  fd_self = digits.digit_frechet_distance(clf, val, val)
  fd_real = digits.digit_frechet_distance(clf, val, train)
  fd_noise = digits.digit_frechet_distance(clf, val, noise)
  scale = np.trace(metrics.stats(clf.features(val))[1])
  assert abs(fd_self) < 1e-6 * scale
  assert fd_real > 0
  assert fd_noise > 10 * fd_real


def test_rejects_bad_inputs(clf):
  images, labels = mnist5k.load_mnist5k("validation")
  with pytest.raises(ValueError, match="127.5"):
    clf.features(images)
  with pytest.raises(ValueError, match="32, 32, 1"):
    clf.logits(np.zeros((4, 28, 28, 1), np.float32))
  with pytest.raises(ValueError, match="labels"):
    digits.class_accuracy(clf, np.zeros((4, 32, 32, 1), np.float32), labels[:3])


@pytest.mark.slow
def test_default_classifier_reaches_95_percent(tmp_path):
  steps = get_base_config().eval.classifier_steps
  clf = digits.get_digit_classifier(str(tmp_path), steps=steps, seed=0)
  assert clf.val_accuracy >= 0.95
  images, labels = _val_set()
  assert digits.class_accuracy(clf, images, labels) == clf.val_accuracy
