"""Sampling from a trained SimFlow (DESIGN.md section 7): noise -> flow inverse -> VAE decode.

Pure, batch-polymorphic functions (no mesh, no checkpoints, no files). The
`main.py --mode=sample` export command built on them is simflow_jax/export.py.

Public API:
  Guidance (classifier-free; a `guide(log_sigma, b, t)` combines a doubled batch
  [conditional; null class] (2B, D) at block-order token t into one stream (B, D)):
    make_guide(rule, weight, schedule, seq_len) -> guide
        rule: 'linear' | 'linear_shift' | 'gaussian'; schedule: 'constant' | 'anneal'.
    guide_for_block(flow, sample_cfg) -> (k -> guide or None)
  Jacobi decoding (STARFlow):
    invert_block_jacobi(flow, params, k, z_blk, labels, guide, chunk, threshold, max_iters)
        -> (x_blk (B, T, D), iters (num_chunks,) int32)
    inverse_jacobi(flow, params, z, labels, sample_cfg, guide_for_block=None)
        -> (x (B, T, D), iters (K, num_chunks) int32; row k = block k)
  The sampler:
    check_labels(labels, num_classes)               ValueError naming ids outside [0, num_classes)
    sample_tokens(models, flow_params, labels, rng, sample_cfg) -> (tokens (B, T, D), info)
        info = {'jacobi_iters': (K, num_chunks)} with Jacobi decoding, else {}.
    sample_images(models, params, labels, rng, sample_cfg) -> images (B, H, W, C) in [-1, 1]
        params = {'vae', 'flow'}; no denoising step (SimFlow's decoder handles noisy latents).
    make_sample_fn(models, sample_cfg) -> fn(params, labels, rng) -> images
        jitted (one compile per batch shape); checks concrete labels before the call.

`sample_cfg` is `config.sample` (configs/base.py): temperature, guidance, guidance_rule,
guidance_schedule, guidance_blocks, jacobi, jacobi_chunk, jacobi_threshold, jacobi_max_iters.

Guidance 0 never builds a guide: every block gets None and runs the unguided single
batch, so guidance 0 is exactly the unguided sampler. Blocks without class conditioning
(flow.cond_blocks='deep') are never guided either: both streams would be identical.
"""
import copy
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simflow_jax.models import flow as flow_lib
from simflow_jax.models import vae as vae_lib

GUIDANCE_RULES = ("linear", "linear_shift", "gaussian")
GUIDANCE_SCHEDULES = ("constant", "anneal")
GUIDANCE_BLOCKS = ("all", "deep")
_REL_EPS = 1e-6  # floor of the Jacobi change's denominator (all-zero chunks)

Guide = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"sample.{name}={value!r} is not one of {tuple(allowed)}.")


# ------------------------------------------------------------------------------------
# Classifier-free guidance.
# ------------------------------------------------------------------------------------
def make_guide(rule: str, weight: float, schedule: str, seq_len: int) -> Guide:
  """Returns guide(log_sigma (2B, D), b (2B, D), t) -> (log_sigma (B, D), b (B, D)).

  The first half of the batch is the conditional stream (c), the second the null
  class (u); a = log_sigma. With w_t = w (constant) or w (t + 1) / seq_len (anneal):
    linear        a = a_c + w_t (a_c - a_u),  b = b_c + w_t (b_c - b_u)       (TarFlow)
    linear_shift  a = a_c,                    b = b_c + w_t (b_c - b_u)
    gaussian      s = min(sigma_c / sigma_u, 1)^2,  sigma = sigma_c / sqrt(1 + w_t - w_t s),
                  b = ((1 + w_t) b_c - w_t s b_u) / (1 + w_t - w_t s)          (STARFlow)
  The gaussian rule is the normalised product N(b_c, sigma_c^2)^(1+w) / N(b_u, sigma_u^2)^w
  (s clipped at 1 keeps its precision positive); at w = 0 every rule returns (a_c, b_c)
  exactly.
  """
  _check_choice("guidance_rule", rule, GUIDANCE_RULES)
  _check_choice("guidance_schedule", schedule, GUIDANCE_SCHEDULES)
  if schedule == "anneal" and seq_len < 1:
    raise ValueError(f"the anneal schedule needs the sequence length, got seq_len={seq_len}.")
  weight = float(weight)

  def guide(log_sigma, b, t):
    if log_sigma.shape[0] % 2:
      raise ValueError(f"guidance needs a doubled batch [conditional; null], got {log_sigma.shape[0]} rows.")
    a_c, a_u = jnp.split(log_sigma, 2)
    b_c, b_u = jnp.split(b, 2)
    w = weight
    if schedule == "anneal":
      w = weight * (jnp.asarray(t, jnp.float32) + 1.0) / seq_len
    if rule == "linear":
      return a_c + w * (a_c - a_u), b_c + w * (b_c - b_u)
    if rule == "linear_shift":
      return a_c, b_c + w * (b_c - b_u)
    s = jnp.exp(2.0 * jnp.minimum(a_c - a_u, 0.0))  # min(sigma_c / sigma_u, 1)^2
    denom = 1.0 + w - w * s                          # >= 1 for w >= 0
    return a_c - 0.5 * jnp.log(denom), ((1.0 + w) * b_c - w * s * b_u) / denom

  return guide


