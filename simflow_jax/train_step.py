"""The joint SimFlow update: a pure function (state, batch, frozen nets) -> (state, metrics).

One step (paper Sec. 3), the rng folded from the state's key and the step:
  mu, [logvar] = encoder(image)
  x         = mu + std * eps [+ n],  n ~ N(0, s^2)   (flow_input)
              s = loss.flow_noise_std, times stop_grad(std of mu over the batch's elements)
              when loss.flow_noise_relative (noise relative to the latent's scale)
  recon     = decoder(x)             (x without n when loss.decode_noisy is False)
  z, ld     = flow(x, label dropped to the null class w.p. p)
  loss_g    = w_l1 L1 + w_lpips LPIPS + w_kl KL + w_gan G_adv
            + w_nf (NLL/dim [- H(q)/dim for a learned posterior]) [+ REPA]
  loss_d    = hinge(D(image), D(stop_grad(recon)))      (when w_gan > 0)
std is vae.sigma_bar (fixed posteriors) or exp(logvar / 2) (learned). With a learned
posterior and loss.posterior_entropy the loss is the ELBO: the entropy of q(x | image)
per dim (losses.gaussian_entropy_per_dim) stops the flow NLL from rewarding a
shrinking variance. A zero weight skips its term's compute.

train.freeze picks the gradient path: none (end to end), vae (only the flow trains;
no decode), encoder (decoder and flow train), flow (the VAE trains alone: stage 1 of a
two-stage run; no flow pass). Frozen parts get no gradient here and no update in optim.

REPA-E (repa.enabled): the frozen encoder's tokens of the image resized to 224 px
are matched by a projector on block `repa.block`'s hidden state after layer
`repa.layer` (natural token order). The flow and projector get the alignment
gradient with weight w_flow; the VAE encoder gets it with weight w_vae (one extra
flow pass with frozen flow parameters adds the difference, when they differ).

Frozen networks (LPIPS VGG, REPA encoder) are arguments (`frozen`), never constants
baked into the compiled step, and never updated. Neither is the seed: the state
carries its random key, so runs that differ only in config.seed share one compiled step.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from simflow_jax import losses, optim
from simflow_jax.models import build, discriminator, repa
from simflow_jax.models.vae import VAE, sample_latents
from simflow_jax.pretrained import dinov2, lpips

REPA_SIZE = 224  # DINOv2 input: 224 px -> 16 x 16 patch tokens


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema: dict
  rng: jax.Array              # raw key data (uint32); the step's key is fold_in(rng, step)


def flow_noise_std(config) -> float:
  """The extra Gaussian noise on the flow's input in training (loss.flow_noise_std)."""
  return float(config.loss.flow_noise_std)


def flow_noise_relative(config) -> bool:
  """Whether flow_noise_std is in units of the latent's std (loss.flow_noise_relative)."""
  return bool(config.loss.flow_noise_relative)


def create_train_state(models: build.Models, config, tx, rng) -> TrainState:
  k_init, k_train = jax.random.split(rng)
  params = build.init_params(models, k_init)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, optim.generator(params)),
                    rng=jax.random.key_data(k_train))


def _frozen_view(params: dict, freeze: str) -> dict:
  """Stops gradients into the parts train.freeze names (so XLA skips their backward)."""
  if freeze == "vae":
    return {**params, "vae": jax.lax.stop_gradient(params["vae"])}
  if freeze == "encoder":
    vae = {**params["vae"], "encoder": jax.lax.stop_gradient(params["vae"]["encoder"])}
    return {**params, "vae": vae}
  if freeze == "flow":
    return {**params, "flow": jax.lax.stop_gradient(params["flow"])}
  return params


class FlowInput(flax.struct.PyTreeNode):
  posterior: Any              # vae.Posterior: mu (B, h, w, c), logvar or None
  latents: jax.Array          # (B, h, w, c) mu + std * eps (mu when use_mean)
  noisy: jax.Array            # (B, h, w, c) latents + noise_std * n: what the flow models
  var: jax.Array              # (B, h, w, c) per-dim variance of `noisy` given the image
  noise_std: jax.Array        # () the std of the added noise (absolute)


