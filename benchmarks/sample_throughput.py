"""Sampling throughput: images/s with sequential (KV-cached scan) and Jacobi decoding.

Usage:
  python benchmarks/sample_throughput.py [--configs demo,mid] [--batch N] [--repeats R]
      [--guidance W] [--jacobi_chunk C] [--perturb STD]

Prints one JSON object: per config, for each decoder, the compile time (reported
separately, never in the rate), seconds per batch and images/s (noise -> flow inverse ->
VAE decode, compiled ahead of time), and for Jacobi the mean and per-block iteration counts.

Configs (configs.base.get_base_config() + overrides):
  demo  32x32x1 images, VAE ch_mult (1, 2, 2) (f4), z 4 -> 8x8x4 latents = 64 tokens of 4 dims;
        flow width 128, layers (2, 2); batch 64.
  mid   32x32x3 images, VAE ch_mult (1, 2) (f2), z 16 -> 16x16x16 latents = 256 tokens of
        16 dims; flow width 256, layers (2, 2, 2, 2); batch 16.
Parameters are random (throughput only). A fresh flow is the identity (zero-initialised
heads), on which Jacobi converges after one iteration, so the flow parameters are
perturbed by Gaussian noise of std --perturb to give Jacobi a realistic amount of work.
"""
import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from simflow_jax import sample
from simflow_jax.models import build

CONFIGS = {
    "demo": dict(data=dict(image_size=32, channels=1), vae=dict(ch_mult=(1, 2, 2), z_channels=4),
                 flow=dict(width=128, layers=(2, 2)), batch=64),
    "mid": dict(data=dict(image_size=32, channels=3), vae=dict(ch_mult=(1, 2), z_channels=16),
                flow=dict(width=256, layers=(2, 2, 2, 2)), batch=16),
}


def make_config(name: str):
  spec = CONFIGS[name]
  config = base.get_base_config()
  for section in ("data", "vae", "flow"):
    config[section].update(spec[section])
  return config


def perturb(params, std: float, seed: int = 0):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [l + std * rng.standard_normal(l.shape).astype(np.float32) for l in leaves])


def time_sampler(models, params, labels, sample_cfg, repeats: int) -> dict:
  """Compiles ahead of time (the warm-up; its time is reported as compile_s), then times
  `repeats` calls of noise -> tokens -> images."""

  def run(params, labels, rng):
    tokens, info = sample.sample_tokens(models, params["flow"], labels, rng, sample_cfg)
    images = models.vae.apply({"params": params["vae"]}, models.to_latents(tokens),
                              method=models.vae.decode)
    return jnp.clip(images, -1.0, 1.0), info

  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = jax.jit(run).lower(params, labels, rng).compile()
  compile_s = time.perf_counter() - start
  iters = []
  start = time.perf_counter()
  for i in range(repeats):
    images, info = compiled(params, labels, jax.random.fold_in(rng, i))
    jax.block_until_ready(images)
    if "jacobi_iters" in info:
      iters.append(np.asarray(info["jacobi_iters"]))
  seconds = (time.perf_counter() - start) / repeats
  out = dict(compile_s=round(compile_s, 2), seconds_per_batch=round(seconds, 3),
             images_per_s=round(labels.shape[0] / seconds, 2))
  if iters:
    iters = np.stack(iters)  # (repeats, K, num_chunks)
    out["jacobi_mean_iters"] = round(float(iters.mean()), 2)
    out["jacobi_mean_iters_per_block"] = [round(float(v), 2) for v in iters.mean(axis=(0, 2))]
  return out


def bench_config(name: str, args) -> dict:
  config = make_config(name)
  models = build.build_models(config)
  params = jax.jit(lambda r: build.init_params(models, r))(jax.random.key(0))
  params = {"vae": params["vae"], "flow": perturb(params["flow"], args.perturb)}
  batch = args.batch or CONFIGS[name]["batch"]
  labels = jnp.arange(batch, dtype=jnp.int32) % models.num_classes
  cfg = config.sample
  cfg.update(guidance=args.guidance, jacobi_chunk=args.jacobi_chunk)
  result = dict(image_shape=[config.data.image_size, config.data.image_size, config.data.channels],
                latent_shape=[*models.latent_hw, models.latent_channels],
                tokens=models.flow.seq_len, token_dim=models.flow.token_dim, flow_width=models.flow.width,
                flow_layers=list(models.flow.layers_per_block), batch=batch, guidance=args.guidance,
                jacobi_chunk=args.jacobi_chunk, jacobi_threshold=cfg.jacobi_threshold)
  cfg.jacobi = False
  result["sequential"] = time_sampler(models, params, labels, cfg, args.repeats)
  cfg.jacobi = True
  result["jacobi"] = time_sampler(models, params, labels, cfg, args.repeats)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", default="demo,mid", help=f"comma-separated, from {sorted(CONFIGS)}")
  parser.add_argument("--batch", type=int, default=0, help="batch size (0 = the config's default)")
  parser.add_argument("--repeats", type=int, default=2, help="timed calls after compiling")
  parser.add_argument("--guidance", type=float, default=0.0, help="CFG weight (0 = unguided)")
  parser.add_argument("--jacobi_chunk", type=int, default=0, help="Jacobi chunk (0 = whole sequence)")
  parser.add_argument("--perturb", type=float, default=0.02, help="std of the noise added to the flow params")
  args = parser.parse_args()
  names = [n.strip() for n in args.configs.split(",") if n.strip()]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    parser.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
  if args.repeats < 1:
    parser.error("--repeats must be >= 1")
  report = dict(backend=jax.default_backend(), devices=len(jax.devices()), jax=jax.__version__,
                machine=platform.machine(), perturb=args.perturb, repeats=args.repeats,
                results={n: bench_config(n, args) for n in names})
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
