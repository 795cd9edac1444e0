"""What the evaluators share: the run's models and mesh, eval-split passes, jitted VAE passes.

An evaluator (evals/declared.py) is built once from the config with a `Context`; its device
work runs data-parallel on the mesh (sharding.py pads, shards and gathers), with the
parameters as they were restored (split over mesh.fsdp by the mesh rules: jit follows the
committed arrays), and the batches it gathers to the host feed the numpy metrics on every host.
Its passes log progress (progress.py) and, with `stop` (a signals.StopOnSignal: evaluate and
likelihood), end between two batches with progress.Stopped once a stop is agreed.
"""
import dataclasses
import math
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from simflow_jax import progress, sharding
from simflow_jax.data import pipeline, sources
from simflow_jax.models import build
from simflow_jax.models import vae as vae_lib


@dataclasses.dataclass(frozen=True)
class Context:
  config: object
  models: build.Models
  mesh: jax.sharding.Mesh
  workdir: str
  stop: Optional[object] = None  # a signals.StopOnSignal checked between batches, or None

  def eval_batches(self, num_examples: int, what: str = "eval split") -> Iterator[dict]:
    """Global batches {'image', 'label', 'mask'} of the eval split's first num_examples
    examples (0 = all), data.batch_size each (padding masked out), on the mesh."""
    d = self.config.data
    loader = pipeline.make_eval_loader(d, d.eval_split, d.batch_size, jax.process_index(),
                                       jax.process_count(), num_examples or None)
    bar = progress.Progress(what, eval_batch_count(d, self.split_size(num_examples)),
                            stop=self.stop)
    for batch in loader:
      yield sharding.global_batch(batch, self.mesh)
      bar.update()

  def split_size(self, num_examples: int) -> int:
    d = self.config.data
    return num_examples or len(sources.make_source(d, d.eval_split))

  def spread_images(self, num_examples: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` images (and labels) spread evenly over the eval split's first num_examples."""
    keep = set(spread_indices(self.split_size(num_examples), count).tolist())
    images, labels, seen = [], [], 0
    for gb in self.eval_batches(num_examples):
      host = sharding.fetch({"image": gb["image"], "label": gb["label"], "mask": gb["mask"]})
      m = host["mask"]
      n = int(m.sum())
      picked = [j for j in range(n) if seen + j in keep]
      images.append(host["image"][m][picked])
      labels.append(host["label"][m][picked])
      seen += n
    return np.concatenate(images), np.concatenate(labels)

  def batched(self, fn: Callable) -> Callable:
    """fn over a host array in device-multiple batches of data.batch_size (numpy out)."""
    chunk = sharding.device_multiple(self.config.data.batch_size)
    return lambda x: sharding.map_batches(fn, x, self.mesh, chunk)


def eval_batch_count(data_cfg, num_examples: int) -> int:
  """The number of global batches of pipeline.make_eval_loader over num_examples examples."""
  count = jax.process_count()
  per_host = math.ceil(num_examples / count)
  return math.ceil(per_host / pipeline.per_host_batch_size(data_cfg.batch_size, count))


def spread_indices(total: int, count: int) -> np.ndarray:
  """`count` indices spread evenly over range(total) (all of them when total <= count)."""
  if total <= count:
    return np.arange(total)
  return np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))


def vae_passes(models) -> dict:
  """Jitted VAE passes of `models` (an evaluator keeps the ones it uses):
  encode_mu(vae, images) -> mu; decode(vae, latents) -> images clipped to [-1, 1];
  reconstruct(vae, images, rng) -> {mu, x = mu + std * eps, recon = decode(x), recon_mu}."""
  def encode_mu(vae, images):
    return models.vae.apply({"params": vae}, images, method=vae_lib.VAE.encode).mu

  def decode(vae, latents):
    return jnp.clip(models.vae.apply({"params": vae}, latents, method=vae_lib.VAE.decode), -1, 1)

  def reconstruct(vae, images, rng):
    posterior = models.vae.apply({"params": vae}, images, method=vae_lib.VAE.encode)
    x = vae_lib.sample_latents(posterior, rng, models.vae.sigma_bar)  # (B, h, w, c)
    return {"mu": posterior.mu, "x": x, "recon": decode(vae, x), "recon_mu": decode(vae, posterior.mu)}

  return {"encode_mu": jax.jit(encode_mu), "decode": jax.jit(decode),
          "reconstruct": jax.jit(reconstruct)}


def reconstructions(ctx: Context, reconstruct: Callable, vae, num_examples: int) -> Iterator[dict]:
  """Host batches {image, label, mu, x, recon, recon_mu} (padding dropped) of the eval split;
  batch i's posterior noise is fold_in(key(seed + 1), i): reruns agree."""
  key = jax.random.key(ctx.config.seed + 1)
  vae = sharding.on_mesh(vae, ctx.mesh)
  for i, gb in enumerate(ctx.eval_batches(num_examples, "reconstructions")):
    out = reconstruct(vae, gb["image"], jax.random.fold_in(key, i))
    host = sharding.fetch({**out, "image": gb["image"], "label": gb["label"], "mask": gb["mask"]})
    m = host.pop("mask")
    if m.any():
      yield {k: v[m] for k, v in host.items()}


def class_balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """(num_samples,) int32: sample i has class i % num_classes."""
  if num_samples < 1:
    raise ValueError(f"an evaluator's num_samples must be >= 1, got {num_samples}.")
  return (np.arange(num_samples) % num_classes).astype(np.int32)


def sample_batches(sample_fn: Callable, params, labels: np.ndarray, mesh, batch_size: int,
                   rng: jax.Array, what: str = "samples", stop=None) -> Iterator[np.ndarray]:
  """Yields the samples of labels (N,) as numpy images (b, H, W, C) in [-1, 1], in batches of
  batch_size rounded up to the device count (the last one padded, then trimmed). sample_fn is
  sample.make_sample_fn's; params are used where they are on the mesh (e.g. split over fsdp),
  replicated on it otherwise. Batch j uses fold_in(rng, j). Progress is logged as `what`;
  `stop`: progress.Stopped between batches once a stop is agreed."""
  chunk = sharding.device_multiple(batch_size)
  params = sharding.on_mesh(params, mesh)
  bar = progress.Progress(what, -(-labels.shape[0] // chunk), stop=stop)
  for j, start in enumerate(range(0, labels.shape[0], chunk)):
    part = labels[start:start + chunk]
    padded = sharding.shard_host_array(mesh, sharding.pad_batch(part, chunk))
    yield sharding.fetch(sample_fn(params, padded, jax.random.fold_in(rng, j)))[:part.shape[0]]
    bar.update()


def finite_or_none(tree):
  """Floats for JSON: numpy scalars -> python, NaN/inf -> None."""
  if isinstance(tree, dict):
    return {k: finite_or_none(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [finite_or_none(v) for v in tree]
  if isinstance(tree, (float, np.floating)):
    return float(tree) if math.isfinite(tree) else None
  if isinstance(tree, np.integer):
    return int(tree)
  return tree


def first_images(ctx: Context, num_examples: int) -> np.ndarray:
  """The eval split's first num_examples images, (N, H, W, C) numpy on every host."""
  parts = []
  for gb in ctx.eval_batches(num_examples):
    host = sharding.fetch({"image": gb["image"], "mask": gb["mask"]})
    parts.append(host["image"][host["mask"]])
  return np.concatenate(parts)