def guide_for_block(flow: flow_lib.Flow, sample_cfg) -> Callable[[int], Optional[Guide]]:
  """k -> the guide for flow block k, or None (unguided). None everywhere when
  sample_cfg.guidance == 0; with guidance_blocks='deep' only block K-1 (the first to run
  when sampling) is guided; blocks without class conditioning are never guided."""
  weight = float(sample_cfg.guidance)
  if weight < 0:
    raise ValueError(f"sample.guidance must be >= 0 (0 = no guidance), got {weight}.")
  _check_choice("guidance_rule", sample_cfg.guidance_rule, GUIDANCE_RULES)
  _check_choice("guidance_schedule", sample_cfg.guidance_schedule, GUIDANCE_SCHEDULES)
  _check_choice("guidance_blocks", sample_cfg.guidance_blocks, GUIDANCE_BLOCKS)
  if weight == 0:
    return lambda k: None
  if flow.cond == "none":
    raise ValueError("sample.guidance > 0 needs a class-conditional flow (flow.cond='none' here): "
                     "set sample.guidance=0.")
  guide = make_guide(sample_cfg.guidance_rule, weight, sample_cfg.guidance_schedule, flow.seq_len)
  deep_only = sample_cfg.guidance_blocks == "deep"

  def for_block(k: int) -> Optional[Guide]:
    if deep_only and k != flow.num_blocks - 1:
      return None
    return None if flow.block_cond(k) == "none" else guide

  return for_block


def _doubled_labels(labels, num_classes: int, guide: Optional[Guide]):
  """With guidance the batch is [conditional; null class]."""
  if guide is None:
    return labels
  return jnp.concatenate([labels, jnp.full_like(labels, num_classes)])


