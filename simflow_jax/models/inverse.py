"""The flow's inverse (noise -> data): one block loop, and the per-block inverters beside it.

Blocks run deep block first (block K-1, next to the Gaussian), each in its own token
order (odd blocks reversed). Every block is inverted by one of
  cached     token by token, a KV cache carried through a lax.scan (T sequential steps),
             one scan per cache window (a token reads the finished prefix and its window);
  dense      T full causal passes, no cache (O(T^2) work: the reference);
  jacobi     fixed-point (Jacobi) iteration, chunk by chunk (STARFlow): each iteration
             decodes a whole chunk of tokens against the cache of the finished ones;
and `method` picks them: 'cached' | 'dense' | 'jacobi' for every block, or 'selective'
(GS-Jacobi, arXiv 2505.12849; selective Jacobi decoding, arXiv 2505.24791): the deep
block, whose tokens depend most on each other, cached, the shallow blocks by Jacobi.
Classifier-free guidance (models/guidance.py) runs each guided block on one doubled
batch [conditional; null] (2B, ...) whose two streams a guide combines.

Jacobi chunks hold `chunk` tokens (0 = the whole sequence); the last chunk is aligned to
the end of the sequence (it may overlap finished tokens, which stay fixed points). The
guess starts at the block's input z (a fresh block is the identity). A chunk stops when
the relative change max_b max|x_new - x| / max|x_new| (over the chunk, per example, then
the worst example) is below `threshold`, or after `max_iters` iterations (0 = the number
of new tokens in the chunk). After j iterations the chunk's first j new tokens are exact,
so the cap (also applied to larger max_iters) is exact decoding.

`cache_dtype` is what the KV cache stores (None: the flow's compute dtype). A bfloat16
cache halves the memory every decoded token reads; keys and values are rounded to 8
mantissa bits when written and computed with at the flow's dtype when read.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from simflow_jax.models import flow as flow_lib, layers
from simflow_jax.models.guidance import Guide

METHODS = ("cached", "dense", "jacobi", "selective")
_REL_EPS = 1e-6  # floor of the Jacobi change's denominator (all-zero chunks)


def unroll_layers(flow: flow_lib.Flow, params):
  """(flow, params) with the layers of every block unrolled (layer_0 .. layer_{L-1}), as
  decode mode needs: a scanned stack's parameters (L, ...) are sliced once, here."""
  if not flow.scan_layers:
    return flow, params

  def unstack(tree):
    if not isinstance(tree, dict):
      return tree
    if "transformer" in tree and "layers" in tree["transformer"]:
      stacked = tree["transformer"]["layers"]
      depth = jax.tree.leaves(stacked)[0].shape[0]
      tree = {**tree, "transformer": {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], stacked)
                                      for i in range(depth)}}
    return {name: unstack(sub) for name, sub in tree.items()}

  return flow.clone(scan_layers=False, remat=False), unstack(params)


KV_CACHE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def kv_cache_dtype(name: str):
  """config.sample.kv_cache_dtype -> the cache's dtype; a clear error for any other name."""
  if name not in KV_CACHE_DTYPES:
    raise ValueError(f"sample.kv_cache_dtype={name!r} is not one of {sorted(KV_CACHE_DTYPES)}.")
  return KV_CACHE_DTYPES[name]


def _block_fns(flow: flow_lib.Flow, params, k: int, labels, guide: Optional[Guide],
               cache_dtype=None):
  """Block k's affine parameters as functions of the tokens, guided if `guide` is given:
    decode(x_in (B, S, D), pos, cache) -> (log_sigma, b (B, S, D), cache)   (Flow.block_decode)
    dense(x (B, T, D)) -> (log_sigma, b (B, T, D))                          (Flow.block_params)
    cache(x, window) -> a zeroed cache for the (doubled when guided) batch of x (B, ...):
                        an empty prefix and `window` slots (layers.init_kv_cache)
    next_window(cache, x, window) -> the cache for the next window (layers.next_kv_window)
  Both fill the fresh slots with zeros computed from x, example by example (_zeros_after).
  """
  if guide is not None:  # the doubled batch [conditional; null class]
    labels = jnp.concatenate([labels, jnp.full_like(labels, flow.num_classes)])
  twice = (lambda x: x) if guide is None else (lambda x: jnp.concatenate([x, x]))
  combine = (lambda ls, b, pos: (ls, b)) if guide is None else guide
  apply = lambda method, *args: flow.apply({"params": params}, k, *args, method=method)

  def decode(x_in, pos, cache):
    log_sigma, b, cache = apply(flow_lib.Flow.block_decode, twice(x_in), pos, cache, labels)
    return (*combine(log_sigma, b, pos + jnp.arange(x_in.shape[1])), cache)

  def dense(x):
    return combine(*apply(flow_lib.Flow.block_params, twice(x), labels), jnp.arange(x.shape[1]))

  def cache(x, window):
    fill = twice(_zeros_after(x))  # (B,) or (2B,)
    return layers.init_kv_cache(flow.layers_per_block[k], fill.shape[0], window, flow.width,
                                flow.head_dim, cache_dtype or flow.dtype, fill)

  def next_window(kv, x, window):
    return layers.next_kv_window(kv, window, twice(_zeros_after(x)))

  return decode, dense, cache, next_window


