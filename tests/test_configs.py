"""Every config builds, is locked, and its models initialise (abstractly at paper scale);
presets set what they declare; every value validate_config refuses is a clear error."""
import glob
import importlib
import os
import re

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


def _flat(config, prefix=""):
  """{'section.field': value} of every leaf of a config."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


@pytest.mark.parametrize("preset", sorted(variants.PRESETS))
def test_a_preset_sets_its_declared_fields_and_nothing_else(preset):
  default, config = _flat(tiny.get_config()), tiny.get_config(preset)
  declared = variants.PRESETS[preset]
  assert set(declared) <= set(default), "a preset declares existing fields only"
  assert _flat(config) == {**default, **declared}
  if config.train.freeze in ("vae", "encoder"):
    config.train.vae_checkpoint = "/some/run"  # what the user or the study sets
  build.validate_config(config)


def test_rows_name_presets_and_stage1_presets_train_the_vae_alone():
  for row in variants.ROWS.values():
    assert row.name in variants.PRESETS
    if row.stage1:
      stage1, stage2 = variants.PRESETS[row.stage1], variants.PRESETS[row.name]
      assert stage1["train.freeze"] == "flow" and stage2["train.freeze"] in ("vae", "encoder")
      assert stage1["vae.posterior"] == stage2["vae.posterior"]  # the same VAE, loadable


def test_unknown_variant_is_an_error_naming_the_presets():
  with pytest.raises(ValueError, match="Unknown variant 'frozen'") as error:
    tiny.get_config("frozen")
  assert all(repr(name) in str(error.value) for name in variants.PRESETS)


def test_study_config_argument_selects_rows():
  config = importlib.import_module("configs.study_digits").get_config("simflow,sigma_0.1")
  assert tuple(config.study.rows) == ("simflow", "sigma_0.1")
  assert all(row in variants.ROWS for row in config.study.rows)


# (overrides of the base config, a fragment of the error): validate_config refuses each one
# with a ValueError that names the field to change.
CONFIG_ERRORS = [
    ({"train.freeze": "end2end"}, "config.train.freeze='end2end' is not one of"),
    ({"train.freeze": "vae"}, "set --config.train.vae_checkpoint="),
    ({"train.freeze": "encoder"}, "set --config.train.vae_checkpoint="),
    ({"train.freeze": "flow", "repa.enabled": True}, "set --config.repa.enabled=False"),
    ({"train.num_steps": -1}, "config.train.num_steps >= 0"),
    ({"train.grid_per_class": 0}, "config.train.grid_per_class must be >= 1"),
    ({"vae.posterior": "gaussian"}, "config.vae.posterior='gaussian' is not one of"),
    ({"vae.sigma_bar": 0.0}, "config.vae.sigma_bar must be > 0"),
    ({"data.source": "cifar"}, "config.data.source='cifar' is not one of"),
    ({"data.image_size": 30}, "data.image_size=30 must be divisible by the VAE factor"),
    ({"data.num_classes": 0}, "config.data.num_classes must be >= 1"),
    ({"data.batch_size": 0}, "config.data.batch_size must be >= 1"),
    ({"loss.flow_noise_std": -0.1}, "config.loss.flow_noise_std must be >= 0"),
    ({"loss.label_dropout": 1.5}, "config.loss.label_dropout must be in [0, 1]"),
    ({"loss.w_kl": -1.0}, "config.loss.w_kl must be >= 0"),
    ({"flow.scale": "sigmoid"}, "config.flow.scale='sigmoid' is not one of"),
    ({"flow.cond": "concat"}, "config.flow.cond='concat' is not one of"),
    ({"flow.cond_blocks": "shallow"}, "config.flow.cond_blocks='shallow' is not one of"),
    ({"flow.token0": "zero"}, "config.flow.token0='zero' is not one of"),
    ({"flow.shift_side": "middle"}, "config.flow.shift_side='middle' is not one of"),
    ({"flow.gelu": "relu"}, "config.flow.gelu='relu' is not one of"),
    ({"flow.null_class": "zero"}, "config.flow.null_class='zero' is not one of"),
    ({"flow.head_dim": 48}, "must be a multiple of flow.head_dim=48"),
    ({"flow.shift_side": "output", "flow.token0": "start_token"}, "set --config.flow.token0=shift"),
    ({"flow.ln_eps": 0.0}, "config.flow.ln_eps must be > 0"),
    ({"flow.layers": ()}, "config.flow.layers must be a non-empty list"),
    ({"flow.scan_unroll": 0}, "config.flow.scan_unroll must be an integer >= 1"),
    ({"optim.schedule": "linear"}, "config.optim.schedule='linear' is not one of"),
    ({"sample.guidance_rule": "cubic"}, "config.sample.guidance_rule='cubic' is not one of"),
    ({"sample.guidance_schedule": "cosine"}, "config.sample.guidance_schedule='cosine' is not one of"),
    ({"sample.guidance_blocks": "shallow"}, "config.sample.guidance_blocks='shallow' is not one of"),
    ({"sample.inverse": "dense"}, "config.sample.inverse='dense' is not one of"),
    ({"sample.guidance": -0.5}, "config.sample.guidance must be >= 0"),
    ({"flow.cond": "none", "sample.guidance": 1.0}, "set --config.sample.guidance=0"),
    ({"sample.jacobi_threshold": -1.0}, "jacobi_threshold and jacobi_max_iters must be >= 0"),
    ({"sample.kv_windows": 0}, "config.sample.kv_windows must be an integer >= 1"),
    ({"sample.temperature": 0.0}, "config.sample.temperature must be > 0"),
    ({"sample.classes": (1, 10)}, "config.sample.classes=(1, 10): class ids [10] are outside [0, 10)"),
    ({"sample.classes": (-2, 3)}, "config.sample.classes=(-2, 3): class ids [-2]"),
    ({"sample.num_samples": -1}, "config.sample.num_samples must be >= 0"),
    ({"repa.enabled": True, "repa.encoder": "clip"}, "config.repa.encoder='clip' is not one of"),
    ({"repa.enabled": True, "repa.layer": 9}, "config.repa.layer=9 is not a layer of flow block"),
]


@pytest.mark.parametrize("overrides, message", CONFIG_ERRORS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in CONFIG_ERRORS])
def test_bad_config_values_are_clear_errors(overrides, message):
  config = base.get_base_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    build.validate_config(config)
