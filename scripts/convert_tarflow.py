"""Converts an apple/ml-tarflow checkpoint (a torch.save'd state dict, .pth) into our flow params.

  python scripts/convert_tarflow.py --pth model.pth --out flow.msgpack \
      [--channels C --blocks K --layers_per_block L --patch_size P --in_channels c \
       --img_size N --num_classes n --head_dim 64]

Sizes are read from the state dict's shapes; the flags given are checked against them.
The image layout is never guessed: when a token's D features fit more than one
in_channels * patch_size^2 (D = 16: 1x(4x4), 4x(2x2) or 16x(1x1)), the converter stops and
asks for --patch_size and/or --in_channels. A missing or unreadable file, or one that is not
an ml-tarflow state dict, is one `Error:` line naming it, exit 2. Writes the
params (flax.serialization msgpack) and prints the config overrides that build the
matching Flow (simflow_jax/pretrained/tarflow.py: TARFLOW_OPTIONS; docs/flow.md). The
converted flow reads tokens of our patchify of (B, N, N, c) images. Needs torch (the
[convert] extra) to read the .pth; the mapping itself is numpy.
"""
import argparse
import os
import sys

import numpy as np
from flax import serialization

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simflow_jax.pretrained import tarflow, torch_files  # noqa: E402


WHAT = "an apple/ml-tarflow model state dict (blocks.N.proj_in.weight, ..., var)"


def read_state_dict(path: str) -> dict:
  """A .pth state dict -> {name: float numpy array} (a {'state_dict': ...} or
  {'model': ...} wrapper is unwrapped); a WeightsFileError naming the file otherwise."""
  return torch_files.load_state_dict(path, WHAT)


def check_flags(settings: dict, args) -> None:
  """Raises SystemExit when a size flag disagrees with the checkpoint."""
  f = settings["flow"]
  found = {"channels": f["width"], "blocks": len(f["layers"]), "patch_size": f["patch_size"],
           "in_channels": settings["channels"], "img_size": settings["image_size"],
           "num_classes": settings["num_classes"]}
  if args.layers_per_block is not None and any(n != args.layers_per_block for n in f["layers"]):
    raise SystemExit(f"--layers_per_block={args.layers_per_block} but the checkpoint has {f['layers']}.")
  for name, value in found.items():
    given = getattr(args, name)
    if given is not None and given != value:
      raise SystemExit(f"--{name}={given} but the checkpoint has {value}.")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--pth", required=True, help="ml-tarflow state dict (.pth)")
  parser.add_argument("--out", required=True, help="output params (.msgpack)")
  for name in ("channels", "blocks", "layers_per_block", "patch_size", "in_channels", "img_size",
               "num_classes"):
    parser.add_argument(f"--{name}", type=int, default=None)
  parser.add_argument("--head_dim", type=int, default=64, help="attention head size (ml-tarflow: 64)")
  args = parser.parse_args(argv)
  sd = read_state_dict(args.pth)
  with torch_files.reading(args.pth, WHAT):
    params, settings = tarflow.convert_state_dict(sd, head_dim=args.head_dim,
                                                  patch_size=args.patch_size,
                                                  in_channels=args.in_channels)
  check_flags(settings, args)
  with open(args.out, "wb") as fh:
    fh.write(serialization.msgpack_serialize(params))
  n = sum(int(np.prod(a.shape)) for a in _leaves(params))
  f = settings["flow"]
  print(f"wrote {args.out}: {n:,} parameters, {len(f['layers'])} blocks x {f['layers'][0]} layers, "
        f"width {f['width']}, tokens {(settings['image_size'] // f['patch_size']) ** 2} x "
        f"{settings['channels'] * f['patch_size'] ** 2} ({settings['image_size']}x{settings['image_size']}"
        f"x{settings['channels']} images, patch {f['patch_size']}), classes {settings['num_classes']}, "
        f"{'non-volume-preserving (--nvp)' if settings['nvp'] else 'volume-preserving (--no-nvp)'}")
  print("flow config overrides:")
  print(tarflow.config_overrides(settings))


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


if __name__ == "__main__":
  torch_files.run_cli(main)
