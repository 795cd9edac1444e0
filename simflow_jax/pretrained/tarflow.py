"""TarFlow (apple/ml-tarflow) PyTorch state dicts -> our Flow's parameters (numpy only).

TarFlow is our flow with the options of docs/flow.md set to TARFLOW_OPTIONS (output-side
shift, no final LayerNorm, LayerNorm eps 1e-5, exact GELU, class embeddings added to
the input, the null class as their mean, a per-position prior variance `var`).
The mapping, per block k (torch Linear weights are (out, in); ours kernels are (in, out)):
  blocks.k.proj_in / proj_out            -> block_k/proj_in / proj_out (Dense)
  blocks.k.pos_embed (T, C)              -> block_k/pos_embed, reversed for odd k (TarFlow
                                            reverses it with the tokens; ours is in block order)
  blocks.k.class_embed (n, 1, C)         -> block_k/class_embed/embedding (n, C)
  blocks.k.attn_blocks.j.attention.norm  -> transformer layer j norm1 (LayerNorm)
  ...attention.qkv (3C, C) = [q | k | v], heads contiguous -> attn/{query,key,value}
                                            kernels (C, H, Dh), biases (H, Dh)
  ...attention.proj (C, C)               -> attn/out kernel (H, Dh, C)
  ...mlp.norm, mlp.main.0, mlp.main.2    -> norm2, mlp/fc1, mlp/fc2
  var (T, D)                             -> prior_log_std = log(var) / 2
A volume-preserving model (ml-tarflow's --no-nvp: proj_out gives b only) gets a = 0 rows in
proj_out, which is the same map (scale 1, log-det 0); docs/flow.md says how `var` enters
the likelihood in both modes.
Layers come out stacked (L, ...) for the default scanned stack (flow.scan_layers=True).

Token layout: TarFlow patchifies images with torch's unfold, so a token's D = c*p*p
features are ordered (c, p1, p2); our patchify (models/flow.py) orders them (p1, p2, c).
The converter permutes the features of proj_in's input, proj_out's outputs (a and b)
and the prior, so the converted flow reads tokens made by OUR patchify of (B, H, W, c)
images. tarflow_tokens_to_ours / ours_to_tarflow_tokens move tokens between the two
layouts (e.g. to compare with TarFlow's own outputs).
"""
import math
import re
from typing import Mapping, Optional

import numpy as np

# The flow config fields (configs/base.py: flow) that make our Flow compute TarFlow.
TARFLOW_OPTIONS = dict(cond_blocks="all", token0="shift", scale="exp", shift_side="output",
                       final_norm=False, ln_eps=1e-5, gelu="exact", null_class="mean",
                       prior_std=True, mlp_ratio=4)
_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(sd: Mapping[str, np.ndarray]) -> dict:
  """Drops DDP's 'module.' and torch.compile's '_orig_mod.' key prefixes."""
  out = {}
  for key, value in sd.items():
    changed = True
    while changed:
      changed = False
      for prefix in _PREFIXES:
        if key.startswith(prefix):
          key, changed = key[len(prefix):], True
    out[key] = value
  return out


def token_permutation(patch_size: int, channels: int) -> np.ndarray:
  """perm (D,) with ours[..., i] = tarflow[..., perm[i]] for D = p*p*c token features."""
  p, c = patch_size, channels
  return np.arange(c * p * p).reshape(c, p, p).transpose(1, 2, 0).reshape(-1)  # (p1, p2, c) -> (c, p1, p2) index


def tarflow_tokens_to_ours(tokens, patch_size: int, channels: int):
  """(..., D) features ordered (c, p1, p2) -> (p1, p2, c)."""
  return tokens[..., token_permutation(patch_size, channels)]


def ours_to_tarflow_tokens(tokens, patch_size: int, channels: int):
  """(..., D) features ordered (p1, p2, c) -> (c, p1, p2)."""
  return tokens[..., np.argsort(token_permutation(patch_size, channels))]


def _isqrt(n: int) -> Optional[int]:
  r = math.isqrt(n)
  return r if r * r == n else None


def token_layouts(token_dim: int, *, patch_size: Optional[int] = None,
                  in_channels: Optional[int] = None) -> list[tuple[int, int]]:
  """Every (in_channels, patch_size) with in_channels * patch_size^2 = token_dim that agrees
  with the values given (None = any), by decreasing patch size."""
  found = []
  for p in range(math.isqrt(token_dim), 0, -1):
    if token_dim % (p * p) == 0:
      c = token_dim // (p * p)
      if (patch_size is None or p == patch_size) and (in_channels is None or c == in_channels):
        found.append((c, p))
  return found


def _layout_list(layouts) -> str:
  return ", ".join(f"{c}x({p}x{p})" for c, p in layouts)


