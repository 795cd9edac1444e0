"""sample.kv_cache_dtype: a bfloat16 KV cache halves the cache and changes samples by no more
than its rounding allows (models/inverse.py, sample.py).

The bound: bfloat16 keeps 8 significant bits, so every stored key and value is off by at
most 2^-9 relative (round to nearest). A query's logits q.k then move by at most
2^-9 |q||k| (a few 1e-3 at these scales), the softmax weights by about as much relative,
and the attention output, a convex mix of values each off by 2^-9, by ~1e-2 relative at
worst; the token's affine parameters (log_sigma, b) inherit that through the output
projection and the MLP. The inverse x_t = z_t exp(log_sigma_t) + b_t feeds every token
into the later ones, which on a small, mildly perturbed flow (12 tokens, 3 layers, weights
N(0, 0.1) around init) does not amplify errors by more than a small factor: the final
tokens stay within 2e-2 of the float32 cache's, relative to their largest magnitude
(measured: ~4e-4), and differ from them at all (the cache really is rounded).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from simflow_jax import sample as S
from simflow_jax.models import flow as F
from simflow_jax.models import inverse as I

T, D, NCLS = 12, 4, 3
BOUND = 2e-2


def _flow():
  return F.Flow(seq_len=T, token_dim=D, width=32, layers_per_block=(1, 2), head_dim=16,
                cond="adaln", num_classes=NCLS)


def _perturbed(flow, seed=0, std=0.1):
  init = jax.jit(lambda key: flow.init(key, jnp.zeros((1, T, D)), jnp.zeros((1,), jnp.int32)))
  leaves, tree = jax.tree.flatten(init(jax.random.key(seed, impl="rbg"))["params"])
  rng = np.random.default_rng(seed + 1)
  return jax.tree.unflatten(tree, [l + std * rng.standard_normal(l.shape).astype(np.float32)
                                   for l in leaves])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _inverse(flow, method, cache_dtype, params, z, labels):
  return I.inverse(flow, params, z, labels, method, chunk=4, threshold=0.0, windows=3,
                   cache_dtype=cache_dtype)[0]


@pytest.mark.parametrize("method", ["cached", pytest.param("jacobi", marks=pytest.mark.slow)])
def test_bfloat16_cache_error_is_within_its_rounding_bound(method):
  flow = _flow()
  params = _perturbed(flow)
  z = jax.random.normal(jax.random.key(1), (4, T, D))
  labels = jnp.array([0, 1, 2, 0], jnp.int32)
  exact = np.asarray(_inverse(flow, method, jnp.float32, params, z, labels))
  rounded = np.asarray(_inverse(flow, method, jnp.bfloat16, params, z, labels))
  assert np.all(np.isfinite(rounded))
  rel = np.max(np.abs(rounded - exact)) / np.max(np.abs(exact))
  assert 0 < rel < BOUND, rel


def test_bfloat16_halves_the_cache():
  """The cache the sequential decoder allocates and carries (shapes only: nothing runs)."""
  flow = F.Flow(seq_len=64, token_dim=4, width=64, layers_per_block=(2,), head_dim=16,
                cond="add", num_classes=NCLS)
  params = jax.eval_shape(flow.init, jax.random.key(0), jnp.zeros((1, 64, 4)),
                          jnp.zeros((1,), jnp.int32))["params"]
  x = jax.ShapeDtypeStruct((256, 64, 4), jnp.float32)
  labels = jnp.zeros((256,), jnp.int32)

  def cache_bytes(dtype):
    def cache(p, x):
      return I._block_fns(*I.unroll_layers(flow, p), 0, labels, None, dtype)[2](x, 64)
    cache = jax.eval_shape(cache, params, x)
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache))

  f32 = 2 * 2 * 256 * 64 * 64 * 4  # 2 layers x (k, v) x (B, H, window, Dh) float32: 16 MiB
  assert cache_bytes(None) == cache_bytes(jnp.float32) == f32
  assert cache_bytes(jnp.bfloat16) == f32 // 2


def test_kv_cache_dtype_config():
  cfg = base.get_base_config()
  assert cfg.sample.kv_cache_dtype == "float32"
  assert I.kv_cache_dtype("bfloat16") == jnp.bfloat16
  sample_cfg = cfg.sample.copy_and_resolve_references()
  sample_cfg.kv_cache_dtype = "float16"
  with pytest.raises(ValueError, match="kv_cache_dtype"):
    S.make_sample_fn(None, sample_cfg)
