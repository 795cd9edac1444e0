"""The evaluators' feature networks run data-parallel in fixed batches (sharding.map_fixed_batches):
the digit classifier on the 8 devices gives, for a number of images that is not a multiple of
its batch, the features of a plain single-device forward, and compiles once whatever the count."""
import jax
import numpy as np

from simflow_jax import sharding
from simflow_jax.evals import digits


def test_digit_features_data_parallel_padded_compile_once(monkeypatch):
  monkeypatch.setattr(digits, "_EVAL_CHUNK", 12)  # -> batches of 16 on the 8 devices
  params = digits._init_params(0)
  clf = digits.DigitClassifier(params=params, val_accuracy=0.0, steps=0, seed=0)
  images = np.random.default_rng(0).uniform(-1, 1, (37, 32, 32, 1)).astype(np.float32)
  calls = []
  real = digits._apply

  def counting(p, x):
    calls.append(x.shape)
    assert len(x.sharding.device_set) == 8  # split over every device
    return real(p, x)

  monkeypatch.setattr(digits, "_apply", counting)
  before = real._cache_size()
  feats, logits = clf.features(images), clf.logits(images[:5])
  assert real._cache_size() - before <= 1  # one program for every batch, the short ones too
  assert set(calls) == {(16, 32, 32, 1)} and len(calls) == 3 + 1
  want_feats, want_logits = jax.jit(lambda p, x: digits.DigitCNN().apply({"params": p}, x)
                                    )(jax.device_put(params, jax.devices()[0]), images)[::-1]
  np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits, want_logits[:5], rtol=1e-5, atol=1e-5)
  assert feats.shape == (37, digits.FEATURE_DIM) and np.abs(feats).max() > 0


def test_map_fixed_batches_refuses_a_batch_the_mesh_cannot_split():
  mesh = sharding.local_data_mesh()
  try:
    sharding.map_fixed_batches(lambda x: x, np.zeros((3, 2)), mesh, 12)
  except ValueError as e:
    assert "multiple of the mesh's 8 devices" in str(e)
  else:
    raise AssertionError("no error")
