"""Builds every model of a run from the config, and checks the config's values.

validate_config is the config boundary: every command (simflow_jax/commands/) runs it once,
before anything else it does, so every choice and range is checked in one place;
build_models trusts a validated config.

`jax.eval_shape(lambda r: init_params(models, r), rng)` gives the abstract tree with
no allocation (paper scale on a laptop).
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from configs import base
from simflow_jax.models import discriminator, flow as flow_lib, guidance, inverse, repa, vae as vae_lib

FREEZE = ("none", "vae", "encoder", "flow")
# The dimensions of the DINOv2 presets' tokens (pretrained/dinov2.py); models/ does not import it.
REPA_DIMS = {"dinov2_s14": 384, "dinov2_b14": 768, "dinov2_l14": 1024, "tiny": 64}


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"config.{name}={value!r} is not one of {tuple(allowed)}.")


def _check_classes(name, classes, num_classes) -> None:
  """A tuple of class ids in [0, num_classes) (empty: the default classes)."""
  ids = list(classes) if isinstance(classes, (tuple, list)) else None
  if ids is None or not all(isinstance(c, int) and not isinstance(c, bool) for c in ids):
    raise ValueError(f"config.{name}={classes!r} must be a tuple of class ids, e.g. "
                     f"--config.{name}='(1, 3)'.")
  bad = sorted({c for c in ids if not 0 <= c < num_classes})
  if bad:
    raise ValueError(f"config.{name}={tuple(ids)}: class ids {bad} are outside [0, {num_classes}); "
                     f"use ids 0..{num_classes - 1} (the null class {num_classes} is reserved for "
                     "guidance).")


# ---- ranges: every numeric field where some values make no sense (issue 27) --------------
# (field, lowest allowed, exclusive?, what the field means / what 0 does). The fields that
# accept 0 say what 0 means; configs/base.py documents the same ranges.
_LOWER_BOUNDS = (
    ("data.image_size", 1, False, "image side in pixels"),
    ("data.channels", 1, False, "image channels"),
    ("data.worker_count", 0, False, "grain worker processes; 0 = in-process"),
    ("vae.ch", 1, False, "VAE base channels"),
    ("vae.num_res_blocks", 0, False, "residual blocks per VAE level"),
    ("vae.z_channels", 1, False, "latent channels"),
    ("vae.sigma_bar", 0, True, "the fixed posterior's std"),
    ("disc.ch", 1, False, "discriminator base channels"),
    ("disc.n_layers", 1, False, "discriminator layers"),
    ("flow.patch_size", 1, False, "latent pixels per token side"),
    ("flow.width", 1, False, "transformer width"),
    ("flow.head_dim", 1, False, "attention head width"),
    ("flow.mlp_ratio", 0, True, "MLP width / transformer width"),
    ("flow.soft_clip", 0, True, "the softplus scale's clip c"),
    ("loss.gan_start_step", 0, False, "step the adversarial term starts at"),
    ("repa.layer", 1, False, "layer of repa.block whose output is aligned; layers count from 1"),
    ("repa.proj_hidden", 1, False, "REPA projector hidden width"),
    ("repa.w_flow", 0, False, "REPA weight towards the flow; 0 = none"),
    ("repa.w_vae", 0, False, "REPA weight towards the VAE encoder; 0 = none"),
    ("train.num_steps", 0, False, "training steps; 0 = none"),
    ("train.log_every", 1, False, "steps between metric logs"),
    ("train.ckpt_every", 1, False, "steps between checkpoints (one is always saved at the end)"),
    ("train.keep_ckpts", 1, False, "checkpoints kept on disk; fewer than 1 would keep no model"),
    ("train.sample_every", 0, False, "steps between sample grids; 0 = only at the end"),
    ("optim.lr_vae", 0, False, "VAE learning rate"),
    ("optim.lr_flow", 0, False, "flow learning rate"),
    ("optim.lr_disc", 0, False, "discriminator learning rate"),
    ("optim.eps", 0, True, "Adam epsilon"),
    ("optim.weight_decay", 0, False, "AdamW weight decay; 0 = none"),
    ("optim.warmup_steps", 0, False, "learning-rate warmup steps; 0 = none"),
    ("optim.grad_clip", 0, False, "global gradient-norm clip; 0 = no clipping"),
    ("mesh.fsdp", 1, False, "devices a parameter is split over; 1 = none"),
    ("mesh.fsdp_min_size", 0, False, "parameters with fewer elements stay replicated"),
    ("sample.batch_size", 1, False, "global batch per sampling step"),
    ("eval.classifier_steps", 1, False, "digit classifier training steps"),
    ("study.steps", 1, False, "the flow's steps in every study row"),
    ("study.stage1_steps", 1, False, "steps of a stage-1 VAE trained alone"),
    ("study.num_eval_examples", 0, False, "eval-split examples per evaluation; 0 = the whole split"),
    ("study.workers", 1, False, "processes running row-seeds at once"),
)
# (field, low, high): low <= value < high.
_HALF_OPEN = (
    ("optim.b1", 0.0, 1.0, "Adam beta1"),
    ("optim.b2", 0.0, 1.0, "Adam beta2"),
    ("optim.ema_decay", 0.0, 1.0, "EMA decay per step; 0 = the EMA is the raw parameters"),
)


def _field(config, name):
  node = config
  for part in name.split("."):
    node = node[part]
  return node


def _check_ranges(config) -> None:
  """Refuses numbers that would lose the model, divide by zero or mean nothing, before
  anything runs: one message naming the field, its meaning and its valid range."""
  for name, low, exclusive, meaning in _LOWER_BOUNDS:
    value = _field(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"config.{name} must be a number ({meaning}), got {value!r}.")
    if value < low or exclusive and value == low:
      bound = f"> {low}" if exclusive else f">= {low}"
      raise ValueError(f"config.{name} must be {bound} ({meaning}), got {value}.")
  for name, low, high, meaning in _HALF_OPEN:
    value = _field(config, name)
    if not low <= value < high:
      raise ValueError(f"config.{name} must be in [{low:g}, {high:g}) ({meaning}), got {value}.")
  v, m, st = config.vae, config.mesh, config.study
  if not v.ch_mult or any(not isinstance(k, int) or k < 1 for k in v.ch_mult):
    raise ValueError(f"config.vae.ch_mult must be a non-empty tuple of channel multipliers >= 1, "
                     f"got {v.ch_mult!r}.")
  if m.data != -1 and m.data < 1:
    raise ValueError(f"config.mesh.data must be >= 1 data-parallel devices, or -1 for all remaining "
                     f"devices, got {m.data}.")
  if not st.seeds:
    raise ValueError("config.study.seeds must name at least one seed, e.g. --config.study.seeds='(0,)'.")


def validate_config(config) -> None:
  """Checks values a user can get wrong; errors say which field and what to set."""
  _check_ranges(config)
  d, v, f, t, l, s = config.data, config.vae, config.flow, config.train, config.loss, config.sample
  _choice("train.freeze", t.freeze, FREEZE)
  _choice("vae.posterior", v.posterior, vae_lib.POSTERIORS)
  _choice("data.source", d.source, ("mnist5k", "imagefolder", "tfds", "synthetic"))
  if t.freeze in ("vae", "encoder") and not t.vae_checkpoint:
    raise ValueError(f"train.freeze={t.freeze!r} freezes a pretrained VAE: set "
                     "--config.train.vae_checkpoint=WORKDIR_OF_A_VAE_RUN.")
  if t.freeze == "flow" and config.repa.enabled:
    raise ValueError("train.freeze='flow' trains the VAE alone; REPA-E aligns flow features: "
                     "set --config.repa.enabled=False for a stage-1 VAE run.")
  if l.flow_noise_std < 0:
    raise ValueError(f"config.loss.flow_noise_std must be >= 0 (0 = no noise), got {l.flow_noise_std}.")
  if v.sigma_bar <= 0:
    raise ValueError(f"config.vae.sigma_bar must be > 0, got {v.sigma_bar}.")
  f_down = 2 ** (len(v.ch_mult) - 1)
  if d.image_size % (f_down * f.patch_size):
    raise ValueError(f"data.image_size={d.image_size} must be divisible by the VAE factor {f_down} "
                     f"times flow.patch_size={f.patch_size}.")
  if d.num_classes < 1:
    raise ValueError(f"config.data.num_classes must be >= 1, got {d.num_classes}.")
  if not isinstance(f.scan_unroll, int) or f.scan_unroll < 1:
    raise ValueError(f"config.flow.scan_unroll must be an integer >= 1 (layers per scan iteration), "
                     f"got {f.scan_unroll!r}.")
  if not 0.0 <= l.label_dropout <= 1.0:
    raise ValueError(f"config.loss.label_dropout must be in [0, 1], got {l.label_dropout}.")
  for name in (k for k in l if k.startswith("w_")):
    if l[name] < 0:
      raise ValueError(f"config.loss.{name} must be >= 0, got {l[name]}.")
  for name, allowed in (("cond", flow_lib.CONDS), ("cond_blocks", flow_lib.COND_BLOCKS),
                        ("token0", flow_lib.TOKEN0S), ("scale", flow_lib.SCALES),
                        ("shift_side", flow_lib.SHIFT_SIDES), ("gelu", flow_lib.GELUS),
                        ("null_class", flow_lib.NULL_CLASSES)):
    _choice(f"flow.{name}", f[name], allowed)
  if f.width % f.head_dim:
    raise ValueError(f"config.flow.width={f.width} must be a multiple of flow.head_dim={f.head_dim}.")
  if f.shift_side == "output" and f.token0 != "shift":
    raise ValueError("config.flow.shift_side='output' feeds x_0 at position 0 and never reads a start "
                     f"token: set --config.flow.token0=shift (got {f.token0!r}).")
  if not f.ln_eps > 0:
    raise ValueError(f"config.flow.ln_eps must be > 0, got {f.ln_eps}.")
  if not f.layers or any(n < 1 for n in f.layers):
    raise ValueError(f"config.flow.layers must be a non-empty list of positive layer counts, got {f.layers}.")
  if d.batch_size < 1 or t.num_steps < 0:
    raise ValueError("config.data.batch_size must be >= 1 and config.train.num_steps >= 0.")
  _choice("optim.schedule", config.optim.schedule, ("cosine", "constant"))
  _choice("sample.guidance_rule", s.guidance_rule, guidance.RULES)
  _choice("sample.guidance_schedule", s.guidance_schedule, guidance.SCHEDULES)
  _choice("sample.guidance_blocks", s.guidance_blocks, guidance.BLOCKS)
  _choice("sample.inverse", s.inverse, tuple(m for m in inverse.METHODS if m != "dense"))
  _choice("sample.kv_cache_dtype", s.kv_cache_dtype, tuple(inverse.KV_CACHE_DTYPES))
  if s.guidance < 0:
    raise ValueError(f"config.sample.guidance must be >= 0 (0 = no guidance), got {s.guidance}.")
  if s.guidance > 0 and f.cond == "none":
    raise ValueError("config.sample.guidance > 0 needs a class-conditional flow (flow.cond='none' here): "
                     "set --config.sample.guidance=0.")
  if s.jacobi_chunk < 0 or s.jacobi_threshold < 0 or s.jacobi_max_iters < 0:
    raise ValueError("config.sample.jacobi_chunk, jacobi_threshold and jacobi_max_iters must be >= 0 "
                     f"(0 = whole sequence / exact / chunk length), got {s.jacobi_chunk}, "
                     f"{s.jacobi_threshold}, {s.jacobi_max_iters}.")
  if not isinstance(s.kv_windows, int) or s.kv_windows < 1:
    raise ValueError(f"config.sample.kv_windows must be an integer >= 1 (1 = one cache window over the "
                     f"whole sequence), got {s.kv_windows!r}.")
  if s.temperature <= 0:
    raise ValueError(f"config.sample.temperature must be > 0, got {s.temperature}.")
  _check_classes("sample.classes", s.classes, d.num_classes)
  for name, value, least, meaning in (("train.grid_per_class", t.grid_per_class, 1, "grid columns"),
                                      ("sample.num_samples", s.num_samples, 0, "0 = grid only"),
                                      ("dry_run.devices", config.dry_run.devices, 0, "0 = local")):
    if value < least:
      raise ValueError(f"config.{name} must be >= {least} ({meaning}), got {value}.")
  if not 0 < config.dry_run.mfu <= 1:
    raise ValueError(f"config.dry_run.mfu must be in (0, 1], got {config.dry_run.mfu}.")
  validate_evals(config)
  if config.repa.enabled:
    _choice("repa.encoder", config.repa.encoder, tuple(REPA_DIMS))
    n = len(f.layers)
    k = config.repa.block % n
    if not 1 <= config.repa.layer <= f.layers[k]:
      raise ValueError(f"config.repa.layer={config.repa.layer} is not a layer of flow block {k} "
                       f"(it has {f.layers[k]} layers).")


def validate_evals(config) -> None:
  """config.evals: NAME -> ConfigDict(type=..., fields of that type in configs/base.EVAL_TYPES)."""
  for name, entry in config.evals.items():
    where = f"config.evals.{name}"
    if not hasattr(entry, "keys") or "type" not in entry:
      raise ValueError(f"{where} must be an evaluator entry with a type, e.g. "
                       f"configs/base.evaluator('likelihood'); got {entry!r}.")
    _choice(f"evals.{name}.type", entry.type, tuple(base.EVAL_TYPES))
    fields = base.EVAL_TYPES[entry.type]
    for key in entry:
      if key != "type" and key not in fields:
        raise ValueError(f"{where}.{key}: not a field of evaluator type {entry.type!r} "
                         f"(its fields: {', '.join(fields)}).")
    for key in ("every_steps", "num_examples", "num_samples", "num_images", "num_pairs",
                "num_frames", "max_examples"):
      if key in entry and entry[key] < 0:
        raise ValueError(f"{where}.{key} must be >= 0, got {entry[key]}.")
    if entry.type == "generation":
      _choice(f"evals.{name}.metrics", entry.metrics, ("auto", "inception", "digits"))
    if entry.type == "interpolation" and entry.get("num_images", 2) < 2:
      raise ValueError(f"{where}.num_images must be >= 2 (pairs of images).")


@dataclasses.dataclass(frozen=True)
class Models:
  vae: vae_lib.VAE
  flow: flow_lib.Flow
  disc: Optional[discriminator.PatchDiscriminator]
  projector: Optional[repa.Projector]
  image_size: int
  channels: int
  num_classes: int
  latent_hw: tuple[int, int]
  latent_channels: int
  patch_size: int

  @property
  def token_shape(self) -> tuple[int, int]:
    return self.flow.seq_len, self.flow.token_dim

  def to_tokens(self, latents):
    """(B, h, w, c) -> (B, T, p*p*c)."""
    return flow_lib.patchify(latents, self.patch_size)

  def to_latents(self, tokens):
    """(B, T, p*p*c) -> (B, h, w, c)."""
    return flow_lib.unpatchify(tokens, self.patch_size, *self.latent_hw)


def build_models(config) -> Models:
  """The models of a config validated by validate_config."""
  d = config.data
  vae = vae_lib.VAE.from_config(config.vae, d.channels)
  f = vae.downsample_factor
  latent_hw = (d.image_size // f, d.image_size // f)
  flow = flow_lib.Flow.from_config(config.flow, latent_hw, config.vae.z_channels, d.num_classes)
  disc = discriminator.PatchDiscriminator.from_config(config.disc) if config.loss.w_gan > 0 else None
  projector = None
  if config.repa.enabled:
    projector = repa.Projector(hidden=config.repa.proj_hidden, out_dim=REPA_DIMS[config.repa.encoder])
  return Models(vae=vae, flow=flow, disc=disc, projector=projector, image_size=d.image_size,
                channels=d.channels, num_classes=d.num_classes, latent_hw=latent_hw,
                latent_channels=config.vae.z_channels, patch_size=config.flow.patch_size)


def init_params(models: Models, rng) -> dict:
  """Fresh parameters for every trainable model."""
  k_vae, k_flow, k_disc, k_proj, k_eps = jax.random.split(rng, 5)
  images = jnp.zeros((1, models.image_size, models.image_size, models.channels), jnp.float32)
  params = {"vae": models.vae.init(k_vae, images, k_eps)["params"]}
  tokens = jnp.zeros((1, *models.token_shape), jnp.float32)
  params["flow"] = models.flow.init(k_flow, tokens, jnp.zeros((1,), jnp.int32))["params"]
  if models.disc is not None:
    params["disc"] = models.disc.init(k_disc, images)["params"]
  if models.projector is not None:
    params["repa_proj"] = models.projector.init(
        k_proj, jnp.zeros((1, 1, models.flow.width), jnp.float32))["params"]
  return params
