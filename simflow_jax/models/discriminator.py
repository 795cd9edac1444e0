"""The PatchGAN discriminator and the hinge losses for the adversarial VAE term.

Shapes: images (B, H, W, C) in [-1, 1] -> logits (B, ceil(H/2**n), ceil(W/2**n), 1) float32,
one per patch. Losses per example (B,): the discriminator's hinge loss
0.5 * (mean relu(1 - real) + mean relu(1 + fake)) and the generator's -mean logits_fake.

The network is taming-transformers' NLayerDiscriminator (4x4 convs, stride 2 for `n_layers`
layers, LeakyReLU 0.2, width doubling capped at 8*ch, a stride-1 conv, then a 1-channel 4x4 conv
giving one logit per patch; conv weights N(0, 0.02)) with two deliberate changes:
- GroupNorm instead of BatchNorm, so the model has no batch_stats and the train step stays pure.
- 'SAME' padding instead of padding 1, so every image larger than 2**n_layers px keeps at least
  2x2 patches (32x32 with n_layers=3 gives 4x4; 256x256 gives 32x32 where taming gives 30x30).
Losses are per example (mean over patches); the hinge D loss has taming's factor 0.5.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from simflow_jax.models.vae import group_norm


class PatchDiscriminator(nn.Module):
  ch: int = 64
  n_layers: int = 3

  @classmethod
  def from_config(cls, disc_cfg) -> "PatchDiscriminator":
    return cls(ch=disc_cfg.ch, n_layers=disc_cfg.n_layers)

  @nn.compact
  def __call__(self, images):
    if self.n_layers < 1 or min(images.shape[1:3]) <= 2 ** self.n_layers:
      raise ValueError(
          f"PatchDiscriminator(n_layers={self.n_layers}) needs n_layers >= 1 and images larger than "
          f"2**n_layers = {2 ** self.n_layers} px (GroupNorm over a 1x1 map zeroes the features); "
          f"got shape {images.shape}. Lower config.disc.n_layers.")
    init = nn.initializers.normal(0.02)
    conv = lambda feats, stride, name, bias=False: nn.Conv(
        feats, (4, 4), strides=stride, padding="SAME", use_bias=bias, kernel_init=init, name=name)
    x = nn.leaky_relu(conv(self.ch, 2, "conv_0", bias=True)(images), 0.2)
    for i in range(1, self.n_layers + 1):
      feats = self.ch * min(2 ** i, 8)
      x = conv(feats, 2 if i < self.n_layers else 1, f"conv_{i}")(x)
      x = nn.leaky_relu(group_norm(feats, jnp.float32, f"norm_{i}")(x), 0.2)
    return conv(1, 1, "conv_out", bias=True)(x)  # (B, h', w', 1)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  axes = tuple(range(1, logits_real.ndim))
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real), axis=axes)
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake), axis=axes)
  return 0.5 * (loss_real + loss_fake)


def generator_adv_loss(logits_fake: jax.Array) -> jax.Array:
  return -jnp.mean(logits_fake, axis=tuple(range(1, logits_fake.ndim)))
