"""Converts official DINOv2 weights into the params msgpack of simflow_jax.pretrained.dinov2.

Inputs (both layouts are detected from the keys):
  (a) facebookresearch/dinov2 torch hub releases, e.g. `dinov2_vitb14_pretrain.pth`
      (cls_token, pos_embed, patch_embed.proj.*, blocks.N.attn.qkv.*, blocks.N.ls1.gamma,
      norm.*);
  (b) Hugging Face `facebook/dinov2-*` model.safetensors (embeddings.*, encoder.layer.N.*,
      layernorm.*; attention as `attention.attention.{query,key,value}` +
      `attention.output.dense` in the released files, or `attention.{q,k,v,o}_proj` in a
      transformers >= 5 state_dict), optionally under a `dinov2.` prefix.
`mask_token` (pre-training masking) and an HF `classifier.*` head are dropped; register
tokens (`*_reg` models) and SwiGLU MLPs (ViT-g/14) are refused with a clear error.

  python scripts/convert_dinov2.py --input dinov2_vitb14_pretrain.pth \
      --output dinov2_b14.msgpack [--preset dinov2_b14]

Importable functions: read_state_dict, hf_to_hub_state_dict, convert_hub_state_dict,
convert_hf_state_dict, convert_state_dict, infer_preset, save_params.
Reading .pth files needs torch, .safetensors files the `safetensors` package
(the [convert] extra); the conversion itself needs only numpy.
"""
import argparse
import os
import sys
import re
from typing import Mapping

from flax import serialization
import jax
import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simflow_jax.pretrained import dinov2, torch_files  # noqa: E402

_DROPPED_HUB_KEYS = ("mask_token",)


def _refuse_unsupported(sd: Mapping[str, np.ndarray]) -> None:
  """Register-token and SwiGLU checkpoints (either layout) get a clear error."""
  if any(k.endswith("register_tokens") for k in sd):
    raise ValueError("This checkpoint has register tokens (a `dinov2_vit*14_reg` model); "
                     "simflow_jax's DinoV2 is the plain release: use dinov2_vit*14_pretrain.pth "
                     "or facebook/dinov2-{small,base,large}.")
  swiglu = (".mlp.w12.", ".mlp.w3.", ".mlp.weights_in.", ".mlp.gate_proj.")
  if any(s in k for k in sd for s in swiglu):
    raise ValueError("This checkpoint uses a SwiGLU MLP (ViT-g/14), which is not supported; "
                     "use the S/14, B/14 or L/14 release.")


WHAT = ("a DINOv2 state dict (torch hub dinov2_vit*14_pretrain.pth or a Hugging Face "
        "facebook/dinov2-* model.safetensors)")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors or torch .pth/.pt/.bin state dict into float32 numpy arrays."""
  hint = ("Download the official DINOv2 weights on a machine with internet: "
          "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth "
          "(facebookresearch/dinov2 torch hub) or model.safetensors of the Hugging Face model "
          "facebook/dinov2-base (vits14 / dinov2-small and vitl14 / dinov2-large likewise).")
  sd = torch_files.load_state_dict(path, WHAT, hint)
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def hf_to_hub_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a Hugging Face Dinov2Model state dict into the torch hub layout (fuses q, k, v)."""
  _refuse_unsupported(sd)
  sd = {k.removeprefix("dinov2."): np.asarray(v) for k, v in sd.items()
        if not k.startswith("classifier.")}
  out, qkv, unknown = {}, {}, []
  simple = {
      "embeddings.cls_token": "cls_token",
      "embeddings.mask_token": "mask_token",
      "embeddings.position_embeddings": "pos_embed",
      "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
      "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
      "layernorm.weight": "norm.weight",
      "layernorm.bias": "norm.bias",
  }
  layer_renames = {
      "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
      "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
  }
  qkv_names = {"attention.attention.query": 0, "attention.attention.key": 1,
               "attention.attention.value": 2, "attention.q_proj": 0, "attention.k_proj": 1,
               "attention.v_proj": 2}
  for key, value in sd.items():
    if key in simple:
      out[simple[key]] = value
      continue
    m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", key)
    if m is None:
      unknown.append(key)
      continue
    i, name, kind = m.groups()
    if name in ("layer_scale1", "layer_scale2") and kind == "lambda1":
      out[f"blocks.{i}.ls{name[-1]}.gamma"] = value
    elif name in qkv_names:
      qkv.setdefault((i, kind), [None] * 3)[qkv_names[name]] = value
    elif name in layer_renames:
      out[f"blocks.{i}.{layer_renames[name]}.{kind}"] = value
    else:
      unknown.append(key)
  for (i, kind), parts in qkv.items():
    if any(p is None for p in parts):
      raise ValueError(f"layer {i}: query/key/value {kind} incomplete in the state dict.")
    out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate(parts, axis=0)  # rows [q; k; v]
  if unknown:
    raise ValueError(f"Unrecognised Hugging Face DINOv2 keys: {sorted(unknown)[:10]}")
  return out


