"""Jacobi and selective decoding against sequential decoding on a trained checkpoint: speed and quality.

  python main.py --workdir=/tmp/demo                    # train the CPU demo first (configs/demo.py)
  python benchmarks/selective_quality.py --workdir=/tmp/demo
  python benchmarks/selective_quality.py --workdir=DIR --config=configs/demo.py \
      --methods=cached,selective:1e-3,selective:1e-2,jacobi:1e-3 --seeds=0,1,2 --num_samples=1000

Each --methods entry is INVERSE[:THRESHOLD] (config.sample.inverse, jacobi_threshold;
--jacobi_chunk for every entry). Every entry samples the same --num_samples class-balanced
digits (labels i % num_classes) from the same noise per seed, with config.sample's
guidance and temperature; the token inverse alone is compiled once and then timed batch by
batch (the VAE decoder and the classifier are not timed). Samples are decoded by the VAE
and scored by the digit classifier (simflow_jax/evals/evaluators.py): digit FD against
--num_real eval-split digits and class accuracy. Needs the embedded-digits evaluator
(data.source='mnist5k' and no eval.inception_weights).

Prints one JSON object {"machine", "workdir", "checkpoint_step", "config": {guidance,
batch_size, jacobi_chunk, kv_windows}, "results"}. Per entry: compile_s, seconds (the
token inverse over all batches, median over seeds), seconds_per_seed, speedup_vs_cached,
mean_steps (Jacobi iterations per chunk, or tokens per chunk for a sequential block),
digit_fd and digit_class_accuracy (mean, std and values over seeds), max_token_diff
(the largest |tokens - cached tokens| over all samples and seeds).
"""
import copy
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)
from simflow_jax import checkpoint, sample, sharding
from simflow_jax.evals import context, evaluators
from simflow_jax.models import build, inverse as inverse_lib, vae as vae_lib

_CONFIG = config_flags.DEFINE_config_file("config", f"{common.ROOT}/configs/demo.py",
                                          "The run's config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained run (its latest checkpoint).",
                               required=True)
_METHODS = flags.DEFINE_list("methods", ["cached", "selective:1e-3", "selective:1e-2"],
                             "INVERSE[:THRESHOLD] entries; a cached one (run first) is the reference.")
_CHUNK = flags.DEFINE_integer("jacobi_chunk", 0, "Jacobi chunk (0 = the whole sequence).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Noise seeds.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Samples per seed and entry.")
_NUM_REAL = flags.DEFINE_integer("num_real", 500, "Eval-split digits for the digit FD (the embedded split holds 500).")


def parse_method(entry: str) -> tuple[str, float]:
  name, _, threshold = entry.partition(":")
  if name not in inverse_lib.METHODS or name == "dense":
    raise app.UsageError(f"--methods entry {entry!r}: the inverse must be one of cached, jacobi, selective.")
  return name, float(threshold or 0.0)


def main(argv):
  del argv
  config = _CONFIG.value
  entries = sorted([(e, *parse_method(e)) for e in _METHODS.value], key=lambda e: e[1] != "cached")
  if entries[0][1] != "cached":
    raise app.UsageError("--methods needs a 'cached' entry: the reference for speed and tokens.")
  build.validate_config(config)
  models = build.build_models(config)
  evaluator = evaluators.make_evaluator(config, _WORKDIR.value)
  if not isinstance(evaluator, evaluators.DigitEvaluator):
    raise app.UsageError("this benchmark scores digits: it needs data.source='mnist5k' and no "
                         f"eval.inception_weights (the evaluator here is {evaluator.name!r}).")
  params = jax.device_put(checkpoint.load_params(_WORKDIR.value, config, use_ema=True))
  step = checkpoint.Checkpointer(_WORKDIR.value, config, read_only=True).latest_step()
  mesh = sharding.make_mesh(config.mesh)
  ctx = context.Context(config=config, models=models, mesh=mesh, workdir=_WORKDIR.value)
  real_pool = evaluator.features(context.first_images(ctx, _NUM_REAL.value))["pool"]
  labels = context.class_balanced_labels(_NUM_SAMPLES.value, models.num_classes)
  batch = config.sample.batch_size
  batches = [labels[i:i + batch] for i in range(0, len(labels), batch)]

  @jax.jit
  def decode(vae_params, tokens):
    latents = models.to_latents(tokens)  # (B, h, w, c)
    return jnp.clip(models.vae.apply({"params": vae_params}, latents, method=vae_lib.VAE.decode), -1.0, 1.0)

  results, reference = {}, {}
  for entry, name, threshold in entries:
    cfg = copy.deepcopy(config.sample)
    cfg.inverse, cfg.jacobi_threshold, cfg.jacobi_chunk = name, threshold, _CHUNK.value
    fn = jax.jit(lambda p, y, rng, cfg=cfg: sample.sample_tokens(models, p, y, rng, cfg))
    t0 = time.perf_counter()
    compiled = {len(b): fn.lower(params["flow"], jnp.asarray(b), jax.random.key(0)).compile()
                for b in batches[:1] + batches[-1:]}
    compile_s = time.perf_counter() - t0
    out = {"compile_s": compile_s, "seconds_per_seed": [], "digit_fd_values": [],
           "digit_class_accuracy_values": [], "steps": [], "max_token_diff": 0.0}
    for seed in map(int, _SEEDS.value):
      seconds, feats, tokens_all = 0.0, evaluators.Features(), []
      for i, y in enumerate(batches):
        rng = jax.random.fold_in(jax.random.key(seed), i)
        t0 = time.perf_counter()
        tokens, aux = jax.block_until_ready(compiled[len(y)](params["flow"], jnp.asarray(y), rng))
        seconds += time.perf_counter() - t0
        out["steps"].append(np.asarray(aux["steps"]).mean())
        tokens_all.append(np.asarray(tokens))
        feats.add(evaluator.features(decode(params["vae"], tokens)))
      tokens_all = np.concatenate(tokens_all)
      if name == "cached" and seed not in reference:
        reference[seed] = tokens_all
      out["max_token_diff"] = max(out["max_token_diff"], float(np.abs(tokens_all - reference[seed]).max()))
      m = evaluator.sample_metrics(feats.get(), labels, real_pool)
      out["seconds_per_seed"].append(seconds)
      out["digit_fd_values"].append(m["digit_fd"])
      out["digit_class_accuracy_values"].append(m["digit_class_accuracy"])
    for key in ("digit_fd", "digit_class_accuracy"):
      values = out[f"{key}_values"]
      out[key] = statistics.fmean(values)
      out[f"{key}_std"] = statistics.pstdev(values)
    out["seconds"] = statistics.median(out["seconds_per_seed"])
    out["mean_steps"] = float(np.mean(out.pop("steps")))
    results[entry] = out
  cached = next(results[e]["seconds"] for e, name, _ in entries if name == "cached")
  for out in results.values():
    out["speedup_vs_cached"] = cached / out["seconds"]
  common.emit({"machine": common.machine(), "workdir": _WORKDIR.value, "checkpoint_step": step,
               "config": {"guidance": float(config.sample.guidance), "batch_size": batch,
                          "jacobi_chunk": _CHUNK.value, "kv_windows": int(config.sample.kv_windows),
                          "num_samples": _NUM_SAMPLES.value, "num_real": _NUM_REAL.value},
               "results": results})


if __name__ == "__main__":
  app.run(main)