def infer_architecture(sd: Mapping[str, np.ndarray], *, head_dim: int = 64,
                       patch_size: Optional[int] = None, in_channels: Optional[int] = None) -> dict:
  """The model sizes read from the state dict's shapes: num_blocks, layers_per_block,
  channels (C), seq_len (T), token_dim (D), num_classes (0 = unconditional), mlp_ratio,
  nvp (proj_out gives a and b; False: b only, ml-tarflow's --no-nvp),
  head_dim, patch_size, in_channels, img_size. The token width D = in_channels * patch_size^2
  fixes the image layout only when one (in_channels, patch_size) pair fits D and the values
  given: otherwise a ValueError lists the layouts that fit and the flags that choose one (the
  converter never guesses: a wrong guess reads the images in the wrong layout, silently)."""
  blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.proj_in\.weight$", k))})
  if not blocks or blocks != list(range(len(blocks))):
    raise ValueError("not an ml-tarflow state dict: expected keys blocks.0.proj_in.weight, "
                     f"blocks.1.proj_in.weight, ... (found {sorted(sd)[:5]} ...).")
  layers = [len({int(m.group(1)) for k in sd
                 if (m := re.match(rf"blocks\.{b}\.attn_blocks\.(\d+)\.attention\.qkv\.weight$", k))})
            for b in blocks]
  channels, token_dim = sd["blocks.0.proj_in.weight"].shape
  seq_len = sd["blocks.0.pos_embed"].shape[0]
  num_classes = sd["blocks.0.class_embed"].shape[0] if "blocks.0.class_embed" in sd else 0
  hidden = sd["blocks.0.attn_blocks.0.mlp.main.0.weight"].shape[0]
  if hidden % channels:
    raise ValueError(f"MLP hidden size {hidden} is not a multiple of the width {channels}.")
  if channels % head_dim:
    raise ValueError(f"width {channels} is not a multiple of head_dim={head_dim}: pass the model's "
                     "--head_dim (ml-tarflow's Model uses 64).")
  layouts = token_layouts(token_dim, patch_size=patch_size, in_channels=in_channels)
  if not layouts:
    given = " ".join(f"--{n}={v}" for n, v in (("patch_size", patch_size), ("in_channels", in_channels))
                     if v is not None)
    raise ValueError(f"{given}: the checkpoint's tokens have {token_dim} features, which is not "
                     f"in_channels * patch_size^2 for these values; the layouts that fit are "
                     f"{_layout_list(token_layouts(token_dim))}.")
  if len(layouts) > 1:
    raise ValueError(f"the checkpoint's tokens have {token_dim} features, which fits "
                     f"{len(layouts)} image layouts in_channels x (patch_size x patch_size): "
                     f"{_layout_list(layouts)}; the state dict does not say which: pass the model's "
                     "--patch_size (ml-tarflow's --patch_size) and/or --in_channels (3 for RGB pixels, "
                     "the latent's channels for a latent model).")
  in_channels, patch_size = layouts[0]
  side = _isqrt(seq_len)
  if side is None:
    raise ValueError(f"{seq_len} tokens are not a square grid of patches.")
  out_rows = sd["blocks.0.proj_out.weight"].shape[0]
  if out_rows not in (token_dim, 2 * token_dim):
    raise ValueError(f"proj_out has {out_rows} outputs: expected 2 x {token_dim} (TarFlow's default "
                     f"--nvp, a and b) or {token_dim} (--no-nvp, b only).")
  return dict(nvp=out_rows == 2 * token_dim, num_blocks=len(blocks), layers_per_block=tuple(layers),
              channels=channels,
              seq_len=seq_len, token_dim=token_dim, num_classes=num_classes,
              mlp_ratio=hidden // channels, head_dim=head_dim, patch_size=patch_size,
              in_channels=in_channels, img_size=side * patch_size)


def flow_settings(arch: dict) -> dict:
  """Flow config fields (configs/base.py: flow) for a model of `arch` (infer_architecture)."""
  return dict(TARFLOW_OPTIONS, patch_size=arch["patch_size"], width=arch["channels"],
              layers=arch["layers_per_block"], head_dim=arch["head_dim"], mlp_ratio=arch["mlp_ratio"],
              cond="add" if arch["num_classes"] else "none")


def _dense(w, b):
  """torch Linear (out, in), (out,) -> flax Dense {'kernel': (in, out), 'bias'}."""
  return {"kernel": np.asarray(w, np.float32).T, "bias": np.asarray(b, np.float32)}


