"""Exact latent likelihood: brute-force Jacobian, identity-flow known answers, masking, --mode=likelihood."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from simflow_jax import checkpoint, losses
from simflow_jax.commands import likelihood as likelihood_cmd
from simflow_jax.evals import likelihood
from simflow_jax.data import pipeline
from simflow_jax.models import build
from simflow_jax.models import flow as flow_lib
from simflow_jax.models import vae as vae_lib


@pytest.fixture(scope="module")
def trained(tiny_trained):
  config = tiny.get_config()
  models = build.build_models(config)
  return config, tiny_trained, models, checkpoint.load_params(tiny_trained, config)


def _eval_images(config, n):
  batch = next(pipeline.make_eval_loader(config.data, config.data.eval_split, n, num_examples=n))
  return jnp.asarray(batch["image"]), jnp.asarray(batch["label"])


def _mu(models, params, images):
  return models.vae.apply({"params": params["vae"]}, images, method=vae_lib.VAE.encode).mu


def test_bits_per_dim_is_exact_against_a_brute_force_jacobian(trained):
  config, _, models, params = trained
  images, labels = _eval_images(config, 1)
  x = models.to_tokens(_mu(models, params, images)).reshape(-1)  # (N,) = (T * D,)
  t_len, d = models.token_shape
  n = t_len * d

  def f(flat):  # (N,) -> (N,): the data -> noise map
    z, _ = flow_lib.forward(models.flow, params["flow"], flat.reshape(1, t_len, d), labels)
    return z.reshape(-1)

  _, logdet = np.linalg.slogdet(np.asarray(jax.jit(jax.jacfwd(f))(x), np.float64))  # (N, N)
  z = np.asarray(f(x), np.float64)
  nll = 0.5 * np.sum(z * z) + 0.5 * n * math.log(2 * math.pi) - logdet
  got = likelihood.latent_bits_per_dim(models, params, images, labels, jax.random.key(0), True)
  np.testing.assert_allclose(float(got[0]), nll / (n * math.log(2)), rtol=1e-5)


def test_split_mean_counts_every_example_once(trained):
  config, _, models, params = trained
  n = 13  # batch 8: the second batch holds 3 padding examples, masked out
  out = likelihood.split_bits_per_dim(config, models, params, num_examples=n)
  assert out["num_examples"] == n and out["dims_per_example"] == 256
  images, labels = _eval_images(config, n)
  z, logdet, _ = models.flow.apply({"params": params["flow"]},
                                models.to_tokens(_mu(models, params, images)), labels)
  direct = losses.bits_per_dim(losses.flow_nll(z, logdet), 256)  # (13,)
  np.testing.assert_allclose(out["bits_per_dim_mu"], float(np.mean(direct)), rtol=1e-5)


def test_identity_flow_known_answers(trained):
  """With proj_out zeroed the flow is the identity: log p(x) = log N(x; 0, I) exactly, so
  bits/dim of mu is closed form, and the sampled latents add sigma^2 / (2 ln 2) per dim
  in expectation; the posterior entropy is 0.5 log2(2 pi e sigma^2)."""
  config, _, models, params = trained
  zero = jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if "proj_out" in jax.tree_util.keystr(p) else v, params["flow"])
  ident = {**params, "flow": zero}
  n = 64
  out = likelihood.split_bits_per_dim(config, models, ident, num_examples=n)
  images, _ = _eval_images(config, n)
  mu = np.asarray(_mu(models, params, images), np.float64).reshape(n, -1)
  dims = mu.shape[1]
  closed = (0.5 * np.sum(mu * mu, 1) + 0.5 * dims * math.log(2 * math.pi)) / (dims * math.log(2))
  np.testing.assert_allclose(out["bits_per_dim_mu"], closed.mean(), rtol=1e-5)
  sigma = config.vae.sigma_bar
  assert out["bits_per_dim_sampled"] - out["bits_per_dim_mu"] == pytest.approx(
      sigma ** 2 / (2 * math.log(2)), abs=0.02)
  assert out["posterior_entropy_bits_per_dim"] == pytest.approx(
      0.5 * math.log2(2 * math.pi * math.e * sigma ** 2), rel=1e-6)


def test_sampled_latents_depend_on_rng_and_mean_does_not(trained):
  config, _, models, params = trained
  images, labels = _eval_images(config, 8)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  mu1 = likelihood.latent_bits_per_dim(models, params, images, labels, k1, True)
  mu2 = likelihood.latent_bits_per_dim(models, params, images, labels, k2, True)
  s1 = likelihood.latent_bits_per_dim(models, params, images, labels, k1, False)
  s2 = likelihood.latent_bits_per_dim(models, params, images, labels, k2, False)
  np.testing.assert_array_equal(mu1, mu2)
  assert float(jnp.max(jnp.abs(s1 - s2))) > 1e-3
  assert float(jnp.min(jnp.abs(s1 - mu1))) > 1e-4


@pytest.mark.slow
def test_run_writes_json(trained):
  config, workdir, _, _ = trained
  report = likelihood_cmd.run(config, workdir)
  assert set(report) == {"likelihood"}  # the one evaluator of type likelihood of configs/base.py
  out = report["likelihood"]
  with open(os.path.join(workdir, "likelihood.json")) as f:
    everything = json.load(f)
  saved = everything["likelihood"]
  assert out["num_examples"] == config.data.num_val == saved["num_examples"]
  for key in ("bits_per_dim_mu", "bits_per_dim_sampled", "posterior_entropy_bits_per_dim",
              "kl_bits_per_dim"):
    assert np.isfinite(saved[key]) and saved[key] == pytest.approx(out[key])
  assert saved["bits_per_dim_mu"] != saved["bits_per_dim_sampled"]
  assert everything["notes"]["elbo_relevant"] == "bits_per_dim_sampled"
  assert "true class" in everything["notes"]["labels"]
  again = likelihood_cmd.run(config, workdir)["likelihood"]
  assert again["bits_per_dim_sampled"] == out["bits_per_dim_sampled"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    likelihood_cmd.run(tiny.get_config(), str(tmp_path / "never_trained"))