def convert_hub_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
  """torch hub layout state dict -> our params tree (numpy float32)."""
  _refuse_unsupported(sd)
  params: dict = {}
  unknown = []

  def put(path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value, np.float32)

  for key, v in sd.items():
    v = np.asarray(v)
    if key in _DROPPED_HUB_KEYS:
      continue
    if key in ("cls_token", "pos_embed"):
      put(key, v)
    elif key == "patch_embed.proj.weight":
      put("patch_embed/kernel", v.transpose(2, 3, 1, 0))  # (dim, 3, p, p) -> (p, p, 3, dim)
    elif key == "patch_embed.proj.bias":
      put("patch_embed/bias", v)
    elif key in ("norm.weight", "norm.bias"):
      put("norm/" + ("scale" if key.endswith("weight") else "bias"), v)
    elif m := re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", key):
      put(f"block_{m[1]}/{m[2]}/" + ("scale" if m[3] == "weight" else "bias"), v)
    elif m := re.fullmatch(r"blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)",
                           key):
      path = f"block_{m[1]}/{m[2].replace('.', '/')}/"
      put(path + ("kernel" if m[3] == "weight" else "bias"), v.T if m[3] == "weight" else v)
    elif m := re.fullmatch(r"blocks\.(\d+)\.(ls1|ls2)\.gamma", key):
      put(f"block_{m[1]}/{m[2]}/gamma", v)
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"Unrecognised torch hub DINOv2 keys: {sorted(unknown)[:10]}")
  return params


def convert_hf_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
  """Hugging Face layout state dict -> our params tree (numpy float32)."""
  return convert_hub_state_dict(hf_to_hub_state_dict(sd))


def convert_state_dict(sd: Mapping[str, np.ndarray]) -> dict:
  """Detects the layout (hub or Hugging Face) and converts."""
  if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.")) for k in sd):
    return convert_hf_state_dict(sd)
  if "pos_embed" in sd or any(k.startswith("blocks.") for k in sd):
    return convert_hub_state_dict(sd)
  raise ValueError(f"Not a DINOv2 state dict; first keys: {sorted(sd)[:5]}")


def infer_preset(params: dict) -> str:
  """The preset whose width and depth match a converted params tree."""
  dim = params["cls_token"].shape[-1]
  depth = sum(1 for k in params if k.startswith("block_"))
  for name, cfg in dinov2.PRESETS.items():
    if cfg["dim"] == dim and cfg["depth"] == depth:
      return name
  raise ValueError(f"No DINOv2 preset has dim {dim} and depth {depth}; presets: "
                   f"{ {n: (c['dim'], c['depth']) for n, c in dinov2.PRESETS.items()} }")


def save_params(params: dict, path: str) -> None:
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(params))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--input", required=True, help=".pth (torch hub) or .safetensors (HF)")
  parser.add_argument("--output", required=True, help="output .msgpack")
  parser.add_argument("--preset", default="", help="check against this preset (default: infer)")
  args = parser.parse_args(argv)
  sd = read_state_dict(args.input)
  with torch_files.reading(args.input, WHAT):
    params = convert_state_dict(sd)
    preset = args.preset or infer_preset(params)
    dinov2.check_params(params, preset)
  save_params(params, args.output)
  count = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))
  print(f"Wrote {args.output}: preset {preset}, {count:,} parameters.")


if __name__ == "__main__":
  torch_files.run_cli(main)
