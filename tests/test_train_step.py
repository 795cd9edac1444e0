"""Gradient paths of the joint step: variants and REPA-E (train_step.generator_loss)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from simflow_jax import train_step
from simflow_jax.models import build
from simflow_jax.pretrained import dinov2


def _setup(variant="", repa=False, **loss):
  config = tiny.get_config(variant)
  with config.unlocked():
    if variant.startswith("frozen"):
      config.train.vae_checkpoint = "/unused"
    for k, v in loss.items():
      config.loss[k] = v
    if repa:
      config.repa.enabled, config.repa.encoder, config.repa.layer = True, "tiny", 1
      config.repa.proj_hidden = 32
      config.repa.w_flow, config.repa.w_vae = repa
  models = build.build_models(config)
  params = build.init_params(models, jax.random.key(0))
  # Perturb the zero-initialised flow heads so every path carries gradient.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
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


@pytest.mark.parametrize("variant,encoder,decoder", [("frozen_vae", False, False),
                                                      ("frozen_encoder", False, True)])
def test_frozen_variants_stop_gradients(variant, encoder, decoder):
  norms, _ = _grad_norms(*_setup(variant, w_l1=1.0, w_nf=1.0))
  assert (norms["encoder"] > 0) == encoder and (norms["decoder"] > 0) == decoder
  assert norms["flow"] > 0


def test_noise_augmented_changes_flow_input():
  _, m_plain = _grad_norms(*_setup("learned_variance"))
  _, m_aug = _grad_norms(*_setup("noise_augmented"))
  assert float(m_plain["bits_per_dim"]) != float(m_aug["bits_per_dim"])


def test_repa_gradients_reach_flow_projector_and_encoder():
  only_repa = dict(w_l1=0.0, w_kl=0.0, w_nf=0.0)
  norms, metrics = _grad_norms(*_setup(repa=(0.5, 1.5), **only_repa))
  assert norms["flow"] > 0 and norms["repa_proj"] > 0 and norms["encoder"] > 0
  assert norms["decoder"] == 0.0
  assert -1.0 <= float(metrics["repa_cos"]) <= 1.0
  # w_vae = 0: the encoder gets no alignment gradient, the flow still does.
  norms0, _ = _grad_norms(*_setup(repa=(0.5, 0.0), **only_repa))
  assert norms0["encoder"] < 1e-7 * max(norms["encoder"], 1.0) and norms0["flow"] > 0
  # w_flow = 0: the flow and projector get none, the encoder does.
  norms1, _ = _grad_norms(*_setup(repa=(0.0, 1.5), **only_repa))
  assert norms1["flow"] == 0.0 and norms1["repa_proj"] == 0.0 and norms1["encoder"] > 0
  # The encoder gradient scales with w_vae alone.
  norms2, _ = _grad_norms(*_setup(repa=(0.5, 3.0), **only_repa))
  np.testing.assert_allclose(norms2["encoder"], 2 * norms["encoder"], rtol=1e-4)


def test_repa_disabled_has_no_alignment_path():
  config, models, params, batch, frozen = _setup(w_l1=0.0, w_kl=0.0, w_nf=0.0)
  assert "repa_proj" not in params and models.projector is None
  norms, metrics = _grad_norms(config, models, params, batch, frozen)
  assert "loss_repa" not in metrics
  assert all(v == 0.0 for v in norms.values())


def test_repa_without_weights_is_a_clear_error(tmp_path):
  from simflow_jax import train
  config = tiny.get_config()
  with config.unlocked():
    config.repa.enabled, config.repa.encoder, config.repa.layer = True, "dinov2_b14", 1
  with pytest.raises(FileNotFoundError, match="convert_dinov2"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
