"""Converts the PyTorch FID Inception weights (.pth) to the msgpack Flax params that
`simflow_jax.pretrained.inception.load_inception_params` reads.

The input is the standard `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release;
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth` holds the same tensors under
the same names). Reading it needs CPU torch; nothing is downloaded.

Usage:
  python scripts/convert_inception.py --pth pt_inception-2015-12-05-6726825d.pth \
      --out inception_fid.msgpack

Importable API:
  convert_state_dict(state_dict) -> params  torch names/layouts -> the InceptionV3 tree:
      conv weight (O, I, kh, kw) -> conv/kernel (kh, kw, I, O); BatchNorm folded to
      bn/scale = gamma / sqrt(var + 1e-3), bn/bias = beta - mean * scale;
      fc.weight (1008, 2048) -> fc/kernel (2048, 1008); fc.bias -> fc/bias.
  read_pth(path) -> dict of numpy arrays.
  convert_file(pth_path, out_path) -> params (also written to out_path).
"""
import argparse
import os
import sys
from typing import Any, Mapping

import flax.serialization
import flax.traverse_util
import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simflow_jax.pretrained import inception, torch_files  # noqa: E402

_BN_LEAVES = ("weight", "bias", "running_mean", "running_var")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """Maps an InceptionV3 state_dict (torch tensors or arrays) to the Flax params tree."""
  flat = {}
  batch_norms: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
  unknown = []
  for key, value in state_dict.items():
    parts = tuple(key.split("."))
    if parts[-1] == "num_batches_tracked":
      continue
    value = _to_numpy(value).astype(np.float64)
    if parts == ("fc", "weight"):
      flat[("fc", "kernel")] = value.T  # (2048, 1008)
    elif parts == ("fc", "bias"):
      flat[("fc", "bias")] = value
    elif len(parts) >= 3 and parts[-2:] == ("conv", "weight") and value.ndim == 4:
      flat[parts[:-2] + ("conv", "kernel")] = value.transpose(2, 3, 1, 0)  # (kh, kw, I, O)
    elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_LEAVES:
      batch_norms.setdefault(parts[:-2], {})[parts[-1]] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"state_dict keys that are not FID InceptionV3 parameters: {unknown[:10]}; "
                     f"is this {inception.WEIGHTS_FILENAME}?")
  for module, bn in batch_norms.items():
    missing = [leaf for leaf in _BN_LEAVES if leaf not in bn]
    if missing:
      raise ValueError(f"BatchNorm {'.'.join(module)}.bn lacks {missing}")
    scale = bn["weight"] / np.sqrt(bn["running_var"] + inception.BN_EPS)
    flat[module + ("bn", "scale")] = scale
    flat[module + ("bn", "bias")] = bn["bias"] - bn["running_mean"] * scale
  params = flax.traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()})
  inception.check_inception_params(params)
  return params


WHAT = f"the FID Inception weights ({inception.WEIGHTS_FILENAME}, a torch state dict)"


def read_pth(path: str) -> dict[str, np.ndarray]:
  """Reads a .pth state_dict into numpy arrays (needs torch)."""
  hint = (f"Download {inception.WEIGHTS_FILENAME} from {inception.WEIGHTS_URLS[0]} "
          f"(or {inception.WEIGHTS_URLS[1]}).")
  return torch_files.load_state_dict(path, WHAT, hint)


def convert_file(pth_path: str, out_path: str) -> dict:
  """Converts `pth_path` and writes the params to `out_path` (msgpack)."""
  state_dict = read_pth(pth_path)
  with torch_files.reading(pth_path, WHAT):
    params = convert_state_dict(state_dict)
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  with open(out_path, "wb") as f:
    f.write(flax.serialization.msgpack_serialize(params))
  return params


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", required=True, help=f"path to {inception.WEIGHTS_FILENAME}")
  parser.add_argument("--out", required=True, help="output .msgpack path")
  args = parser.parse_args(argv)
  params = convert_file(args.pth, args.out)
  count = sum(v.size for v in flax.traverse_util.flatten_dict(params).values())
  print(f"wrote {args.out}: {count:,} parameters")


if __name__ == "__main__":
  torch_files.run_cli(main)
