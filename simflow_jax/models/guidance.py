"""Classifier-free guidance rules for the flow's inverse.

Guidance runs the block on a doubled batch [conditional; null class] (2B, ...) and a
guide combines the two streams' affine parameters into one (B, ...):
  guide(log_sigma (2B, S, D), b (2B, S, D), pos (S,)) -> (log_sigma, b) (B, S, D)
where pos are the tokens' block-order positions (the anneal schedule reads them).
Which blocks are guided is decided once per flow (block_guides): guidance 0 builds no
guide at all, so it is exactly the unguided sampler. Choices are validated by
models/build.py:validate_config; here they are only asserted.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

RULES = ("linear", "linear_shift", "gaussian")
SCHEDULES = ("constant", "anneal")
BLOCKS = ("all", "deep")

Guide = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def make_guide(rule: str, weight: float, schedule: str, seq_len: int) -> Guide:
  """The guide of `rule` at weight w. With a = log_sigma, c the conditional and u the
  null stream, and w_t = w (constant) or w (t + 1) / seq_len (anneal):
    linear        a = a_c + w_t (a_c - a_u),  b = b_c + w_t (b_c - b_u)       (TarFlow)
    linear_shift  a = a_c,                    b = b_c + w_t (b_c - b_u)
    gaussian      s = min(sigma_c / sigma_u, 1)^2,  sigma = sigma_c / sqrt(1 + w_t - w_t s),
                  b = ((1 + w_t) b_c - w_t s b_u) / (1 + w_t - w_t s)          (STARFlow)
  The gaussian rule is the normalised product N(b_c, sigma_c^2)^(1+w) / N(b_u, sigma_u^2)^w
  (s clipped at 1 keeps its precision positive); at w = 0 every rule returns (a_c, b_c)
  exactly.
  """
  assert rule in RULES and schedule in SCHEDULES, (rule, schedule)
  weight = float(weight)

  def guide(log_sigma, b, pos):
    a_c, a_u = jnp.split(log_sigma, 2)
    b_c, b_u = jnp.split(b, 2)
    w = weight
    if schedule == "anneal":  # (S,) -> (1, S, 1)
      w = weight * (jnp.asarray(pos, jnp.float32)[None, :, None] + 1.0) / seq_len
    if rule == "linear":
      return a_c + w * (a_c - a_u), b_c + w * (b_c - b_u)
    if rule == "linear_shift":
      return a_c, b_c + w * (b_c - b_u)
    s = jnp.exp(2.0 * jnp.minimum(a_c - a_u, 0.0))  # min(sigma_c / sigma_u, 1)^2
    denom = 1.0 + w - w * s                          # >= 1 for w >= 0
    return a_c - 0.5 * jnp.log(denom), ((1.0 + w) * b_c - w * s * b_u) / denom

  return guide


def block_guides(flow, weight: float, rule: str = "linear", schedule: str = "constant",
                 blocks: str = "all") -> tuple[Optional[Guide], ...]:
  """One guide or None per flow block (index k). None everywhere at weight 0; with
  blocks='deep' only block K-1 (the first to run when sampling) is guided; blocks
  without class conditioning are never guided (both streams would be identical)."""
  assert weight >= 0 and blocks in BLOCKS, (weight, blocks)
  if weight == 0:
    return (None,) * flow.num_blocks
  assert flow.cond != "none", "guidance needs a class-conditional flow"
  guide = make_guide(rule, weight, schedule, flow.seq_len)
  deep = flow.num_blocks - 1
  return tuple(None if (blocks == "deep" and k != deep) or flow.block_cond(k) == "none" else guide
               for k in range(flow.num_blocks))


def guides_from_config(flow, sample_cfg) -> tuple[Optional[Guide], ...]:
  """block_guides for config.sample (guidance, guidance_rule, guidance_schedule, guidance_blocks)."""
  return block_guides(flow, float(sample_cfg.guidance), sample_cfg.guidance_rule,
                      sample_cfg.guidance_schedule, sample_cfg.guidance_blocks)