def flow_input(models: build.Models, vae_params, images, rng, noise_std: float,
               use_mean: bool = False, relative: bool = False) -> FlowInput:
  """images (B, H, W, C) -> the flow's input: mu + std * eps + s * n.

  The one place the flow's input is made, for training and for likelihoods. s = noise_std,
  or with `relative` noise_std * stop_gradient(std of mu over all of the batch's elements),
  so the noise keeps its size against the latent's. use_mean: the input is mu itself (no
  posterior noise, no extra noise; rng unused).
  """
  posterior = models.vae.apply({"params": vae_params}, images, method=VAE.encode)
  if posterior.logvar is None:
    var = jnp.full_like(posterior.mu, models.vae.sigma_bar ** 2)
  else:
    var = jnp.exp(posterior.logvar)
  if use_mean:
    return FlowInput(posterior=posterior, latents=posterior.mu, noisy=posterior.mu,
                     var=jnp.zeros_like(var), noise_std=jnp.zeros((), jnp.float32))
  k_eps, k_noise = jax.random.split(rng)
  latents = sample_latents(posterior, k_eps, models.vae.sigma_bar)  # (B, h, w, c)
  noisy, scale = latents, jnp.zeros((), jnp.float32)
  if noise_std > 0:
    scale = jnp.float32(noise_std)
    if relative:
      scale = scale * jax.lax.stop_gradient(jnp.std(posterior.mu))
    noisy = latents + scale * jax.random.normal(k_noise, latents.shape, jnp.float32)
  return FlowInput(posterior=posterior, latents=latents, noisy=noisy, var=var + scale ** 2,
                   noise_std=scale)


def _repa_targets(images, frozen, config):
  enc = dinov2.make_dinov2(config.repa.encoder, interpolate_offset=config.repa.interpolate_offset)
  tokens = enc.apply({"params": frozen["repa_encoder"]}, dinov2.preprocess(images, REPA_SIZE))
  return jax.lax.stop_gradient(tokens)  # (B, 256, D_enc)


