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


def validate_config(config) -> None:
  """Checks values a user can get wrong; errors say which field and what to set."""
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
