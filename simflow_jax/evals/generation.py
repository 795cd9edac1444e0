"""Evaluator type 'generation': samples' quality against the eval split, and rFD/rFID.

num_samples class-conditional samples (labels i % num_classes, noise fold_in(key(seed), 1):
the same at every call, so a training curve moves only with the parameters), drawn with
config.sample (guidance: the entry's, or sample.guidance when it is < 0). Their features
(evals/evaluators.py: Inception, the digit classifier, or none with a note) are compared with
those of the eval split's first num_examples images (0 = all), of decode(x) and of decode(mu):
FID/sFID/IS/precision/recall and rFID, or digit FD, class accuracy and digit rFD.
Figure: NAME.png, the first up to 100 samples.
"""
import copy

import jax
import numpy as np

from simflow_jax import sample
from simflow_jax.evals import context, evaluators, figures

MAX_GRID_SAMPLES = 100


def feature_evaluator(entry, ctx: context.Context):
  """The entry's feature network: metrics auto | inception | digits (evals/evaluators.py)."""
  config = ctx.config
  if entry.metrics == "inception":
    if not config.eval.inception_weights:
      raise ValueError("an evaluator with metrics='inception' needs "
                       "--config.eval.inception_weights=/path/to/inception_fid.msgpack.")
    return evaluators.InceptionEvaluator(config, mesh=ctx.mesh)
  if entry.metrics == "digits":
    return evaluators.DigitEvaluator(evaluators.classifier_dir(config, ctx.workdir),
                                     config.eval.classifier_steps, config.seed, mesh=ctx.mesh)
  return evaluators.make_evaluator(config, ctx.workdir, mesh=ctx.mesh)


class GenerationEvaluator:

  def __init__(self, name: str, entry, ctx: context.Context):
    self.name, self.entry, self.ctx = name, entry, ctx
    self.features = feature_evaluator(entry, ctx)
    self.sample_cfg = copy.deepcopy(ctx.config.sample)
    if entry.guidance >= 0:
      self.sample_cfg.guidance = float(entry.guidance)
    self.labels = context.class_balanced_labels(entry.num_samples, ctx.models.num_classes)
    self.sample_fn = None if isinstance(self.features, evaluators.SkippedEvaluator) else \
        sample.make_sample_fn(ctx.models, self.sample_cfg)
    self.reconstruct = context.vae_passes(ctx.models)["reconstruct"]
    self._grid = None

  def run(self, params) -> dict:
    c = self.ctx
    out = {"mode": self.features.name, "note": self.features.note,
           "guidance": float(self.sample_cfg.guidance)}
    if self.sample_fn is None:
      return {**out, **self.features.metrics({}, self.labels, {})}
    feats, grid = evaluators.Features(), []
    rng = jax.random.fold_in(jax.random.key(c.config.seed), 1)
    for images in context.sample_batches(self.sample_fn, params, self.labels, c.mesh,
                                         self.sample_cfg.batch_size, rng, what=f"{self.name} samples",
                                         stop=c.stop):
      if sum(len(g) for g in grid) < MAX_GRID_SAMPLES:
        grid.append(images)
      feats.add(self.features.features(images))
    self._grid = np.concatenate(grid)[:MAX_GRID_SAMPLES]
    split = {"real": evaluators.Features(), "recon": evaluators.Features(),
             "recon_mu": evaluators.Features()}
    for host in context.reconstructions(c, self.reconstruct, params["vae"], self.entry.num_examples):
      for part, key in (("real", "image"), ("recon", "recon"), ("recon_mu", "recon_mu")):
        split[part].add(self.features.features(host[key]))
    split = {k: v.get() for k, v in split.items()}
    if not split["real"]:
      raise ValueError(f"evaluator {self.name}: the eval split gave no examples.")
    metrics = self.features.metrics(feats.get(), self.labels, split)
    return {**out, "num_samples": int(self.labels.shape[0]), **metrics}

  def figures(self) -> dict:
    if self._grid is None:
      return {}
    nrow = min(self.ctx.models.num_classes, 10)
    return {f"{self.name}.png": lambda path: figures.save_image_grid(self._grid, path, nrow=nrow)}
