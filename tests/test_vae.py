"""Tests for simflow_jax.models.vae: shapes, posterior statistics, config building, learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.base import get_base_config
from simflow_jax.models.vae import PRESETS, VAE, Posterior, sample_latents

KEY = jax.random.key(0)


def _init(vae, images):
  return vae.init(KEY, images, jax.random.key(1))


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n != "f16d64"))
@pytest.mark.parametrize("posterior", ["fixed", "learned"])
def test_small_preset_shapes(name, posterior):
  vae = VAE(**PRESETS[name], out_channels=3, posterior=posterior)
  f, z = vae.downsample_factor, PRESETS[name]["z_channels"]
  assert f == int(name[1:name.index("d")]) and z == int(name[name.index("d") + 1:])
  images = jnp.zeros((2, 16, 16, 3))
  params = jax.eval_shape(lambda x: _init(vae, x), images)
  assert set(params["params"]) == {"encoder", "decoder"}
  recon, post, latents = jax.eval_shape(lambda p: vae.apply(p, images, jax.random.key(2)), params)
  assert post.mu.shape == latents.shape == (2, 16 // f, 16 // f, z)
  assert (post.logvar is None) == (posterior == "fixed")
  assert recon.shape == images.shape and recon.dtype == jnp.float32


def test_paper_preset_shapes_eval_shape_only():
  vae = VAE(**PRESETS["f16d64"], out_channels=3)
  images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(lambda x: _init(vae, x), images)
  recon, post, latents = jax.eval_shape(
      lambda p, x: vae.apply(p, x, jax.random.key(2)), params, images)
  assert post.mu.shape == latents.shape == (1, 16, 16, 64) and post.logvar is None
  assert recon.shape == (1, 256, 256, 3)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  assert 60e6 < n_params < 70e6, n_params  # 64.7M: encoder 26.3M, decoder 38.4M


def _draws(mu, logvar, sigma_bar, n=20000):
  """n posterior draws in one call: the posterior broadcast to (n, *mu.shape)."""
  tile = lambda a: None if a is None else jnp.broadcast_to(a, (n, *a.shape))
  return sample_latents(Posterior(tile(mu), tile(logvar)), jax.random.key(3), sigma_bar)


def test_fixed_posterior_latent_statistics():
  mu = jax.random.normal(KEY, (2, 4, 4, 4)) * 3.0
  draws = _draws(mu, None, 0.5)  # (N, 2, 4, 4, 4)
  # Per element: standard errors 0.5/sqrt(N) = 0.0035 (mean), ~0.0025 (std); 6 sigma tolerance.
  np.testing.assert_allclose(draws.mean(0), mu, atol=0.021)
  np.testing.assert_allclose(draws.std(0), 0.5, atol=0.015)
  # Pooled over all 2.56M draws the standard error of the std is ~0.0002.
  assert abs(float(jnp.std((draws - mu) / 0.5)) - 1.0) < 2e-3


def test_learned_posterior_std():
  mu = jax.random.normal(KEY, (2, 4, 4, 4))
  logvar = jax.random.uniform(jax.random.key(1), mu.shape, minval=-6.0, maxval=2.0)
  std = jnp.exp(0.5 * logvar)
  draws = _draws(mu, logvar, 0.5)  # sigma_bar is ignored when logvar is given
  # Relative standard errors: 1/sqrt(N) = 0.007 (mean / std), 1/sqrt(2N) = 0.005 (std).
  np.testing.assert_allclose(draws.std(0) / std, 1.0, atol=0.03)
  np.testing.assert_allclose((draws.mean(0) - mu) / std, 0.0, atol=0.045)
  # The model in learned mode predicts both (encoder width 2 * z_channels).
  vae = VAE(**PRESETS["f2d4"], out_channels=1, posterior="learned")
  post, variables = jax.eval_shape(
      lambda x: vae.init_with_output(KEY, x, method=VAE.encode), jnp.zeros((2, 8, 8, 1)))
  assert post.mu.shape == post.logvar.shape == (2, 4, 4, 4)
  assert variables["params"]["encoder"]["conv_out"]["kernel"].shape[-1] == 8


def test_sampling_is_differentiable_in_mu():
  grad = jax.grad(lambda m: sample_latents(Posterior(m, None), KEY, 0.5).sum())(jnp.ones((1, 2, 2, 3)))
  np.testing.assert_array_equal(grad, 1.0)


@pytest.fixture(scope="module")
def tiny():
  """One initialised f2d4 model shared by the tests below (its params fit every fixed mode)."""
  vae = VAE(**PRESETS["f2d4"], out_channels=1)
  yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, 8), jnp.linspace(-1, 1, 8), indexing="ij")
  images = jnp.stack([jnp.sin(3 * xx), jnp.cos(2 * yy), xx * yy, xx])[..., None]  # (4, 8, 8, 1)
  return vae, jax.jit(vae.init)(KEY, images, KEY)["params"], images


def test_fixed_ln_mu_is_normalised_over_channels(tiny):
  _, params, images = tiny
  vae = VAE(**PRESETS["f2d4"], out_channels=1, posterior="fixed_ln")
  post = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=VAE.encode))(params, images)
  assert post.logvar is None
  np.testing.assert_allclose(post.mu.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(post.mu.var(-1), 1.0, atol=1e-3)


def test_encode_decode_round_trip_and_bfloat16(tiny):
  _, params, images = tiny
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  vae = VAE(**PRESETS["f2d4"], out_channels=1, dtype=jnp.bfloat16)

  @jax.jit
  def round_trip(p, x):
    post = vae.apply({"params": p}, x, method=VAE.encode)
    return post, vae.apply({"params": p}, sample_latents(post, KEY, 0.5), method=VAE.decode)

  post, out = round_trip(params, images)
  assert post.mu.shape == (4, 4, 4, 4) and post.mu.dtype == jnp.float32
  assert out.shape == images.shape and out.dtype == jnp.float32


def test_bad_inputs_raise():
  vae = VAE(**PRESETS["f4d4"], out_channels=1)
  with pytest.raises(ValueError, match="divisible by f=4"):
    _init(vae, jnp.zeros((1, 10, 10, 1)))
  with pytest.raises(ValueError, match="posterior"):
    _init(VAE(**PRESETS["f4d4"], out_channels=1, posterior="gaussian"), jnp.zeros((1, 8, 8, 1)))


def test_from_config():
  cfg = get_base_config().vae
  vae = VAE.from_config(cfg, image_channels=1)
  assert (vae.ch, vae.ch_mult, vae.z_channels, vae.posterior, vae.sigma_bar, vae.dtype) == (
      cfg.ch, tuple(cfg.ch_mult), cfg.z_channels, cfg.posterior, cfg.sigma_bar, jnp.float32)
  images = jnp.zeros((2, 32, 32, 1))
  recon, post, _ = jax.eval_shape(lambda: vae.init_with_output(KEY, images, KEY)[0])
  assert recon.shape == images.shape and post.mu.shape == (2, 8, 8, cfg.z_channels)


@pytest.mark.slow
def test_a_few_steps_reduce_reconstruction_l1(tiny):
  vae, params, images = tiny
  opt = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      recon, _, _ = vae.apply({"params": p}, images, rng)
      return jnp.mean(jnp.abs(recon - images))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = opt.init(params)
  losses = []
  for rng in jax.random.split(jax.random.key(4), 60):
    params, opt_state, loss = step(params, opt_state, rng)
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5]), losses  # a real fit, not noise
