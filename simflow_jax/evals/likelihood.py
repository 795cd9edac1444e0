"""Exact likelihood of VAE latents under the flow (`--mode=likelihood`, the likelihood evaluator).

One job: bits/dim of the latents of real images under the trained flow, exactly (a
normalizing flow gives log p(x | y) in closed form; no bound, no estimator), over one
whole split with every example counted once.

Two latents per image (SimFlow, arXiv 2512.04084: x = mu + sigma_bar * eps):
  * 'mu'      - the posterior mean mu(image): deterministic, the density of the posterior's
                centre. Not an ELBO term.
  * 'sampled' - x = mu + std * eps, std = sigma_bar ('fixed' posteriors) or exp(logvar / 2)
                ('learned'), plus N(0, loss.flow_noise_std^2) (the flow's training input,
                made by train_step.flow_input). THIS is the ELBO-relevant
                number: the ELBO's latent part is E_q[log p_flow(x | y)] + H[q], and the
                training loss's flow term is exactly this Monte Carlo estimate.
  With H[q] known in closed form (a diagonal Gaussian), the report also gives
  kl = bits_per_dim_sampled - posterior_entropy_bits_per_dim, a one-sample-per-image
  estimate of KL(q(x | image) || p_flow(x | y)) per dimension (the rate).
Labels are each image's true class: a conditional likelihood log p(x | y). Latents are
continuous, so bits/dim can be negative.
"""
import functools
import math

import jax
import jax.numpy as jnp

from simflow_jax import losses, progress, sharding, train_step
from simflow_jax.data import pipeline, sources
from simflow_jax.evals import context
from simflow_jax.models import flow as flow_lib


@functools.partial(jax.jit, static_argnames=("models", "use_mean", "noise_std", "relative"))
def latent_bits_per_dim(models, params, images, labels, rng, use_mean: bool, noise_std: float = 0.0,
                        relative: bool = False):
  """Exact flow bits/dim of each image's latent, (B,) float32.

  params {'vae', 'flow'}; images (B, H, W, C) in [-1, 1]; labels (B,) int32 (the class
  conditioned on; `num_classes` = the null class gives the unconditional density);
  use_mean: the latent is mu (rng unused) or a posterior sample mu + std * eps (+ the
  noise_augmented noise `noise_std`, `relative` to the latent's std: train_step.flow_input).
  """
  inp = train_step.flow_input(models, params["vae"], images, rng, noise_std, use_mean, relative)
  tokens = models.to_tokens(inp.noisy)  # (B, T, D)
  z, logdet = flow_lib.forward(models.flow, params["flow"], tokens, labels)
  n_dims = tokens.shape[1] * tokens.shape[2]
  return losses.bits_per_dim(losses.flow_nll(z, logdet), n_dims)


@functools.partial(jax.jit, static_argnames=("models", "noise_std", "relative"))
def posterior_entropy_bits_per_dim(models, params, images, noise_std: float = 0.0,
                                   relative: bool = False):
  """Differential entropy of the flow-input distribution q(x | image) per dim, in bits, (B,).

  q = N(mu, std^2 + noise_std^2) per dim: H = mean over dims of 0.5 * log(2 pi e var) / ln 2.
  """
  inp = train_step.flow_input(models, params["vae"], images, jax.random.key(0), noise_std,
                              relative=relative)
  return losses.gaussian_entropy_per_dim(inp.var) / math.log(2)


@functools.partial(jax.jit, static_argnames=("models", "noise_std", "relative"))
def _masked_sums(models, params, batch, rng, noise_std: float, relative: bool):
  """One eval batch -> masked sums (replicated scalars) of the three per-example numbers."""
  images, labels, mask = batch["image"], batch["label"], batch["mask"].astype(jnp.float32)
  bpd_mu = latent_bits_per_dim(models, params, images, labels, rng, True, noise_std, relative)
  bpd_x = latent_bits_per_dim(models, params, images, labels, rng, False, noise_std, relative)
  ent = posterior_entropy_bits_per_dim(models, params, images, noise_std, relative)
  return {"mu": jnp.sum(bpd_mu * mask), "sampled": jnp.sum(bpd_x * mask),
          "entropy": jnp.sum(ent * mask), "count": jnp.sum(mask)}


