"""The joint SimFlow update: a pure function (state, batch, frozen nets) -> (state, metrics).

One step (DESIGN.md section 5), with the rng folded from config.seed and the step:
  mu        = encoder(image)
  x         = mu + sigma_bar * eps          # no stop_gradient (end_to_end)
  recon     = decoder(x)
  z, ld     = flow(x [+ noise_aug], label dropped to the null class w.p. p)
  loss_g    = w_l1 L1 + w_lpips LPIPS + w_kl KL + w_gan G_adv + w_nf NLL/dim [+ REPA]
  loss_d    = hinge(D(image), D(stop_grad(recon)))      (when w_gan > 0)
A zero weight skips its term's compute. Every gradient path is a variant
(train.variant): frozen_vae (the VAE gets no gradient and no update; no decode),
frozen_encoder (the encoder gets none), learned_variance / noise_augmented
(posterior 'learned'; the latter adds N(0, noise_aug_std^2) to the flow's input).

REPA-E (repa.enabled): the frozen encoder's tokens of the image resized to 224 px
are matched by a projector on block `repa.block`'s hidden state after layer
`repa.layer` (natural token order). The flow and projector get the alignment
gradient with weight w_flow; the VAE encoder gets it with weight w_vae (one extra
flow pass with frozen flow parameters adds the difference, when they differ).

Frozen networks (LPIPS VGG, REPA encoder) are arguments (`frozen`), never constants
baked into the compiled step, and never updated.

Public API:
  TrainState(step, params, opt_state, ema)
  create_train_state(models, config, tx, rng) -> TrainState
  train_step(state, batch, frozen, *, models, config, tx) -> (TrainState, metrics)
"""
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


def create_train_state(models: build.Models, config, tx, rng) -> TrainState:
  params = build.init_params(models, rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema=jax.tree.map(jnp.copy, optim.generator(params)))


def _frozen_view(params: dict, variant: str) -> dict:
  """Stops gradients into the parts a variant freezes (so XLA skips their backward)."""
  if variant == "frozen_vae":
    return {**params, "vae": jax.lax.stop_gradient(params["vae"])}
  if variant == "frozen_encoder":
    vae = {**params["vae"], "encoder": jax.lax.stop_gradient(params["vae"]["encoder"])}
    return {**params, "vae": vae}
  return params


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
  l, v, variant = config.loss, config.vae, config.train.variant
  images, labels = batch["image"], batch["label"]
  k_eps, k_drop, k_aug = jax.random.split(rng, 3)
  p = _frozen_view(gen_params, variant)
  vae_vars = {"params": p["vae"]}

  posterior = models.vae.apply(vae_vars, images, method=VAE.encode)
  latents = sample_latents(posterior, k_eps, v.sigma_bar)  # (B, h, w, c)
  flow_in = latents
  if variant == "noise_augmented":
    flow_in = latents + l.noise_aug_std * jax.random.normal(k_aug, latents.shape)
  drop = jax.random.bernoulli(k_drop, l.label_dropout, labels.shape)
  flow_labels = jnp.where(drop, models.num_classes, labels)

  terms, metrics = {}, {}
  tokens = models.to_tokens(flow_in)  # (B, T, D)
  n_dims = tokens.shape[1] * tokens.shape[2]
  capture = (config.repa.block, config.repa.layer) if models.projector is not None else None
  out = models.flow.apply({"params": p["flow"]}, tokens, flow_labels, capture=capture)
  z, logdet = out[0], out[1]
  nll = losses.flow_nll(z, logdet)
  terms["nf"] = (l.w_nf, losses.nats_per_dim(nll, n_dims))
  metrics["bits_per_dim"] = jnp.mean(losses.bits_per_dim(nll, n_dims))
  metrics["logdet_per_dim"] = jnp.mean(logdet) / n_dims

  if models.projector is not None:
    target = _repa_targets(images, frozen, config)
    r = config.repa
    align = _repa_loss(models, p["repa_proj"], out[2], target)
    total_align = r.w_flow * align
    if r.w_vae != r.w_flow and variant not in ("frozen_vae", "frozen_encoder"):
      # Encoder-only path: same pass with the flow and projector frozen.
      frozen_flow = jax.lax.stop_gradient(p["flow"])
      hidden_e = models.flow.apply({"params": frozen_flow}, tokens, flow_labels, capture=capture)[2]
      align_e = _repa_loss(models, jax.lax.stop_gradient(p["repa_proj"]), hidden_e, target)
      total_align = total_align + (r.w_vae - r.w_flow) * align_e
    terms["repa"] = (1.0, total_align)
    metrics["repa_cos"] = -jnp.mean(align)

  if variant != "frozen_vae":
    recon = models.vae.apply(vae_vars, latents, method=VAE.decode)
    if l.w_l1 > 0:
      terms["l1"] = (l.w_l1, losses.l1(recon, images))
    if l.w_lpips > 0:
      terms["lpips"] = (l.w_lpips, lpips.LPIPS().apply({"params": frozen["lpips"]}, recon, images))
    if l.w_gan > 0:
      gan_on = (step >= l.gan_start_step).astype(jnp.float32)
      logits_fake = models.disc.apply({"params": disc_params}, recon)
      terms["gan_g"] = (l.w_gan * gan_on, discriminator.generator_adv_loss(logits_fake))
    metrics["recon_l1"] = jnp.mean(losses.l1(recon, images))
  else:
    recon = None
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
  return total, (metrics, recon)


def train_step(state: TrainState, batch: dict, frozen: dict, *, models, config, tx):
  """One jitted update of every trainable subtree; returns (new_state, metrics)."""
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
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
