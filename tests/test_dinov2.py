"""Tests for simflow_jax.pretrained.dinov2 and scripts/convert_dinov2.py.

The port is checked against transformers' Dinov2Model with RANDOM weights (no download),
and the torch-hub key layout against the Hugging Face one.
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simflow_jax.pretrained import dinov2

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "convert_dinov2.py"


def _load_converter():
  spec = importlib.util.spec_from_file_location("convert_dinov2", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


conv = _load_converter()
TINY = dinov2.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_params():
  return dinov2.init_random_dinov2_params(jax.random.key(0), "tiny")


def _hf_model(image_size: int):
  """A tiny transformers Dinov2Model with random weights, LayerNorms and LayerScales perturbed."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  config = transformers.Dinov2Config(
      hidden_size=TINY["dim"], num_hidden_layers=TINY["depth"], num_attention_heads=TINY["num_heads"],
      intermediate_size=TINY["mlp_dim"], image_size=image_size, patch_size=14)
  model = transformers.Dinov2Model(config).eval()
  with torch.no_grad():  # HF initialises LN to (1, 0) and LayerScale to 1: make them informative
    for name, p in model.named_parameters():
      if "norm" in name or "lambda1" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  return model


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _hf_to_hub_by_hand(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The torch hub layout written out independently of the converter."""
  hub = {"cls_token": sd["embeddings.cls_token"], "mask_token": sd["embeddings.mask_token"],
         "pos_embed": sd["embeddings.position_embeddings"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  for i in range(TINY["depth"]):
    hf, b = f"encoder.layer.{i}.", f"blocks.{i}."
    for kind in ("weight", "bias"):
      hub[b + f"attn.qkv.{kind}"] = np.concatenate(
          [sd[hf + f"attention.{n}_proj.{kind}"] for n in "qkv"], axis=0)
      hub[b + f"attn.proj.{kind}"] = sd[hf + f"attention.o_proj.{kind}"]
      for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
        hub[b + f"{n}.{kind}"] = sd[hf + f"{n}.{kind}"]
    hub[b + "ls1.gamma"] = sd[hf + "layer_scale1.lambda1"]
    hub[b + "ls2.gamma"] = sd[hf + "layer_scale2.lambda1"]
  return hub


def _to_legacy_hf(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers >= 5 attention names -> the names in the released model.safetensors."""
  names = {"attention.q_proj": "attention.attention.query", "attention.k_proj":
           "attention.attention.key", "attention.v_proj": "attention.attention.value",
           "attention.o_proj": "attention.output.dense"}
  out = {}
  for k, v in sd.items():
    for new, old in names.items():
      k = k.replace(new, old)
    out[k] = v
  return out


def _assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.torch
@pytest.mark.parametrize("in_hw,out_hw,scale", [
    ((37, 37), (16, 16), None),            # HF pos-embed resize for 224 px
    ((37, 37), (16, 16), 16.1 / 37),       # torch hub pos-embed resize (interpolate_offset 0.1)
    ((7, 9), (16, 16), None),              # upsampling
    ((32, 28), (224, 224), None),          # preprocess: digits -> 224
])
def test_resize_bicubic_matches_torch(in_hw, out_hw, scale):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  kwargs = dict(scale_factor=(scale, scale)) if scale else dict(size=out_hw)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), mode="bicubic",
                                        align_corners=False, antialias=False, **kwargs)
  ours = dinov2.resize_bicubic_torch(jnp.asarray(x), out_hw, (scale, scale) if scale else None)
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=2e-5)


@pytest.mark.torch
@pytest.mark.parametrize("image_size", [518, 98])  # pos grid 37 (shrunk to 16) and 7 (grown to 16)
def test_matches_transformers_dinov2(image_size):
  torch = pytest.importorskip("torch")
  model = _hf_model(image_size)
  params = conv.convert_hf_state_dict(_state_dict(model))
  x = np.random.default_rng(1).normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
  ours = dinov2.make_dinov2("tiny", pos_grid=image_size // 14)
  tokens, cls = ours.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)), return_cls=True)
  assert tokens.shape == (2, 256, TINY["dim"]) and cls.shape == (2, TINY["dim"])
  assert np.max(np.abs(np.asarray(tokens) - ref[:, 1:])) < 1e-4
  assert np.max(np.abs(np.asarray(cls) - ref[:, 0])) < 1e-4


