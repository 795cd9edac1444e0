"""Gradient paths of the joint step: variants and REPA-E (train_step.generator_loss)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from configs import variants
from simflow_jax import optim, train_step
from simflow_jax.models import build
from simflow_jax.models import vae as vae_lib
from simflow_jax.pretrained import dinov2


def _setup(variant="", repa=False, **loss):
  config = tiny.get_config(variant)
  with config.unlocked():
    if config.train.freeze in ("vae", "encoder"):
      config.train.vae_checkpoint = "/unused"
    for k, v in loss.items():
      config.loss[k] = v
    if repa:
      config.repa.enabled, config.repa.encoder, config.repa.layer = True, "tiny", 1
      config.repa.proj_hidden = 32
      config.repa.w_flow, config.repa.w_vae = repa
  models = build.build_models(config)
  # Init, then perturb the zero-initialised flow heads so every path carries gradient (one
  # jitted program: op-by-op dispatch would compile every primitive on its own).
  params = jax.jit(lambda r: jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                                          build.init_params(models, r)))(jax.random.key(0))
  rng = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32),
           "label": jnp.asarray([0, 1, 2, 3], jnp.int32)}
  frozen = {"repa_encoder": dinov2.init_random_dinov2_params(jax.random.key(2), "tiny")} if repa else {}
  return config, models, params, batch, frozen


def _grad_norms(config, models, params, batch, frozen):
  gen = {k: v for k, v in params.items() if k != "disc"}
  fn = functools.partial(train_step.generator_loss, models=models, config=config)
  loss = lambda g: fn(g, params.get("disc"), batch, frozen, jax.random.key(3), jnp.int32(0))
  grads, (metrics, _) = jax.jit(jax.grad(loss, has_aux=True))(gen)
  norms = {"encoder": optax.global_norm(grads["vae"]["encoder"]),
           "decoder": optax.global_norm(grads["vae"]["decoder"]),
           "flow": optax.global_norm(grads["flow"])}
  if "repa_proj" in grads:
    norms["repa_proj"] = optax.global_norm(grads["repa_proj"])
  return {k: float(v) for k, v in norms.items()}, metrics


def test_end_to_end_flow_nll_reaches_the_encoder():
  # Only the flow NLL: its gradient must reach the encoder through x = mu + sigma*eps.
  norms, _ = _grad_norms(*_setup(w_l1=0.0, w_kl=0.0, w_nf=1.0))
  assert norms["encoder"] > 1e-6 and norms["flow"] > 1e-6
  assert norms["decoder"] == 0.0


# train.freeze -> which of (encoder, decoder, flow) train.
TRAINS = {"none": (True, True, True), "vae": (False, False, True),
          "encoder": (False, True, True), "flow": (True, True, False)}


def test_every_study_row_freezes_a_tested_set():
  for name in list(variants.ROWS) + [r.stage1 for r in variants.ROWS.values() if r.stage1]:
    assert tiny.get_config(name).train.freeze in TRAINS


@pytest.mark.parametrize("preset", [  # freeze = vae; encoder, flow (the study's stage-1
    # VAE) and none (everything trains) are slow
    "frozen_vae_learned", pytest.param("frozen_encoder_noise", marks=pytest.mark.slow),
    pytest.param("vae_fixed_ln", marks=pytest.mark.slow),
    pytest.param("simflow", marks=pytest.mark.slow)])
def test_row_configs_freeze_exactly_what_they_say(preset):
  """Gradients of frozen parameters are zero and others non-zero; the optimiser leaves the
  frozen ones unchanged."""
  config, models, params, batch, frozen = _setup(preset, w_l1=1.0, w_nf=1.0)
  norms, _ = _grad_norms(config, models, params, batch, frozen)
  encoder, decoder, flow = TRAINS[config.train.freeze]
  assert (norms["encoder"] > 0, norms["decoder"] > 0, norms["flow"] > 0) == (encoder, decoder, flow)
  config.optim.warmup_steps = 0  # a non-zero learning rate at step 0
  tx = optim.make_optimizer(config, params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {"encoder": updates["vae"]["encoder"], "decoder": updates["vae"]["decoder"],
           "flow": updates["flow"]}
  moved = {k: float(optax.global_norm(v)) > 0 for k, v in moved.items()}
  assert (moved["encoder"], moved["decoder"], moved["flow"]) == (encoder, decoder, flow)


def _by_hand_loss(config, models, params, batch, rng):
  """-ELBO's terms written out from the definitions (flow NLL and Gaussian entropy per dim)."""
  l = config.loss
  k_in, k_drop = jax.random.split(rng)
  k_eps, k_noise = jax.random.split(k_in)
  post = models.vae.apply({"params": params["vae"]}, batch["image"], method=vae_lib.VAE.encode)
  std = jnp.exp(0.5 * post.logvar)
  x = post.mu + std * jax.random.normal(k_eps, post.mu.shape)
  s = l.flow_noise_std * (jnp.std(post.mu) if l.flow_noise_relative else 1.0)  # relative: x std(mu)
  x_flow = x + s * jax.random.normal(k_noise, x.shape)
  drop = jax.random.bernoulli(k_drop, l.label_dropout, batch["label"].shape)
  labels = jnp.where(drop, models.num_classes, batch["label"])
  tokens = models.to_tokens(x_flow)
  z, logdet, _ = models.flow.apply({"params": params["flow"]}, tokens, labels)
  n = tokens.shape[1] * tokens.shape[2]
  nll = (0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, 1) + 0.5 * n * np.log(2 * np.pi) - logdet) / n
  var = (std ** 2 + s ** 2).reshape(z.shape[0], -1)
  entropy = jnp.mean(0.5 * np.log(2 * np.pi * np.e) + 0.5 * jnp.log(var), axis=1)
  recon = models.vae.apply({"params": params["vae"]}, x_flow, method=vae_lib.VAE.decode)
  l1 = jnp.mean(jnp.abs(recon - batch["image"]).reshape(z.shape[0], -1), 1)
  mu, lv = post.mu.reshape(z.shape[0], -1), post.logvar.reshape(z.shape[0], -1)
  kl = 0.5 * jnp.sum(mu ** 2 + jnp.exp(lv) - 1 - lv, 1)
  return jnp.mean(l.w_nf * (nll - entropy) + l.w_l1 * l1 + l.w_kl * kl), jnp.mean(entropy)