# ------------------------------------------------------------------------------------
# Jacobi decoding.
# ------------------------------------------------------------------------------------
def invert_block_jacobi(flow: flow_lib.Flow, params, k: int, z_blk, labels, guide: Optional[Guide] = None,
                        chunk: int = 0, threshold: float = 1e-3, max_iters: int = 0):
  """Inverts block k by fixed-point (Jacobi) iteration, chunk by chunk.

  z_blk (B, T, D) in block order -> (x_blk (B, T, D) in block order, iters (num_chunks,)).
  Chunks are `chunk` consecutive tokens (0 = the whole sequence; the last chunk may be
  shorter). Within a chunk, every iteration runs one dense causal pass over the current
  full sequence (earlier chunks final; the chunk and later tokens hold the current guess,
  and by causality later tokens do not matter) and sets the chunk to z * exp(log_sigma) + b.
  The guess starts at z (the identity flow's answer; a fresh flow is the identity).
  A chunk stops when the relative change max_b max|x_new - x| / max|x_new| (over the
  chunk, per example, then the worst example) is below `threshold`, or after `max_iters`
  iterations (0 = the chunk length). After j iterations the chunk's first j tokens are
  exact, so the chunk-length cap (also applied to larger max_iters) is exact decoding.
  `chunk` is static; `threshold` and `max_iters` may be traced (one compile serves all).
  """
  t_len = z_blk.shape[1]
  max_iters = jnp.asarray(max_iters, jnp.int32)
  chunk = t_len if chunk <= 0 else min(int(chunk), t_len)
  num_chunks = -(-t_len // chunk)
  z_blk = z_blk.astype(jnp.float32)
  lab = _doubled_labels(labels, flow.num_classes, guide)
  pos = jnp.arange(t_len)

  def fixed_point_map(x):
    feed = x if guide is None else jnp.concatenate([x, x])
    log_sigma, b = flow.apply({"params": params}, k, feed, lab, method=flow_lib.Flow.block_params)
    if guide is not None:  # per token: (2B, T, D) -> (B, T, D)
      log_sigma, b = jax.vmap(guide, in_axes=(1, 1, 0), out_axes=1)(log_sigma, b, pos)
    return z_blk * jnp.exp(log_sigma) + b

  def solve_chunk(x, i):
    start = i * chunk
    in_chunk = ((pos >= start) & (pos < start + chunk))[None, :, None]  # (1, T, 1)
    length = jnp.minimum(chunk, t_len - start)
    limit = jnp.where(max_iters > 0, jnp.minimum(max_iters, length), length)

    def cond(state):
      _, it, rel = state
      return (it < limit) & (rel >= threshold)

    def body(state):
      x, it, _ = state
      x_new = jnp.where(in_chunk, fixed_point_map(x), x)
      change = jnp.max(jnp.abs(x_new - x), axis=(1, 2))                      # (B,)
      scale = jnp.max(jnp.where(in_chunk, jnp.abs(x_new), 0.0), axis=(1, 2))  # (B,)
      return x_new, it + 1, jnp.max(change / jnp.maximum(scale, _REL_EPS))

    x, iters, _ = jax.lax.while_loop(cond, body, (x, jnp.int32(0), jnp.float32(jnp.inf)))
    return x, iters

  return jax.lax.scan(solve_chunk, z_blk, jnp.arange(num_chunks))


def inverse_jacobi(flow: flow_lib.Flow, params, z, labels, sample_cfg, guide_for_block=None):
  """z (B, T, D) -> (x (B, T, D), iters (K, num_chunks)), deep block first, like
  flow.inverse; reads sample_cfg.jacobi_chunk / jacobi_threshold / jacobi_max_iters."""
  x = z.astype(jnp.float32)
  iters = [None] * flow.num_blocks
  for k in reversed(range(flow.num_blocks)):
    guide = None if guide_for_block is None else guide_for_block(k)
    reverse = k % 2 == 1
    x_blk = jnp.flip(x, 1) if reverse else x
    x_blk, iters[k] = invert_block_jacobi(flow, params, k, x_blk, labels, guide,
                                          chunk=sample_cfg.jacobi_chunk,
                                          threshold=sample_cfg.jacobi_threshold,
                                          max_iters=sample_cfg.jacobi_max_iters)
    x = jnp.flip(x_blk, 1) if reverse else x_blk
  return x, jnp.stack(iters)


# ------------------------------------------------------------------------------------
# The sampler.
# ------------------------------------------------------------------------------------
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
  """labels (B,) int -> (tokens (B, T, D) float32, info). z ~ N(0, temperature^2 I),
  inverted with the cached scan, or by Jacobi iteration if sample_cfg.jacobi."""
  if sample_cfg.temperature <= 0:
    raise ValueError(f"sample.temperature must be > 0, got {sample_cfg.temperature}.")
  flow = models.flow
  labels = jnp.asarray(labels, jnp.int32)
  z = sample_cfg.temperature * jax.random.normal(rng, (labels.shape[0], *models.token_shape), jnp.float32)
  guides = guide_for_block(flow, sample_cfg)
  if sample_cfg.jacobi:
    tokens, iters = inverse_jacobi(flow, flow_params, z, labels, sample_cfg, guides)
    return tokens, {"jacobi_iters": iters}
  return flow_lib.inverse(flow, flow_params, z, labels, "cached", guides), {}


def sample_images(models, params, labels, rng, sample_cfg):
  """params {'vae', 'flow'} -> images (B, H, W, C) in [-1, 1] (decoder output clipped)."""
  tokens, _ = sample_tokens(models, params["flow"], labels, rng, sample_cfg)
  latents = models.to_latents(tokens)  # (B, h, w, c)
  images = models.vae.apply({"params": params["vae"]}, latents, method=vae_lib.VAE.decode)
  return jnp.clip(images, -1.0, 1.0)


def make_sample_fn(models, sample_cfg):
  """fn(params, labels, rng) -> images, jitted once per batch shape. A snapshot of
  sample_cfg is taken now (later edits do not apply); configuration errors raise here.
  Concrete, fully addressable labels are checked with check_labels before the call."""
  sample_cfg = copy.deepcopy(sample_cfg)
  guide_for_block(models.flow, sample_cfg)
  if sample_cfg.temperature <= 0:
    raise ValueError(f"sample.temperature must be > 0, got {sample_cfg.temperature}.")
  jitted = jax.jit(functools.partial(sample_images, models, sample_cfg=sample_cfg))

  def sample_fn(params, labels, rng):
    """params {'vae', 'flow'}, labels (B,) int, rng key -> images (B, H, W, C) in [-1, 1]."""
    concrete = not isinstance(labels, jax.core.Tracer)
    if concrete and (not isinstance(labels, jax.Array) or labels.is_fully_addressable):
      check_labels(labels, models.num_classes)
    return jitted(params, labels, rng)

  return sample_fn
