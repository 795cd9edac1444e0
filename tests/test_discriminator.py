"""Tests for simflow_jax.models.discriminator: patch shapes, config building, hinge loss values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_base_config
from simflow_jax.models.discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss

KEY = jax.random.key(0)


@pytest.mark.parametrize("size,n_layers,patches", [(32, 3, 4), (16, 3, 2), (9, 3, 2), (32, 2, 8)])
def test_small_image_shapes(size, n_layers, patches):
  disc = PatchDiscriminator(ch=8, n_layers=n_layers)
  logits, variables = jax.eval_shape(disc.init_with_output, KEY, jnp.zeros((2, size, size, 1)))
  assert logits.shape == (2, patches, patches, 1) and logits.dtype == jnp.float32
  assert set(variables) == {"params"}  # GroupNorm: no batch_stats


def test_logits_vary_per_patch_and_example():
  images = jax.random.uniform(KEY, (2, 16, 16, 1), minval=-1, maxval=1)
  logits, _ = jax.jit(PatchDiscriminator(ch=8, n_layers=3).init_with_output)(KEY, images)
  assert bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.min(jnp.abs(logits[0] - logits[1]))) > 0  # each patch sees its own example
  assert float(jnp.std(logits[0])) > 0


def test_too_small_images_raise():
  with pytest.raises(ValueError, match="n_layers"):
    jax.eval_shape(PatchDiscriminator(ch=8, n_layers=3).init, KEY, jnp.zeros((1, 8, 8, 1)))


def test_channel_widths_are_capped_at_8x():
  params = jax.eval_shape(PatchDiscriminator(ch=4, n_layers=4).init, KEY, jnp.zeros((1, 32, 32, 3)))
  widths = [params["params"][f"conv_{i}"]["kernel"].shape[-1] for i in range(5)]
  assert widths == [4, 8, 16, 32, 32]
  assert params["params"]["conv_out"]["kernel"].shape == (4, 4, 32, 1)


def test_256px_from_config_eval_shape():
  disc = PatchDiscriminator.from_config(get_base_config().disc)
  assert (disc.ch, disc.n_layers) == (64, 3)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  logits, _ = jax.eval_shape(disc.init_with_output, KEY, images)
  assert logits.shape == (2, 32, 32, 1)


def test_hinge_losses_known_values():
  ones = jnp.ones((3, 2, 2, 1))
  np.testing.assert_allclose(hinge_d_loss(2 * ones, -2 * ones), [0.0] * 3)
  np.testing.assert_allclose(hinge_d_loss(0 * ones, 0 * ones), [1.0] * 3)  # taming's 0.5 factor
  # Per example, averaged over patches: real patches (0.5, 3) -> relu(1-x) = (0.5, 0) -> 0.25;
  # fake patches (-0.5, -3) -> relu(1+x) = (0.5, 0) -> 0.25; 0.5 * (0.25 + 0.25) = 0.25.
  real = jnp.array([[0.5, 3.0], [-1.0, -1.0]]).reshape(2, 1, 2, 1)
  fake = jnp.array([[-0.5, -3.0], [1.0, 1.0]]).reshape(2, 1, 2, 1)
  np.testing.assert_allclose(hinge_d_loss(real, fake), [0.25, 2.0])
  np.testing.assert_allclose(generator_adv_loss(fake), [1.75, -1.0])