@pytest.mark.parametrize("preset", ["end_to_end_noise"])  # learned var + noise: both in the entropy
def test_learned_variance_loss_is_the_elbo_with_entropy(preset):
  config, models, params, batch, frozen = _setup(preset, w_l1=1.0, w_nf=0.7, w_kl=1e-3)
  rng = jax.random.key(3)
  fn = jax.jit(functools.partial(train_step.generator_loss, models=models, config=config))
  gen = {k: v for k, v in params.items() if k != "disc"}
  loss, (metrics, _) = fn(gen, None, batch, frozen, rng, jnp.int32(0))
  expected, entropy = jax.jit(functools.partial(_by_hand_loss, config, models))(params, batch, rng)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["posterior_entropy_per_dim"]), float(entropy), rtol=1e-5)
  # The old objective (flow NLL alone) is one field away and differs by w_nf * entropy.
  config.loss.posterior_entropy = False
  fn = jax.jit(functools.partial(train_step.generator_loss, models=models, config=config))
  loss_old, _ = fn(gen, None, batch, frozen, rng, jnp.int32(0))
  np.testing.assert_allclose(float(loss_old) - float(loss), 0.7 * float(entropy), rtol=1e-4)


@pytest.mark.slow
def test_noise_rows_decode_the_noisy_latents_the_flow_models():
  config, models, params, batch, frozen = _setup("end_to_end_noise", w_l1=1.0)
  gen = {k: v for k, v in params.items() if k != "disc"}
  rng = jax.random.key(3)
  out = {}
  for noisy in (True, False):
    config.loss.decode_noisy = noisy
    fn = jax.jit(functools.partial(train_step.generator_loss, models=models, config=config))
    out[noisy] = fn(gen, None, batch, frozen, rng, jnp.int32(0))[1][1]
  inp = train_step.flow_input(models, params["vae"], batch["image"], jax.random.split(rng)[0],
                              config.loss.flow_noise_std, relative=config.loss.flow_noise_relative)
  decode = lambda x: models.vae.apply({"params": params["vae"]}, x, method=vae_lib.VAE.decode)
  np.testing.assert_allclose(out[True], decode(inp.noisy), atol=1e-5)
  np.testing.assert_allclose(out[False], decode(inp.latents), atol=1e-5)


@pytest.mark.slow  # two more grad compiles; the noise rows' flow input is checked exactly above
def test_noise_augmented_changes_flow_input():
  _, m_plain = _grad_norms(*_setup("learned_variance"))
  _, m_aug = _grad_norms(*_setup("noise_augmented"))
  assert float(m_plain["bits_per_dim"]) != float(m_aug["bits_per_dim"])


ONLY_REPA = dict(w_l1=0.0, w_kl=0.0, w_nf=0.0)


@pytest.mark.slow
def test_repa_gradients_reach_flow_projector_and_encoder():
  """Both weights on: every side gets gradient, the decoder none."""
  norms, metrics = _grad_norms(*_setup(repa=(0.5, 1.5), **ONLY_REPA))
  assert norms["flow"] > 0 and norms["repa_proj"] > 0 and norms["encoder"] > 0
  assert norms["decoder"] == 0.0
  assert -1.0 <= float(metrics["repa_cos"]) <= 1.0


@pytest.mark.slow  # three grad compiles
def test_each_repa_weight_moves_only_its_side():
  """Each weight alone moves only its side, and the encoder's gradient scales with w_vae alone."""
  only_repa = ONLY_REPA
  norms, _ = _grad_norms(*_setup(repa=(0.5, 1.5), **only_repa))
  # w_vae = 0: the encoder gets no alignment gradient, the flow still does.
  norms0, _ = _grad_norms(*_setup(repa=(0.5, 0.0), **only_repa))
  assert norms0["encoder"] < 1e-7 * max(norms["encoder"], 1.0) and norms0["flow"] > 0
  # w_flow = 0 and w_vae doubled: the flow and projector get none; the encoder's gradient
  # is twice that at w_vae = 1.5 (w_flow added nothing to it, as the case above shows).
  norms1, _ = _grad_norms(*_setup(repa=(0.0, 3.0), **only_repa))
  assert norms1["flow"] == 0.0 and norms1["repa_proj"] == 0.0 and norms1["encoder"] > 0
  np.testing.assert_allclose(norms1["encoder"], 2 * norms["encoder"], rtol=1e-4)


@pytest.mark.slow
def test_repa_disabled_has_no_alignment_path():
  config, models, params, batch, frozen = _setup(w_l1=0.0, w_kl=0.0, w_nf=0.0)
  assert "repa_proj" not in params and models.projector is None
  norms, metrics = _grad_norms(config, models, params, batch, frozen)
  assert "loss_repa" not in metrics
  assert all(v == 0.0 for v in norms.values())


def test_repa_without_weights_is_a_clear_error(tmp_path):
  from simflow_jax.commands import train
  config = tiny.get_config()
  with config.unlocked():
    config.repa.enabled, config.repa.encoder, config.repa.layer = True, "dinov2_b14", 1
  with pytest.raises(FileNotFoundError, match="convert_dinov2"):
    train.run(config, str(tmp_path / "run"))
