"""Sampling from a trained SimFlow: noise -> flow inverse -> VAE decode (SimFlow, arXiv 2512.04084).

Pure, batch-polymorphic functions (no mesh, no checkpoints, no files); the inverse and
the guidance rules are models/inverse.py and models/guidance.py, and the
`main.py --mode=sample` export command built on this is simflow_jax/commands/sample.py.

`sample_cfg` is `config.sample` (configs/base.py): temperature, guidance and its rule,
schedule and blocks, and the inverse (cached | jacobi | selective) with its Jacobi chunk,
threshold and iteration cap, and the sequential decoder's KV-cache windows and the dtype the
KV cache stores (`kv_cache_dtype`: float32, or bfloat16 for half the cache memory). Tokens are
(B, T, D), images (B, H, W, C) in [-1, 1].
"""
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np

from simflow_jax.models import guidance as guidance_lib
from simflow_jax.models import inverse as inverse_lib
from simflow_jax.models import vae as vae_lib


def check_labels(labels, num_classes: int) -> None:
  """Raises ValueError unless labels is a 1-D integer array with ids in [0, num_classes)."""
  arr = np.asarray(labels)
  if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array (B,), got shape {arr.shape} dtype {arr.dtype}.")
  bad = np.unique(arr[(arr < 0) | (arr >= num_classes)])
  if bad.size:
    raise ValueError(f"class ids {bad.tolist()} are outside [0, {num_classes}); use ids 0..{num_classes - 1} "
                     f"(the null class {num_classes} is reserved for guidance).")


def sample_tokens(models, flow_params, labels, rng, sample_cfg):
  """labels (B,) int -> (tokens (B, T, D) float32, {'steps': (K, num_chunks) int32}).
  z ~ N(0, temperature^2 I), inverted by sample_cfg.inverse (models/inverse.py); steps
  are the Jacobi iterations (or sequential tokens) per chunk of each block."""
  labels = jnp.asarray(labels, jnp.int32)
  z = sample_cfg.temperature * jax.random.normal(rng, (labels.shape[0], *models.token_shape), jnp.float32)
  tokens, steps = inverse_lib.inverse(
      models.flow, flow_params, z, labels, sample_cfg.inverse,
      guidance_lib.guides_from_config(models.flow, sample_cfg), chunk=sample_cfg.jacobi_chunk,
      threshold=sample_cfg.jacobi_threshold, max_iters=sample_cfg.jacobi_max_iters,
      windows=sample_cfg.kv_windows,
      cache_dtype=inverse_lib.kv_cache_dtype(sample_cfg.get("kv_cache_dtype", "float32")))
  return tokens, {"steps": steps}


def sample_images(models, params, labels, rng, sample_cfg):
  """params {'vae', 'flow'} -> images (B, H, W, C) in [-1, 1] (decoder output clipped)."""
  tokens, _ = sample_tokens(models, params["flow"], labels, rng, sample_cfg)
  latents = models.to_latents(tokens)  # (B, h, w, c)
  images = models.vae.apply({"params": params["vae"]}, latents, method=vae_lib.VAE.decode)
  return jnp.clip(images, -1.0, 1.0)


def make_sample_fn(models, sample_cfg):
  """fn(params, labels, rng) -> images, jitted once per batch shape. A snapshot of
  sample_cfg is taken now (later edits do not apply). Concrete, fully addressable labels
  are checked with check_labels before the call."""
  sample_cfg = copy.deepcopy(sample_cfg)
  inverse_lib.kv_cache_dtype(sample_cfg.get("kv_cache_dtype", "float32"))  # a bad name fails now
  jitted = jax.jit(functools.partial(sample_images, models, sample_cfg=sample_cfg))

  def sample_fn(params, labels, rng):
    """params {'vae', 'flow'}, labels (B,) int, rng key -> images (B, H, W, C) in [-1, 1]."""
    concrete = not isinstance(labels, jax.core.Tracer)
    if concrete and (not isinstance(labels, jax.Array) or labels.is_fully_addressable):
      check_labels(labels, models.num_classes)
    return jitted(params, labels, rng)

  return sample_fn
