"""Every config builds, is locked, and its models initialise (abstractly at paper scale)."""
import glob
import importlib
import os

import jax
import numpy as np
import pytest

from configs import base
from simflow_jax.models import build

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
               if os.path.basename(p) not in ("__init__.py", "base.py", "variants.py"))


def test_all_config_files_are_found():
  assert {"demo", "tiny", "imagenet256", "imagenet256_repae"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("variant", ["", "learned_variance", "noise_augmented", "frozen_encoder"])
def test_config_builds_and_initialises_abstractly(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked
  if variant == "frozen_encoder":
    with config.unlocked():
      config.train.vae_checkpoint = "/some/run"
  models = build.build_models(config)
  shapes = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
  assert counts["vae"] > 0 and counts["flow"] > 0
  assert config.train.variant == (variant or "end_to_end")
  if variant in ("learned_variance", "noise_augmented"):
    assert config.vae.posterior == "learned"
  if name.startswith("imagenet256"):
    assert models.latent_hw == (16, 16) and models.token_shape == (256, 64)
    assert 8e8 < counts["flow"] < 1.5e9, counts  # ~1B-parameter flow (width 1152, 56 layers)
    assert 5e7 < counts["vae"] < 8e7, counts     # f16d64 VAE, ~65M


def test_unknown_variant_is_an_error():
  from configs import demo
  with pytest.raises(ValueError, match="Unknown variant"):
    demo.get_config("frozen")


def test_base_config_validates():
  build.validate_config(base.get_base_config())