@pytest.mark.torch
def test_hub_offset_pos_embed_matches_torch_hub_formula(tiny_params):
  torch = pytest.importorskip("torch")
  pos_embed = np.array(tiny_params["pos_embed"])
  pos = dinov2.interpolate_pos_embed(jnp.asarray(pos_embed), (16, 16), interpolate_offset=0.1)
  # facebookresearch/dinov2 vision_transformer.interpolate_pos_encoding, offset 0.1:
  full = torch.from_numpy(pos_embed)
  grid = full[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
  ref = torch.nn.functional.interpolate(grid, mode="bicubic", antialias=False,
                                        scale_factor=(16.1 / 37, 16.1 / 37))
  ref = torch.cat([full[:, :1], ref.permute(0, 2, 3, 1).reshape(1, 256, -1)], dim=1).numpy()
  np.testing.assert_allclose(np.asarray(pos), ref, atol=1e-5)
  pos_hf = dinov2.interpolate_pos_embed(jnp.asarray(pos_embed), (16, 16))
  assert np.max(np.abs(np.asarray(pos_hf) - ref)) > 1e-3  # the two conventions really differ


@pytest.mark.torch
def test_hub_and_hf_layouts_give_the_same_params():
  sd = _state_dict(_hf_model(518))
  from_hf = conv.convert_hf_state_dict(sd)
  _assert_same_tree(conv.convert_hub_state_dict(_hf_to_hub_by_hand(sd)), from_hf)
  _assert_same_tree(conv.convert_state_dict(_hf_to_hub_by_hand(sd)), from_hf)
  _assert_same_tree(conv.convert_state_dict(_to_legacy_hf(sd)), from_hf)
  classifier_ckpt = {f"dinov2.{k}": v for k, v in _to_legacy_hf(sd).items()}
  classifier_ckpt["classifier.weight"] = np.zeros((10, 2 * TINY["dim"]), np.float32)
  _assert_same_tree(conv.convert_state_dict(classifier_ckpt), from_hf)
  dinov2.check_params(from_hf, "tiny")
  assert conv.infer_preset(from_hf) == "tiny"


@pytest.mark.torch
def test_converter_cli_safetensors_and_pth(tmp_path):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  model = _hf_model(518)
  sd = _state_dict(model)
  expected = conv.convert_hf_state_dict(sd)
  st = tmp_path / "model.safetensors"
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
  conv.main(["--input", str(st), "--output", str(tmp_path / "a.msgpack")])
  _assert_same_tree(dinov2.load_dinov2_params(str(tmp_path / "a.msgpack"), "tiny"), expected)
  pth = tmp_path / "dinov2_tiny_pretrain.pth"
  torch.save({k: torch.from_numpy(v) for k, v in _hf_to_hub_by_hand(sd).items()}, str(pth))
  conv.main(["--input", str(pth), "--output", str(tmp_path / "b.msgpack"), "--preset", "tiny"])
  _assert_same_tree(dinov2.load_dinov2_params(str(tmp_path / "b.msgpack"), "tiny"), expected)
  with pytest.raises(ValueError, match="dinov2_b14"):
    conv.main(["--input", str(pth), "--output", str(tmp_path / "c.msgpack"), "--preset",
               "dinov2_b14"])


@pytest.mark.torch
def test_parameter_count_matches_transformers(tiny_params):
  model = _hf_model(518)
  hf_count = sum(p.numel() for n, p in model.named_parameters() if "mask_token" not in n)
  assert sum(x.size for x in jax.tree.leaves(tiny_params)) == hf_count


def test_converter_refuses_unsupported_checkpoints(tiny_params, tmp_path):
  with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
    conv.read_state_dict(str(tmp_path / "absent.pth"))
  hub = {k: np.asarray(tiny_params[k]) for k in ("cls_token", "pos_embed")}
  with pytest.raises(ValueError, match="register tokens"):
    conv.convert_state_dict({**hub, "register_tokens": np.zeros((1, 4, 64), np.float32)})
  with pytest.raises(ValueError, match="SwiGLU"):
    conv.convert_state_dict({**hub, "blocks.0.mlp.w12.weight": np.zeros((8, 64), np.float32)})
  with pytest.raises(ValueError, match="blocks.0.attn.qkv_typo.weight"):
    conv.convert_state_dict({**hub, "blocks.0.attn.qkv_typo.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="Not a DINOv2 state dict"):
    conv.convert_state_dict({"conv1.weight": np.zeros((3, 3), np.float32)})


def test_load_roundtrip_and_errors(tmp_path, tiny_params):
  params = tiny_params
  path = tmp_path / "tiny.msgpack"
  conv.save_params(jax.tree.map(np.asarray, params), str(path))
  _assert_same_tree(dinov2.load_dinov2_params(str(path), "tiny"), params)
  with pytest.raises(ValueError, match="do not match preset 'dinov2_s14'"):
    dinov2.load_dinov2_params(str(path), "dinov2_s14")
  missing = str(tmp_path / "dinov2_b14.msgpack")
  for bad in (missing, ""):
    with pytest.raises(FileNotFoundError) as err:
      dinov2.load_dinov2_params(bad, "dinov2_b14")
    for needle in (repr(bad), "dinov2_vitb14_pretrain.pth", "facebook/dinov2-base",
                   "scripts/convert_dinov2.py"):
      assert needle in str(err.value)
  with pytest.raises(ValueError, match="Unknown DINOv2 preset"):
    dinov2.load_dinov2_params(str(path), "vit_huge")


def test_preprocess_values_and_grayscale():
  rng = np.random.default_rng(0)
  gray = jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 32, 1)).astype(np.float32))
  out = dinov2.preprocess(gray)
  assert out.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(out, dinov2.preprocess(jnp.repeat(gray, 3, axis=-1)), atol=1e-6)
  # A constant image stays constant through the resize: ((v + 1) / 2 - mean) / std per channel.
  const = dinov2.preprocess(jnp.full((1, 20, 20, 3), 0.2))
  want = (0.6 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
  np.testing.assert_allclose(const, np.broadcast_to(want, const.shape), atol=1e-5)
  assert dinov2.preprocess(jnp.zeros((1, 256, 256, 3)), size=448).shape == (1, 448, 448, 3)
  with pytest.raises(ValueError, match="1 or 3 channels"):
    dinov2.preprocess(jnp.zeros((1, 32, 32, 2)))


def test_tiny_forward_shapes_and_input_checks(tiny_params):
  params = tiny_params
  model = dinov2.make_dinov2("tiny")
  x = dinov2.preprocess(jnp.zeros((2, 32, 32, 1)))
  tokens = jax.jit(model.apply)({"params": params}, x)
  assert tokens.shape == (2, 256, 64) and tokens.dtype == jnp.float32
  # final LayerNorm with scale 1, bias 0 at init: every token has mean 0 and variance 1
  np.testing.assert_allclose(np.mean(tokens, -1), 0, atol=1e-5)
  np.testing.assert_allclose(np.var(tokens, -1), 1, atol=1e-3)
  with pytest.raises(ValueError, match="multiples of 14"):
    model.apply({"params": params}, jnp.zeros((1, 30, 28, 3)))
