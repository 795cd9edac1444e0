"""The paper's gradient-path studies (DESIGN.md section 5) as config edits, not forks.

Use as a config argument: `--config=configs/imagenet256.py:learned_variance`.
  end_to_end        SimFlow: fixed posterior std, everything trains (default)
  frozen_vae        a pretrained VAE (train.vae_checkpoint) is frozen; only the flow trains
  frozen_encoder    encoder frozen (from train.vae_checkpoint); decoder and flow train
  learned_variance  standard VAE posterior (mu, log-variance + KL), trained end to end
  noise_augmented   learned variance + N(0, 0.3^2) noise on the flow's input (STARFlow)
"""
from configs.base import VARIANTS


def apply_variant(config, name: str):
  name = name or "end_to_end"
  if name not in VARIANTS:
    raise ValueError(f"Unknown variant {name!r}; choose one of {VARIANTS}.")
  config.train.variant = name
  if name in ("learned_variance", "noise_augmented"):
    config.vae.posterior = "learned"
  if name == "frozen_vae":  # the decoder is frozen too: no reconstruction terms to train
    config.loss.w_l1 = config.loss.w_lpips = config.loss.w_gan = config.loss.w_kl = 0.0
  return config
