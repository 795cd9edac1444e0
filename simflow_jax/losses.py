"""Loss terms, per example, in one place. Everything returns shape (B,), float32.

  flow_nll(z, logdet)              NLL of x under the flow, nats per example:
                                   0.5*sum(z^2) + 0.5*N*log(2*pi) - logdet,  N = T*D
  bits_per_dim(nll_nats, n_dims)   nats per example -> bits/dim (divide by N ln 2)
  nats_per_dim(nll_nats, n_dims)   nats per example -> nats/dim (the training term)
  l1(x, y), kl_divergence(mu, logvar, sigma_bar)
  gaussian_entropy_per_dim(var)    differential entropy of N(., var), nats per dim (B,)
Adversarial (hinge) terms live with the PatchGAN in models/discriminator.py and the
REPA alignment loss with its projector in models/repa.py.
"""
import math
from typing import Optional

import jax.numpy as jnp

LOG_2PI = math.log(2 * math.pi)
LOG_2PI_E = math.log(2 * math.pi * math.e)


def flow_nll(z, logdet):
  """z (B, ...) Gaussian-side tokens, logdet (B,) of the data -> noise map. Nats (B,)."""
  z = z.astype(jnp.float32).reshape(z.shape[0], -1)
  n = z.shape[1]
  return 0.5 * jnp.sum(z * z, axis=1) + 0.5 * n * LOG_2PI - logdet.astype(jnp.float32)


def nats_per_dim(nll, n_dims: int):
  return nll / n_dims


def bits_per_dim(nll, n_dims: int):
  return nll / (n_dims * math.log(2))


def l1(x, y):
  """Mean absolute error per example."""
  d = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
  return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


def kl_divergence(mu, logvar: Optional[jnp.ndarray], sigma_bar: float):
  """KL(N(mu, s^2) || N(0, 1)) summed over latent dims, per example.

  logvar None means the fixed posterior std `sigma_bar` (SimFlow): then only the
  0.5*||mu||^2 part depends on parameters, and the constant is included so the
  value is the true KL.
  """
  mu = mu.astype(jnp.float32).reshape(mu.shape[0], -1)
  if logvar is None:
    logvar = jnp.full_like(mu, 2 * math.log(sigma_bar))
  else:
    logvar = logvar.astype(jnp.float32).reshape(mu.shape)
  return 0.5 * jnp.sum(mu * mu + jnp.exp(logvar) - 1.0 - logvar, axis=1)


def gaussian_entropy_per_dim(var):
  """var (B, ...) per-dim variances of a diagonal Gaussian -> its entropy, nats per dim (B,).

  H = mean over dims of 0.5 * log(2 pi e var). With a learned posterior this is the ELBO's
  entropy term: E_q[-log p_flow(x)] - H[q] is the latent part of -ELBO, so the loss uses
  nats_per_dim(NLL) - gaussian_entropy_per_dim(var), both per dim and under one weight.
  """
  var = var.astype(jnp.float32).reshape(var.shape[0], -1)
  return jnp.mean(0.5 * (LOG_2PI_E + jnp.log(var)), axis=1)
