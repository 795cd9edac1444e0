"""The paper's variant study (Sec. 4.3, Fig. 5) as presets over declared settings.

A preset is a handful of plain config fields, never a name the code compares:
  train.freeze         none | vae | encoder | flow (flow = the VAE trains alone: stage 1)
  vae.posterior        learned | fixed | fixed_ln;  vae.sigma_bar (the fixed std)
  loss.flow_noise_std  Gaussian noise on the flow's input (0 = none; STARFlow 0.3)
  loss.flow_noise_relative  that std in units of the latent's std (train_step.flow_input)
  loss.decode_noisy    the decoder, where it trains, decodes those same noisy latents
  train.vae_checkpoint the run a frozen VAE / encoder comes from (set by the user or the study)
Use as a config argument: `--config=configs/demo.py:learned_variance`.

ROWS are the study's rows (simflow_jax/commands/study/): a preset, the stage-1 preset of a
two-stage row (its VAE trained alone first, once, shared by every row and seed that freezes
it), how many of study.seeds the row runs (its first ones), and the paper's numbers
(ImageNet 256, Fig. 5: rFID, PSNR, gFID without guidance) where the paper has the row.
STAGE1_ROWS are the stage-1 VAEs' own rows of the table (reconstruction and latents only).
PAIR is the close pair whose per-seed paired differences the report gives (first - second).
"""
import dataclasses
from typing import Optional

STAGE1 = {"train.freeze": "flow"}  # the VAE alone: reconstruction + KL of its posterior

NOISE = {"loss.flow_noise_std": 0.3, "loss.flow_noise_relative": True}  # 0.3 x the latent's std

PRESETS = {
    # The paper's gradient-path variants, one setting each (e.g. configs/imagenet256.py:frozen_vae).
    "end_to_end": {},
    "frozen_vae": {"train.freeze": "vae"},
    "frozen_encoder": {"train.freeze": "encoder"},
    "learned_variance": {"vae.posterior": "learned"},
    "noise_augmented": {"vae.posterior": "learned", "loss.flow_noise_std": 0.3},
    # Stage-1 VAEs of the two-stage rows.
    "vae_learned": {**STAGE1, "vae.posterior": "learned"},
    "vae_fixed": {**STAGE1, "vae.posterior": "fixed"},
    "vae_fixed_ln": {**STAGE1, "vae.posterior": "fixed_ln"},
    # The study's rows.
    "frozen_vae_learned": {"train.freeze": "vae", "vae.posterior": "learned"},
    "frozen_vae_fixed": {"train.freeze": "vae", "vae.posterior": "fixed"},
    "frozen_vae_fixed_ln": {"train.freeze": "vae", "vae.posterior": "fixed_ln"},
    "frozen_encoder_noise": {"train.freeze": "encoder", "vae.posterior": "learned", **NOISE},
    "end_to_end_noise": {"vae.posterior": "learned", **NOISE},
    "simflow": {"vae.posterior": "fixed", "vae.sigma_bar": 0.5},
    "end_to_end_learned": {"vae.posterior": "learned"},
    "sigma_0.1": {"vae.posterior": "fixed", "vae.sigma_bar": 0.1},
    "sigma_0.25": {"vae.posterior": "fixed", "vae.sigma_bar": 0.25},
    "sigma_1.0": {"vae.posterior": "fixed", "vae.sigma_bar": 1.0},
}


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  label: str                        # as in the paper's table: "config / method"
  stage1: Optional[str] = None      # PRESETS name of the VAE trained alone first
  paper: Optional[tuple] = None     # (rFID, PSNR, gFID w/o CFG), ImageNet 256, paper Fig. 5
  sigma_bar: Optional[float] = None  # fixed std of the end-to-end sweep (paper Fig. 3a)
  fig3a: bool = False               # drawn in the robustness figure (the sweep vs learnable var)
  seeds: int = 2                    # runs the first `seeds` of study.seeds


ROWS = {r.name: r for r in (
    Row("frozen_vae_learned", "frozen VAE / learnable var", "vae_learned", (0.23, 29.76, 84.44)),
    Row("frozen_vae_fixed", "frozen VAE / fixed var", "vae_fixed", (0.40, 27.54, 67.41)),
    Row("frozen_vae_fixed_ln", "frozen VAE / fixed var + LN", "vae_fixed_ln", (1.07, 24.43, 55.41)),
    Row("frozen_encoder_noise", "frozen encoder / noise", "vae_learned", (4.07, 19.94, 39.33)),
    Row("end_to_end_noise", "end-to-end / noise", None, (1.39, 23.20, 20.01), seeds=4),
    Row("simflow", "end-to-end / fixed var 0.5 (SimFlow)", None, (1.76, 22.61, 16.97), 0.5, True,
        seeds=4),
    Row("end_to_end_learned", "end-to-end / learnable var", fig3a=True, seeds=1),
    Row("sigma_0.1", "end-to-end / fixed var 0.1", sigma_bar=0.1, fig3a=True, seeds=1),
    Row("sigma_0.25", "end-to-end / fixed var 0.25", sigma_bar=0.25, fig3a=True, seeds=1),
    Row("sigma_1.0", "end-to-end / fixed var 1.0", sigma_bar=1.0, fig3a=True, seeds=1),
)}

STAGE1_ROWS = {r.name: r for r in (
    Row("vae_learned", "stage-1 VAE / learnable var", fig3a=True, seeds=1),
    Row("vae_fixed", "stage-1 VAE / fixed var 0.5", seeds=1),
    Row("vae_fixed_ln", "stage-1 VAE / fixed var 0.5 + LN", seeds=1),
)}

PAIR = ("simflow", "end_to_end_noise")


def apply_variant(config, name: str):
  """Sets the preset's fields on `config` (unlocked or locked: the fields exist)."""
  name = name or "end_to_end"
  if name not in PRESETS:
    raise ValueError(f"Unknown variant {name!r}; choose one of {tuple(PRESETS)}.")
  for key, value in PRESETS[name].items():
    section, field = key.split(".")
    config[section][field] = value
  return config