def _repa_loss(models, proj_params, hidden, target):
  """Matches the flow grid and the 16 x 16 encoder grid by pooling the finer one."""
  flow_grid = (models.latent_hw[0] // models.patch_size, models.latent_hw[1] // models.patch_size)
  side = REPA_SIZE // 14
  if flow_grid[0] >= side:
    hidden = repa.match_tokens(hidden, flow_grid, (side, side))
  else:
    target = repa.match_tokens(target, (side, side), flow_grid)
  projected = models.projector.apply({"params": proj_params}, hidden)
  return repa.alignment_loss(projected, target)


def generator_loss(gen_params, disc_params, batch, frozen, rng, step, *, models, config):
  """Mean generator loss over the batch and its per-term metrics."""
  l, v, freeze = config.loss, config.vae, config.train.freeze
  images, labels = batch["image"], batch["label"]
  k_in, k_drop = jax.random.split(rng)
  p = _frozen_view(gen_params, freeze)
  vae_vars = {"params": p["vae"]}

  inp = flow_input(models, p["vae"], images, k_in, l.flow_noise_std,
                   relative=l.flow_noise_relative)
  posterior, latents = inp.posterior, inp.latents
  drop = jax.random.bernoulli(k_drop, l.label_dropout, labels.shape)
  flow_labels = jnp.where(drop, models.num_classes, labels)

  terms, metrics = {}, {}
  tokens = models.to_tokens(inp.noisy)  # (B, T, D)
  capture = (config.repa.block, config.repa.layer) if models.projector is not None else None
  if freeze != "flow" or capture is not None:
    n_dims = tokens.shape[1] * tokens.shape[2]
    z, logdet, hidden = models.flow.apply({"params": p["flow"]}, tokens, flow_labels, capture=capture)
    nll = losses.flow_nll(z, logdet)
    nf = losses.nats_per_dim(nll, n_dims)
    if posterior.logvar is not None and l.posterior_entropy:
      entropy = losses.gaussian_entropy_per_dim(inp.var)  # (B,) nats/dim
      nf = nf - entropy
      metrics["posterior_entropy_per_dim"] = jnp.mean(entropy)
    if freeze != "flow":
      terms["nf"] = (l.w_nf, nf)
    metrics["bits_per_dim"] = jnp.mean(losses.bits_per_dim(nll, n_dims))
    metrics["logdet_per_dim"] = jnp.mean(logdet) / n_dims
  else:
    metrics["bits_per_dim"] = jnp.float32(jnp.nan)  # stage 1: the flow is not evaluated

  if models.projector is not None:
    target = _repa_targets(images, frozen, config)
    r = config.repa
    align = _repa_loss(models, p["repa_proj"], hidden, target)
    total_align = r.w_flow * align
    if r.w_vae != r.w_flow and freeze not in ("vae", "encoder"):
      # Encoder-only path: same pass with the flow and projector frozen.
      frozen_flow = jax.lax.stop_gradient(p["flow"])
      hidden_e = models.flow.apply({"params": frozen_flow}, tokens, flow_labels, capture=capture)[2]
      align_e = _repa_loss(models, jax.lax.stop_gradient(p["repa_proj"]), hidden_e, target)
      total_align = total_align + (r.w_vae - r.w_flow) * align_e
    terms["repa"] = (1.0, total_align)
    metrics["repa_cos"] = -jnp.mean(align)

  recon = None
  if freeze != "vae":
    recon = models.vae.apply(vae_vars, inp.noisy if l.decode_noisy else latents, method=VAE.decode)
    if l.w_l1 > 0:
      terms["l1"] = (l.w_l1, losses.l1(recon, images))
    if l.w_lpips > 0:
      terms["lpips"] = (l.w_lpips, lpips.LPIPS().apply({"params": frozen["lpips"]}, recon, images))
    if l.w_gan > 0:
      gan_on = (step >= l.gan_start_step).astype(jnp.float32)
      logits_fake = models.disc.apply({"params": disc_params}, recon)
      terms["gan_g"] = (l.w_gan * gan_on, discriminator.generator_adv_loss(logits_fake))
    metrics["recon_l1"] = jnp.mean(losses.l1(recon, images))
    if l.w_kl > 0:
      terms["kl"] = (l.w_kl, losses.kl_divergence(posterior.mu, posterior.logvar, v.sigma_bar))

  total = 0.0
  for name, (weight, per_example) in terms.items():
    value = jnp.mean(per_example)
    metrics[f"loss_{name}"] = value
    total = total + weight * value
  metrics["loss"] = total
  metrics["latent_mean"] = jnp.mean(latents)
  metrics["latent_std"] = jnp.std(latents)
  metrics["mu_std"] = jnp.std(posterior.mu)
  metrics["flow_noise_std"] = inp.noise_std
  return total, (metrics, recon)


def train_step(state: TrainState, batch: dict, frozen: dict, *, models, config, tx):
  """One jitted update of every trainable subtree; returns (new_state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  k_gen, _ = jax.random.split(rng)
  params = state.params
  gen_params = optim.generator(params)
  disc_params = params.get("disc")

  grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (metrics, recon)), gen_grads = grad_fn(gen_params, disc_params, batch, frozen, k_gen, state.step,
                                             models=models, config=config)
  grads = dict(gen_grads)

  if models.disc is not None:
    gan_on = (state.step >= config.loss.gan_start_step).astype(jnp.float32)
    fake = jax.lax.stop_gradient(recon)

    def disc_loss(dp):
      real_logits = models.disc.apply({"params": dp}, batch["image"])
      fake_logits = models.disc.apply({"params": dp}, fake)
      return gan_on * jnp.mean(discriminator.hinge_d_loss(real_logits, fake_logits))

    d_loss, grads["disc"] = jax.value_and_grad(disc_loss)(disc_params)
    metrics["loss_disc"] = d_loss

  updates, opt_state = tx.update(grads, state.opt_state, params)
  new_params = optax.apply_updates(params, updates)
  ema = optim.ema_update(state.ema, optim.generator(new_params), config.optim.ema_decay)

  for name, g in grads.items():
    metrics[f"grad_norm_{name}"] = optax.global_norm(g)
  metrics["param_norm"] = optax.global_norm(new_params)
  metrics.update(optim.learning_rates(config, state.step))
  new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state, ema=ema)
  return new_state, metrics
