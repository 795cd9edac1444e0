"""Tests for simflow_jax.models.repa: projector, alignment loss, token matching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simflow_jax.models import repa


def test_projector_names_shapes_and_values():
  shapes = jax.eval_shape(repa.Projector().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((2, 5, 96), jnp.float32))["params"]
  assert {k: v["kernel"].shape for k, v in shapes.items()} == {
      "fc1": (96, 2048), "fc2": (2048, 2048), "fc3": (2048, 768)}
  model = repa.Projector(hidden=16, out_dim=8)
  x = jax.random.normal(jax.random.key(1), (2, 5, 12))
  params = model.init(jax.random.key(0), x)["params"]
  p = jax.tree.map(np.asarray, params)
  silu = lambda v: v / (1 + np.exp(-v))
  h = silu(np.asarray(x) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  h = silu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  want = h @ p["fc3"]["kernel"] + p["fc3"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_alignment_loss_known_values():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 10, 32)).astype(np.float32)
  scales = rng.uniform(0.1, 10.0, size=(3, 10, 1)).astype(np.float32)
  np.testing.assert_allclose(repa.alignment_loss(a, a), -np.ones(3), atol=1e-6)
  np.testing.assert_allclose(repa.alignment_loss(a * scales, a), -np.ones(3), atol=1e-6)
  np.testing.assert_allclose(repa.alignment_loss(-a, a), np.ones(3), atol=1e-6)
  half = np.concatenate([a[:, :5], -a[:, 5:]], axis=1)  # half aligned, half opposite
  np.testing.assert_allclose(repa.alignment_loss(half, a), np.zeros(3), atol=1e-6)
  orth = np.zeros((1, 1, 4), np.float32)
  np.testing.assert_allclose(repa.alignment_loss(orth + [[[1, 1, 0, 0]]], orth + [[[1, 0, 0, 0]]]),
                             [-np.sqrt(0.5)], atol=1e-6)
  big = rng.normal(size=(2, 256, 4096)).astype(np.float32)
  other = rng.normal(size=(2, 256, 4096)).astype(np.float32)
  assert np.all(np.abs(repa.alignment_loss(big, other)) < 0.01)  # std of the mean ~ 1e-3
  assert repa.alignment_loss(jnp.asarray(a, jnp.bfloat16), a).dtype == jnp.float32


def test_alignment_loss_zero_vector_is_finite_and_shapes_checked():
  x = jnp.zeros((1, 2, 8))
  grad = jax.grad(lambda p: repa.alignment_loss(p, jnp.ones((1, 2, 8))).sum())(x)
  assert np.all(np.isfinite(grad)) and repa.alignment_loss(x, jnp.ones((1, 2, 8)))[0] == 0.0
  with pytest.raises(ValueError, match="one shape"):
    repa.alignment_loss(jnp.zeros((1, 4, 8)), jnp.zeros((1, 4, 9)))


def test_match_tokens_exact_average_pool():
  # token (i, j) of a 32x32 raster grid holds the value 32 i + j (and its negative in channel 1)
  vals = np.arange(1024, dtype=np.float32)
  hidden = jnp.asarray(np.stack([vals, -vals], axis=-1)[None])  # (1, 1024, 2)
  out = np.asarray(repa.match_tokens(hidden, (32, 32), (16, 16)))
  assert out.shape == (1, 256, 2)
  a, b = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  want = (64 * a + 2 * b + 16.5).reshape(-1)  # mean of 32(2a)+2b, +1, 32(2a+1)+2b, +1
  np.testing.assert_array_equal(out[0, :, 0], want)
  np.testing.assert_array_equal(out[0, :, 1], -want)
  rect = np.asarray(repa.match_tokens(hidden, (32, 32), (8, 16)))  # 4x2 windows
  np.testing.assert_array_equal(rect[0, 0, 0], np.mean([0, 1, 32, 33, 64, 65, 96, 97]))


def test_match_tokens_identity_resize_and_errors():
  x = jax.random.normal(jax.random.key(0), (2, 256, 6))
  assert repa.match_tokens(x, (16, 16), (16, 16)) is x
  const = jnp.full((2, 64, 6), 3.0)
  up = repa.match_tokens(const, (8, 8), (16, 16))  # coarser flow grid: bilinear upsample
  assert up.shape == (2, 256, 6)
  np.testing.assert_allclose(up, 3.0, rtol=1e-6)
  # 2x nearest-duplicated tokens pool back to the original exactly
  coarse = jax.random.normal(jax.random.key(1), (2, 8, 8, 6))
  fine = jnp.repeat(jnp.repeat(coarse, 2, axis=1), 2, axis=2).reshape(2, 256, 6)
  np.testing.assert_allclose(repa.match_tokens(fine, (16, 16), (8, 8)), coarse.reshape(2, 64, 6),
                             rtol=1e-6)
  assert repa.match_tokens(jnp.zeros((2, 24 * 24, 6)), (24, 24), (16, 16)).shape == (2, 256, 6)
  with pytest.raises(ValueError, match="do not form the flow grid"):
    repa.match_tokens(jnp.zeros((2, 100, 6)), (16, 16), (16, 16))
