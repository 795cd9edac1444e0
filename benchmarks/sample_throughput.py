"""Sampling throughput: images/s with sequential (KV-cached scan) and Jacobi decoding.

  python benchmarks/sample_throughput.py                    # demo and mid, 2 timed calls each
  python benchmarks/sample_throughput.py --configs=mid --batch=32 --repeats=3 --guidance=1.5

Prints one JSON object: {"machine": {...}, "perturb": STD, "results": {CONFIG: {...}}}. Per
config, shapes and settings, then for "sequential" and "jacobi":
  compile_s                  ahead-of-time compile of noise -> flow inverse -> VAE decode
                             (the warm-up; never part of the rates)
  seconds_per_batch, images_per_s   mean over --repeats calls with fresh noise
  jacobi_mean_iters, jacobi_mean_iters_per_block   (jacobi) iterations per chunk
Configs here (configs.base.get_base_config() + overrides; not common.get_config's):
  demo  32x32x1 images, VAE ch_mult (1, 2, 2) (f4), z 4 -> 8x8x4 latents = 64 tokens of
        4 dims; flow width 128, layers (2, 2); batch 64.
  mid   32x32x3 images, VAE ch_mult (1, 2) (f2), z 16 -> 16x16x16 latents = 256 tokens of
        16 dims; flow width 256, layers (2, 2, 2, 2); batch 16.
  tiny  common.get_config('tiny') (64 tokens, width 32); batch 8. A seconds-long smoke run.
Parameters are random (throughput only). A fresh flow is the identity (zero-initialised
heads), on which Jacobi stops after one iteration, so the flow parameters get Gaussian
noise of std --perturb to give Jacobi a realistic amount of work.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)
from configs import base
from simflow_jax import sample
from simflow_jax.models import build

CONFIGS = {
    "demo": dict(data=dict(image_size=32, channels=1), vae=dict(ch_mult=(1, 2, 2), z_channels=4),
                 flow=dict(width=128, layers=(2, 2)), batch=64),
    "mid": dict(data=dict(image_size=32, channels=3), vae=dict(ch_mult=(1, 2), z_channels=16),
                flow=dict(width=256, layers=(2, 2, 2, 2)), batch=16),
    "tiny": dict(batch=8),
}

_CONFIGS = flags.DEFINE_list("configs", ["demo", "mid"], f"Sampling benchmark configs: {sorted(CONFIGS)}.")
_BATCH = flags.DEFINE_integer("batch", 0, "Batch size (0 = the config's default).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed calls per decoder after compiling.")
_GUIDANCE = flags.DEFINE_float("guidance", 0.0, "Classifier-free guidance weight (0 = unguided).")
_JACOBI_CHUNK = flags.DEFINE_integer("jacobi_chunk", 0, "Jacobi chunk length (0 = the whole sequence).")
_PERTURB = flags.DEFINE_float("perturb", 0.02, "Std of the Gaussian noise added to the flow parameters.")


def make_config(name: str):
  if name not in CONFIGS:
    raise ValueError(f"Unknown benchmark config {name!r}; choose from {sorted(CONFIGS)}.")
  if name == "tiny":
    return common.get_config("tiny")
  config = base.get_base_config()
  for section in ("data", "vae", "flow"):
    config[section].update(CONFIGS[name][section])
  return config


def perturb(params, std: float, seed: int = 0):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [l + std * rng.standard_normal(l.shape).astype(np.float32) for l in leaves])


def time_sampler(models, params, labels, sample_cfg, repeats: int) -> dict:
  """Compiles ahead of time, then times `repeats` calls of noise -> tokens -> images."""

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


def bench_config(name: str) -> dict:
  config = make_config(name)
  models = build.build_models(config)
  params = jax.jit(lambda r: build.init_params(models, r))(jax.random.key(0))
  params = {"vae": params["vae"], "flow": perturb(params["flow"], _PERTURB.value)}
  batch = _BATCH.value or CONFIGS[name]["batch"]
  labels = jnp.arange(batch, dtype=jnp.int32) % models.num_classes
  cfg = config.sample
  cfg.update(guidance=_GUIDANCE.value, jacobi_chunk=_JACOBI_CHUNK.value, jacobi=False)
  result = dict(image_shape=[config.data.image_size, config.data.image_size, config.data.channels],
                latent_shape=[*models.latent_hw, models.latent_channels], tokens=models.flow.seq_len,
                token_dim=models.flow.token_dim, flow_width=models.flow.width,
                flow_layers=list(models.flow.layers_per_block), batch=batch, guidance=cfg.guidance,
                guidance_rule=cfg.guidance_rule, jacobi_chunk=cfg.jacobi_chunk,
                jacobi_threshold=cfg.jacobi_threshold)
  result["sequential"] = time_sampler(models, params, labels, cfg, _REPEATS.value)
  cfg.jacobi = True
  result["jacobi"] = time_sampler(models, params, labels, cfg, _REPEATS.value)
  return result


def main(argv):
  del argv
  if _REPEATS.value < 1:
    raise ValueError(f"--repeats must be >= 1, got {_REPEATS.value}.")
  for name in _CONFIGS.value:
    make_config(name)  # unknown names fail before any work
  results = {name: bench_config(name) for name in _CONFIGS.value}
  common.emit({"machine": common.machine(), "perturb": _PERTURB.value, "results": results})


if __name__ == "__main__":
  app.run(main)