def split_bits_per_dim(config, models, params, mesh=None, split=None, num_examples=None,
                       stop=None) -> dict:
  """Mean bits/dim over one masked pass of a split (every example once, any host count).

  Batches of config.data.batch_size (global; padding examples are masked out), split over
  every device; params are used as placed when on the mesh (e.g. split over fsdp by the mesh
  rules), else replicated. The posterior noise of batch i comes from
  fold_in(key(config.seed), i): reruns agree. Logs progress; with `stop` (a
  signals.StopOnSignal) it ends between batches with progress.Stopped once a stop is agreed.
  """
  split = config.data.eval_split if split is None else split
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  noise_std = train_step.flow_noise_std(config)
  relative = train_step.flow_noise_relative(config)
  loader = pipeline.make_eval_loader(config.data, split, config.data.batch_size,
                                     jax.process_index(), jax.process_count(), num_examples)
  totals = {"mu": 0.0, "sampled": 0.0, "entropy": 0.0, "count": 0.0}
  key = jax.random.key(config.seed)
  params = sharding.on_mesh(params, mesh)
  total = num_examples or len(sources.make_source(config.data, split))
  bar = progress.Progress(f"likelihood {split}", context.eval_batch_count(config.data, total),
                          stop=stop)
  for i, batch in enumerate(loader):  # inputs carry their shardings: jit follows them
    sums = _masked_sums(models, params, sharding.global_batch(batch, mesh),
                        jax.random.fold_in(key, i), noise_std, relative)
    for k, v in jax.device_get(sums).items():
      totals[k] += float(v)
    bar.update()
  n = int(round(totals["count"]))
  if n == 0:
    raise ValueError(f"split {split!r} of data.source={config.data.source!r} gave no examples.")
  t_len, d = models.token_shape
  bpd_mu, bpd_x, ent = totals["mu"] / n, totals["sampled"] / n, totals["entropy"] / n
  return {
      "bits_per_dim_mu": bpd_mu,
      "bits_per_dim_sampled": bpd_x,
      "posterior_entropy_bits_per_dim": ent,
      "kl_bits_per_dim": bpd_x - ent,
      "num_examples": n,
      "dims_per_example": t_len * d,
      "split": split,
      "flow_input_noise_std": noise_std,
      "flow_input_noise_relative": relative,
  }


NOTES = {
    "elbo_relevant": "bits_per_dim_sampled",
    "bits_per_dim_mu": "exact flow bits/dim of the posterior mean mu(image) (deterministic; "
                       "not an ELBO term)",
    "bits_per_dim_sampled": "exact flow bits/dim of x = mu + std*eps (one posterior sample per "
                            "image, the flow's training input): the Monte Carlo estimate of "
                            "-E_q[log2 p_flow(x|y)] per dim, the ELBO's latent term",
    "kl_bits_per_dim": "bits_per_dim_sampled - posterior_entropy_bits_per_dim: estimate of "
                       "KL(q(x|image) || p_flow(x|y)) per dim",
    "labels": "each image's true class (conditional likelihood log p(x|y))",
    "units": "bits per latent dimension of continuous latents (can be negative)",
}


class LikelihoodEvaluator:
  """Evaluator type 'likelihood': split_bits_per_dim over the entry's num_examples (0 = all)."""

  def __init__(self, name: str, entry, ctx):
    self.name, self.entry, self.ctx = name, entry, ctx

  def run(self, params) -> dict:
    c = self.ctx
    return split_bits_per_dim(c.config, c.models, params, mesh=c.mesh,
                              num_examples=self.entry.num_examples or None, stop=c.stop)

  def figures(self) -> dict:
    return {}