def _chunks(t_len: int, chunk: int) -> tuple[int, int]:
  """(chunk length, number of chunks); chunk 0 or >= T is the whole sequence."""
  c = t_len if chunk <= 0 else min(int(chunk), t_len)
  return c, -(-t_len // c)


def _chunk_lengths(t_len: int, chunk: int) -> jax.Array:
  """New tokens per chunk, (num_chunks,) int32: the sequential steps a chunk costs."""
  c, n = _chunks(t_len, chunk)
  return jnp.asarray([min(c, t_len - j * c) for j in range(n)], jnp.int32)


def _zeros_after(x: jax.Array) -> jax.Array:
  """x (B, ...) -> (B,) float32 zeros computed from each example's first value. A cache
  filled with them cannot be allocated before x exists, so XLA reuses the memory freed by
  then (the previous block's cache, the previous window) instead of allocating every
  block's cache up front (4x the memory at four blocks); per example, so a batch-sharded
  sampler needs nothing from other devices."""
  v = x.reshape(x.shape[0], -1)[:, 0].astype(jnp.float32)
  return jnp.where(jnp.isfinite(v), v, 0.0) * 0.0


def window_bounds(t_len: int, windows: int, lag: int = 0) -> list[int]:
  """Token boundaries 0 = a_0 < a_1 < ... < a_n = T of min(windows, T) near-equal
  KV-cache windows. Window j decodes tokens [a_j, a_{j+1}) into cache slots
  [max(a_j - lag, 0), a_{j+1} - lag), so with lag 1 the first window holds two tokens
  or more."""
  assert windows >= 1, f"the sequential decoder needs at least one cache window, got {windows}"
  n = min(int(windows), t_len)
  bounds = sorted({round(j * t_len / n) for j in range(n + 1)})
  if lag and len(bounds) > 2 and bounds[1] < 2:
    bounds.pop(1)
  return bounds


def invert_block_cached(flow, params, k, z_blk, labels, guide=None, chunk=0, threshold=0.0,
                        max_iters=0, windows=8, cache_dtype=None):
  """Token by token with the KV cache as the scan carry (updated in place): one lax.scan
  per cache window, so a token attends to the finished prefix and its own window only."""
  del threshold, max_iters
  decode, _, new_cache, next_window = _block_fns(*unroll_layers(flow, params), k, labels, guide,
                                                 cache_dtype)
  bsz, t_len, d = z_blk.shape
  lag = flow.cache_lag

  def step(carry, inputs):
    x_prev, cache = carry
    z_t, t = inputs
    log_sigma, b, cache = decode(x_prev[:, None], t, cache)  # (B, 1, D)
    x_t = z_t * jnp.exp(log_sigma[:, 0]) + b[:, 0]
    return (x_t, cache), x_t

  bounds = window_bounds(t_len, windows, lag)
  x_prev, cache, pieces = jnp.zeros((bsz, d), jnp.float32), None, []
  for a, b in zip(bounds[:-1], bounds[1:]):
    slots = b - lag - max(a - lag, 0)
    cache = new_cache(z_blk, slots) if cache is None else next_window(cache, x_prev, slots)
    xs = (jnp.swapaxes(z_blk[:, a:b], 0, 1), jnp.arange(a, b))  # z: (b - a, B, D)
    (x_prev, cache), x = jax.lax.scan(step, (x_prev, cache), xs)
    pieces.append(x)
  return jnp.swapaxes(jnp.concatenate(pieces), 0, 1), _chunk_lengths(t_len, chunk)  # (B, T, D)


def invert_block_dense(flow, params, k, z_blk, labels, guide=None, chunk=0, threshold=0.0,
                       max_iters=0, windows=1, cache_dtype=None):
  """The reference: T full causal passes, token t set by pass t (no cache)."""
  del threshold, max_iters, windows, cache_dtype
  _, dense, _, _ = _block_fns(flow, params, k, labels, guide)

  def body(t, x):
    log_sigma, b = dense(x)
    return x.at[:, t].set(z_blk[:, t] * jnp.exp(log_sigma[:, t]) + b[:, t])

  x = jax.lax.fori_loop(0, z_blk.shape[1], body, jnp.zeros_like(z_blk))
  return x, _chunk_lengths(z_blk.shape[1], chunk)


def invert_block_jacobi(flow, params, k, z_blk, labels, guide=None, chunk=0, threshold=1e-3,
                        max_iters=0, windows=1, cache_dtype=None):
  """Jacobi iteration chunk by chunk; returns (x_blk, iterations per chunk (num_chunks,)).
  `chunk` is static; `threshold` and `max_iters` may be traced (one compile serves all).
  The cache is one window of all T slots (the chunk loop is a lax.scan)."""
  del windows
  decode, _, new_cache, _ = _block_fns(*unroll_layers(flow, params), k, labels, guide, cache_dtype)
  t_len = z_blk.shape[1]
  c, num_chunks = _chunks(t_len, chunk)
  max_iters = jnp.asarray(max_iters, jnp.int32)

  def solve_chunk(carry, j):
    x, cache = carry  # x (B, T, D): final before the chunk, the guess (z) after it
    first = j * c
    start = jnp.minimum(first, t_len - c)  # the last chunk ends at T
    new = jnp.minimum(c, t_len - first)
    limit = jnp.where(max_iters > 0, jnp.minimum(max_iters, new), new)
    z_c = jax.lax.dynamic_slice_in_dim(z_blk, start, c, axis=1)                    # (B, C, D)
    x_before = jax.lax.dynamic_slice_in_dim(x, jnp.maximum(start - 1, 0), 1, axis=1)  # (B, 1, D)

    def cond(state):
      _, _, it, rel = state
      return (it < limit) & (rel >= threshold)

    def body(state):
      x_c, cache, it, _ = state
      log_sigma, b, cache = decode(jnp.concatenate([x_before, x_c[:, :-1]], axis=1), start, cache)
      x_new = z_c * jnp.exp(log_sigma) + b
      change = jnp.max(jnp.abs(x_new - x_c), axis=(1, 2))  # (B,)
      scale = jnp.max(jnp.abs(x_new), axis=(1, 2))          # (B,)
      return x_new, cache, it + 1, jnp.max(change / jnp.maximum(scale, _REL_EPS))

    x_c = jax.lax.dynamic_slice_in_dim(x, start, c, axis=1)
    x_c, cache, iters, _ = jax.lax.while_loop(
        cond, body, (x_c, cache, jnp.int32(0), jnp.float32(jnp.inf)))
    return (jax.lax.dynamic_update_slice_in_dim(x, x_c, start, axis=1), cache), iters

  (x, _), iters = jax.lax.scan(solve_chunk, (z_blk.astype(jnp.float32), new_cache(z_blk, t_len)),
                               jnp.arange(num_chunks))
  return x, iters


_INVERTERS = {"cached": invert_block_cached, "dense": invert_block_dense, "jacobi": invert_block_jacobi}


def block_method(flow: flow_lib.Flow, method: str, k: int) -> str:
  """The inverter block k uses under `method` ('selective': the deep block cached, others Jacobi)."""
  assert method in METHODS, f"inverse method {method!r} is not one of {METHODS}"
  if method == "selective":
    return "cached" if k == flow.num_blocks - 1 else "jacobi"
  return method


def inverse(flow: flow_lib.Flow, params, z, labels, method: str = "cached",
            guides: Optional[Sequence[Optional[Guide]]] = None, *, chunk: int = 0,
            threshold=1e-3, max_iters=0, windows: int = 8, cache_dtype=None):
  """z (B, T, D) standard normal -> (x (B, T, D) float32, steps (K, num_chunks) int32).

  guides[k] is block k's guide or None (models/guidance.py: block_guides); None = unguided.
  steps[k] counts what each chunk of block k cost: Jacobi iterations, or for a block
  decoded token by token its new tokens (the sequential steps). `chunk`, `threshold`
  and `max_iters` act on the Jacobi blocks (see the module docstring); `windows` (static,
  >= 1) splits a sequentially decoded block's token loop into that many KV-cache windows
  (invert_block_cached): more windows read less of the cache per token and compile more
  loop bodies; the result is the same for any number. `cache_dtype`: the KV cache's dtype
  (None: the flow's dtype; module docstring).
  """
  x = flow.apply({"params": params}, z.astype(jnp.float32), method=flow_lib.Flow.from_prior)
  steps = [None] * flow.num_blocks
  for k in reversed(range(flow.num_blocks)):
    guide = None if guides is None else guides[k]
    reverse = k % 2 == 1
    x = jnp.flip(x, 1) if reverse else x
    x, steps[k] = _INVERTERS[block_method(flow, method, k)](
        flow, params, k, x, labels, guide, chunk, threshold, max_iters, windows, cache_dtype)
    x = jnp.flip(x, 1) if reverse else x
  return x, jnp.stack(steps)