def _layer(sd, pre: str, heads: int, head_dim: int) -> dict:
  c = heads * head_dim
  qkv_w, qkv_b = sd[pre + "attention.qkv.weight"], sd[pre + "attention.qkv.bias"]  # (3C, C), (3C,)
  attn = {}
  for i, name in enumerate(("query", "key", "value")):
    w = np.asarray(qkv_w[i * c:(i + 1) * c], np.float32)                 # (C_out = H*Dh, C_in)
    attn[name] = {"kernel": w.T.reshape(c, heads, head_dim),             # (C, H, Dh)
                  "bias": np.asarray(qkv_b[i * c:(i + 1) * c], np.float32).reshape(heads, head_dim)}
  out_w = np.asarray(sd[pre + "attention.proj.weight"], np.float32)     # (C, C_in = H*Dh)
  attn["out"] = {"kernel": out_w.T.reshape(heads, head_dim, c),         # (H, Dh, C)
                 "bias": np.asarray(sd[pre + "attention.proj.bias"], np.float32)}
  norm = lambda name: {"scale": np.asarray(sd[pre + name + ".weight"], np.float32),
                       "bias": np.asarray(sd[pre + name + ".bias"], np.float32)}
  return {"norm1": norm("attention.norm"), "attn": attn, "norm2": norm("mlp.norm"),
          "mlp": {"fc1": _dense(sd[pre + "mlp.main.0.weight"], sd[pre + "mlp.main.0.bias"]),
                  "fc2": _dense(sd[pre + "mlp.main.2.weight"], sd[pre + "mlp.main.2.bias"])}}


def convert_state_dict(sd: Mapping[str, np.ndarray], *, head_dim: int = 64,
                       patch_size: Optional[int] = None, in_channels: Optional[int] = None):
  """An ml-tarflow state dict (numpy arrays) -> (params, settings).

  params: our Flow's parameter tree (float32; layers stacked for the scanned stack).
  settings: {'flow': flow config fields (flow_settings), 'image_size', 'channels',
  'num_classes'}; the flow reads (B, T, D) tokens of our patchify of (B, N, N, c) images.
  """
  sd = strip_prefixes(sd)
  arch = infer_architecture(sd, head_dim=head_dim, patch_size=patch_size, in_channels=in_channels)
  perm = token_permutation(arch["patch_size"], arch["in_channels"])
  d, heads = arch["token_dim"], arch["channels"] // head_dim
  params = {}
  for k, depth in enumerate(arch["layers_per_block"]):
    pre = f"blocks.{k}."
    w_out = np.asarray(sd[pre + "proj_out.weight"], np.float32)  # (2D, C): rows [a | b], TarFlow order
    b_out = np.asarray(sd[pre + "proj_out.bias"], np.float32)
    if not arch["nvp"]:  # volume preserving (--nvp false): b only, a = 0 (scale 1, log-det 0)
      w_out = np.concatenate([np.zeros_like(w_out), w_out])
      b_out = np.concatenate([np.zeros_like(b_out), b_out])
    out_rows = np.concatenate([perm, d + perm])
    block = {
        "proj_in": {"kernel": np.asarray(sd[pre + "proj_in.weight"], np.float32).T[perm],  # (D, C)
                    "bias": np.asarray(sd[pre + "proj_in.bias"], np.float32)},
        # TarFlow permutes pos_embed with the tokens; ours is indexed in block order.
        "pos_embed": np.asarray(sd[pre + "pos_embed"], np.float32)[::-1 if k % 2 else 1].copy(),  # (T, C)
        "proj_out": {"kernel": w_out[out_rows].T, "bias": b_out[out_rows]},               # (C, 2D)
    }
    if arch["num_classes"]:
      block["class_embed"] = {"embedding": np.asarray(sd[pre + "class_embed"], np.float32)[:, 0]}  # (n, C)
    layer_trees = [_layer(sd, f"{pre}attn_blocks.{j}.", heads, head_dim) for j in range(depth)]
    stacked = _stack(layer_trees)
    block["transformer"] = {"layers": stacked}
    params[f"block_{k}"] = block
  if "var" not in sd:
    raise ValueError("the state dict has no `var` buffer (the prior variance, (T, D)).")
  params["prior_log_std"] = (0.5 * np.log(np.asarray(sd["var"], np.float64)))[:, perm].astype(np.float32)
  settings = {"flow": flow_settings(arch), "image_size": arch["img_size"],
              "channels": arch["in_channels"], "num_classes": arch["num_classes"], "nvp": arch["nvp"]}
  return params, settings


def _stack(trees: list) -> dict:
  """A list of equal-structured dicts of arrays -> one dict of (len, ...) arrays."""
  if isinstance(trees[0], dict):
    return {key: _stack([t[key] for t in trees]) for key in trees[0]}
  return np.stack(trees)


def config_overrides(settings: dict) -> str:
  """The command-line overrides (`--config.flow.x=... --config.data.y=...`) of `settings`."""
  def fmt(v):
    if isinstance(v, tuple):
      return '"(' + ", ".join(str(i) for i in v) + (",)" if len(v) == 1 else ')') + '"'
    return str(v)
  parts = [f"--config.flow.{k}={fmt(v)}" for k, v in settings["flow"].items()]
  parts += [f"--config.data.image_size={settings['image_size']}",
            f"--config.data.channels={settings['channels']}",
            f"--config.data.num_classes={max(settings['num_classes'], 1)}"]
  return " ".join(parts)
