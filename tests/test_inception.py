"""Tests of the Flax FID InceptionV3 and its converter against torch-fidelity's PyTorch
InceptionV3 (the TF-faithful FID network), both loaded with the same RANDOM weights."""
import importlib
import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simflow_jax.pretrained import inception

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_converter():
  spec = importlib.util.spec_from_file_location(
      "convert_inception", REPO_ROOT / "scripts" / "convert_inception.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _torch_fidelity_module(name):
  """Imports torch_fidelity.<name> without the package __init__ (it imports torchvision)."""
  pytest.importorskip("torch")
  if "torch_fidelity" not in sys.modules:
    # find_spec locates the package without running its __init__ (which importorskip would).
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
      pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  return importlib.import_module(f"torch_fidelity.{name}")


def _random_reference_inception(tmp_path, calibration_images):
  """torch-fidelity's InceptionV3 with random weights and random BatchNorms.

  The constructor's weight load is skipped (an empty state_dict file is passed and the
  subclass keeps its random init). Every BatchNorm gets a random gamma and beta; its
  running statistics then come from one train-mode pass over `calibration_images` (other
  images than the test batch), so activations stay O(1) through the ~95 layers.
  """
  import torch  # pylint: disable=g-import-not-at-top
  fe = _torch_fidelity_module("feature_extractor_inceptionv3")

  class RandomInception(fe.FeatureExtractorInceptionV3):

    def load_state_dict(self, state_dict, strict=True, assign=False):
      assert not state_dict, "only the constructor's (empty) load is expected"

  empty = tmp_path / "empty.pth"
  torch.save({}, empty)
  torch.manual_seed(0)
  model = RandomInception("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                          feature_extractor_weights_path=str(empty))
  batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  assert len(batch_norms) == 94
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for bn in batch_norms:
      bn.weight.copy_(0.5 + torch.rand(bn.num_features, generator=generator))
      bn.bias.copy_(0.2 * torch.randn(bn.num_features, generator=generator))
      bn.reset_running_stats()
      bn.momentum = None  # cumulative average: one pass sets the running statistics
    model.fc.bias.copy_(torch.randn(1008, generator=generator))
    model.train()
    model(calibration_images)
    model.eval()
  return model


def test_missing_weights_file_names_file_and_converter(tmp_path):
  for path in ("", str(tmp_path / "nope.msgpack")):
    with pytest.raises(FileNotFoundError) as info:
      inception.load_inception_params(path)
    message = str(info.value)
    assert inception.WEIGHTS_FILENAME in message
    assert "scripts/convert_inception.py" in message
    assert "github.com" in message


def test_output_shapes():
  model = inception.InceptionV3()
  images = jnp.zeros((2, 32, 24, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  assert {k: v.shape for k, v in out.items()} == {
      "pool": (2, 2048), "logits_unbiased": (2, 1008), "logits": (2, 1008),
      "spatial": (2, 17 * 17 * 7)}
  count = sum(v.size for v in jax.tree.leaves(variables))
  # torch-fidelity's module has 23,850,960 parameters (conv weights, BatchNorm gamma and
  # beta, fc); folding keeps two vectors per BatchNorm (scale, bias), so the count is equal.
  assert count == 23_850_960
  with pytest.raises(ValueError, match="NHWC"):
    model.apply(variables, jnp.zeros((2, 3, 32, 32)))


def test_converter_rejects_foreign_state_dict():
  converter = _load_converter()
  with pytest.raises(ValueError, match="not FID InceptionV3 parameters"):
    converter.convert_state_dict({"AuxLogits.fc.weight": np.zeros((1000, 768))})
  with pytest.raises(ValueError, match="do not fit InceptionV3"):
    converter.convert_state_dict({"fc.weight": np.zeros((1008, 2048)),
                                  "fc.bias": np.zeros(1008)})


@pytest.mark.torch
@pytest.mark.parametrize("in_size", [(32, 32), (64, 40), (310, 333), (299, 299)])
def test_resize_matches_torch_fidelity(in_size):
  torch = pytest.importorskip("torch")
  compat = _torch_fidelity_module("interpolate_compat_tensorflow")
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 255, size=(2, 3) + in_size).astype(np.float32)  # NCHW
  expected = compat.interpolate_bilinear_2d_like_tensorflow1x(
      torch.from_numpy(images), size=(299, 299), align_corners=False).numpy()
  got = inception.resize_bilinear_tf1(jnp.asarray(images.transpose(0, 2, 3, 1)), (299, 299))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=0, atol=1e-4)


@pytest.mark.torch
def test_port_matches_torch_fidelity_with_random_weights(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)  # NCHW, like the ref
  calibration = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
  reference = _random_reference_inception(tmp_path, torch.from_numpy(calibration))

  spatial = {}

  def keep_mixed_6_conv(module, args, out):  # TF's mixed_6/conv:0 (post-ReLU)
    spatial["mixed_6_conv"] = out.detach().clone()

  hook = reference.Mixed_6d.branch1x1.register_forward_hook(keep_mixed_6_conv)
  with torch.no_grad():
    pool, logits_unbiased, logits = reference(torch.from_numpy(images))
  hook.remove()
  mixed_6_conv = spatial["mixed_6_conv"].numpy().transpose(0, 2, 3, 1)  # (2, 17, 17, 192)
  expected = {
      "pool": pool.numpy(), "logits_unbiased": logits_unbiased.numpy(), "logits": logits.numpy(),
      "spatial": mixed_6_conv[..., :7].reshape(2, -1)}
  assert 0.1 < np.abs(expected["pool"]).mean() < 10  # not degenerate

  # Convert with the converter, round-trip through the msgpack file, run the Flax port.
  converter = _load_converter()
  pth = tmp_path / "random_inception.pth"
  torch.save(reference.state_dict(), pth)
  out_path = tmp_path / "random_inception.msgpack"
  converter.convert_file(str(pth), str(out_path))
  params = inception.load_inception_params(str(out_path))  # checks names and shapes

  feature_fn = inception.make_feature_fn(params, batch_size=2)
  got = feature_fn(images.transpose(0, 2, 3, 1))  # NHWC uint8 -> float [0, 255] inside
  for key in inception.FEATURE_KEYS:
    assert got[key].shape == expected[key].shape, key
    np.testing.assert_allclose(got[key], expected[key], rtol=0, atol=1e-3, err_msg=key)
  assert not np.allclose(got["logits"], got["logits_unbiased"], atol=1e-2)


@pytest.mark.slow
def test_features_run_data_parallel_padded_and_compile_once():
  """evaluators.inception_feature_fn on the 8 devices, batches of 8: 10 and then 3 images
  (neither a multiple of the batch) give the features of an unpadded single-device forward,
  and the jitted forward compiles once for all the batches."""
  from simflow_jax.evals import evaluators  # noqa: PLC0415
  model = inception.InceptionV3()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3)).astype(np.float32)
  feature_fn = evaluators.inception_feature_fn(params, batch_size=8)
  got = feature_fn(images)
  got_small = feature_fn(images[:3])
  assert feature_fn.jitted._cache_size() == 1  # the last, shorter batches did not recompile
  one_device = jax.jit(lambda p, x: model.apply({"params": p}, x))(
      jax.device_put(params, jax.devices()[0]), jax.device_put(images, jax.devices()[0]))
  for key in inception.FEATURE_KEYS:
    want = np.asarray(one_device[key])
    assert got[key].shape == (10,) + want.shape[1:] and np.abs(want).max() > 0, key
    np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=key)
    np.testing.assert_array_equal(got_small[key], got[key][:3])
