"""Every config builds, is locked, and its models initialise (abstractly at paper scale);
presets set what they declare; every value validate_config refuses is a clear error."""
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


# configs/study_digits.py's argument names study rows, not a variant (tested below). Every
# config plain; the variants on tiny and at paper scale (imagenet256), the rest slow.
CASES = [(name, variant) if not variant or name in ("tiny", "imagenet256")
         else pytest.param(name, variant, marks=pytest.mark.slow)
         for name in NAMES for variant in ("", "learned_variance", "noise_augmented", "frozen_encoder")
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
    ({"vae.posterior": "gaussian"}, "config.vae.posterior='gaussian' is not one of"),
    ({"data.source": "cifar"}, "config.data.source='cifar' is not one of"),
    ({"data.image_size": 30}, "data.image_size=30 must be divisible by the VAE factor"),
    ({"data.num_classes": 0}, "config.data.num_classes must be >= 1"),
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
    ({"sample.kv_cache_dtype": "float16"}, "config.sample.kv_cache_dtype='float16' is not one of"),
    ({"sample.guidance": -0.5}, "config.sample.guidance must be >= 0"),
    ({"flow.cond": "none", "sample.guidance": 1.0}, "set --config.sample.guidance=0"),
    ({"sample.classes": (1, 10)}, "config.sample.classes=(1, 10): class ids [10] are outside [0, 10)"),
    ({"sample.classes": (-2, 3)}, "config.sample.classes=(-2, 3): class ids [-2]"),
    ({"repa.enabled": True, "repa.encoder": "clip"}, "config.repa.encoder='clip' is not one of"),
    ({"repa.enabled": True, "repa.layer": 9}, "config.repa.layer=9 is not a layer of flow block"),
]


# Numbers that would lose the model, divide by zero or mean nothing (field, value, the words
# the message must hold beside the field's name).
RANGE_ERRORS = [
    ("train.keep_ckpts", 0, ">= 1"),
    ("train.keep_ckpts", -1, ">= 1"),
    ("train.ckpt_every", 0, ">= 1"),
    ("train.log_every", 0, ">= 1"),
    ("train.num_steps", -5, ">= 0"),
    ("train.sample_every", -1, ">= 0"),
    ("train.grid_per_class", 0, ">= 1"),
    ("data.batch_size", 0, ">= 1"),
    ("data.image_size", 0, ">= 1"),
    ("data.worker_count", -1, ">= 0"),
    ("sample.batch_size", 0, ">= 1"),
    ("sample.num_samples", -1, ">= 0"),
    ("sample.jacobi_chunk", -1, ">= 0"),
    ("sample.kv_windows", 0, ">= 1"),
    ("sample.temperature", 0.0, "> 0"),
    ("eval.classifier_steps", 0, ">= 1"),
    ("optim.warmup_steps", -1, ">= 0"),
    ("optim.ema_decay", 1.0, "[0, 1)"),
    ("optim.ema_decay", -0.1, "[0, 1)"),
    ("optim.b2", 1.0, "[0, 1)"),
    ("optim.eps", 0.0, "> 0"),
    ("optim.lr_flow", -1e-4, ">= 0"),
    ("optim.grad_clip", -1.0, ">= 0"),
    ("vae.sigma_bar", 0.0, "> 0"),
    ("vae.ch_mult", (), "non-empty"),
    ("vae.z_channels", 0, ">= 1"),
    ("flow.head_dim", 0, ">= 1"),
    ("flow.patch_size", 0, ">= 1"),
    ("flow.mlp_ratio", 0, "> 0"),
    ("repa.layer", 0, "count from 1"),
    ("mesh.fsdp", 0, ">= 1"),
    ("mesh.data", 0, "-1"),
    ("study.steps", 0, ">= 1"),
    ("study.workers", 0, ">= 1"),
    ("study.seeds", (), "at least one seed"),
    ("study.stage1_steps", 0, ">= 1"),
    ("study.num_eval_examples", -1, ">= 0"),
]

# Values at the edge that mean something ("off", "none", "all") and must stay allowed.
ALLOWED = [
    ("train.num_steps", 0), ("train.sample_every", 0),
    ("sample.num_samples", 0), ("sample.jacobi_chunk", 0), ("sample.jacobi_max_iters", 0),
    ("optim.warmup_steps", 0), ("optim.grad_clip", 0.0), ("optim.weight_decay", 0.0),
    ("optim.ema_decay", 0.0), ("data.worker_count", 0), ("study.num_eval_examples", 0),
    ("mesh.data", -1), ("repa.w_flow", 0.0), ("train.keep_ckpts", 1), ("train.ckpt_every", 1),
]


ERRORS = CONFIG_ERRORS + [({name: value}, (f"config.{name}", words)) for name, value, words in RANGE_ERRORS]


def _set(config, name, value):
  section, field = name.split(".")
  config[section][field] = value


@pytest.mark.parametrize("overrides, message", ERRORS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in ERRORS])
def test_bad_config_values_are_clear_errors(overrides, message):
  config = base.get_base_config()
  for key, value in overrides.items():
    _set(config, key, value)
  with pytest.raises(ValueError) as e:
    build.validate_config(config)
  text = str(e.value)
  for fragment in (message,) if isinstance(message, str) else message:
    assert fragment in text, text
  assert "\n" not in text


@pytest.mark.parametrize("name,value", ALLOWED, ids=[f"{n}={v}" for n, v in ALLOWED])
def test_zero_means_off_allowed(name, value):
  config = base.get_base_config()
  _set(config, name, value)
  build.validate_config(config)
