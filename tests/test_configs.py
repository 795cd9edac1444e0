"""Every config builds, is locked, and its models initialise (abstractly at paper scale)."""
import glob
import importlib
import os

import jax
import numpy as np
import pytest

from configs import base, tiny, variants
from simflow_jax.models import build

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
               if os.path.basename(p) not in ("__init__.py", "base.py", "variants.py"))


def test_all_config_files_are_found():
  assert {"demo", "tiny", "imagenet256", "imagenet256_repae"} <= set(NAMES)


# configs/study_digits.py's argument names study rows, not a variant (tested below).
CASES = [(name, variant) for name in NAMES
         for variant in ("", "learned_variance", "noise_augmented", "frozen_encoder")
         if name != "study_digits" or not variant]


@pytest.mark.parametrize("name, variant", CASES)
def test_config_builds_and_initialises_abstractly(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  with pytest.raises(AttributeError):
    config.not_a_field = 1  # locked
  if variant == "frozen_encoder":
    with pytest.raises(ValueError, match="vae_checkpoint"):
      build.validate_config(config)
    config.train.vae_checkpoint = "/some/run"
  models = build.build_models(config)
  shapes = jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0))
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v)) for k, v in shapes.items()}
  assert counts["vae"] > 0 and counts["flow"] > 0
  for key, value in variants.PRESETS[variant or "end_to_end"].items():
    section, field = key.split(".")
    assert config[section][field] == value
  if name.startswith("imagenet256"):
    assert models.latent_hw == (16, 16) and models.token_shape == (256, 64)
    assert 8e8 < counts["flow"] < 1.5e9, counts  # ~1B-parameter flow (width 1152, 56 layers)
    assert 5e7 < counts["vae"] < 8e7, counts     # f16d64 VAE, ~65M


@pytest.mark.parametrize("preset", sorted(variants.PRESETS))
def test_every_preset_is_declared_settings_that_validate(preset):
  config = tiny.get_config(preset)
  assert not hasattr(config.train, "variant")
  if config.train.freeze in ("vae", "encoder"):
    config.train.vae_checkpoint = "/some/run"
  build.validate_config(config)
  expected = {"end_to_end": "none", "frozen_vae": "vae", "frozen_encoder": "encoder"}
  if preset in expected:
    assert config.train.freeze == expected[preset]


def test_rows_name_presets_and_stage1_presets_train_the_vae_alone():
  for row in variants.ROWS.values():
    assert row.name in variants.PRESETS
    if row.stage1:
      stage1, stage2 = variants.PRESETS[row.stage1], variants.PRESETS[row.name]
      assert stage1["train.freeze"] == "flow" and stage2["train.freeze"] in ("vae", "encoder")
      assert stage1["vae.posterior"] == stage2["vae.posterior"]  # the same VAE, loadable


def test_unknown_variant_is_an_error():
  from configs import demo
  with pytest.raises(ValueError, match="Unknown variant"):
    demo.get_config("frozen")


def test_base_config_validates():
  build.validate_config(base.get_base_config())


def test_study_config_argument_selects_rows():
  config = importlib.import_module("configs.study_digits").get_config("simflow,sigma_0.1")
  assert tuple(config.study.rows) == ("simflow", "sigma_0.1")
  assert all(row in variants.ROWS for row in config.study.rows)
