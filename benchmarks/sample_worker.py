"""A sampler timed in its own process, for side-by-side runs of benchmarks/sample_throughput.py.

  python benchmarks/sample_worker.py --impl=baseline --baseline_repo=OLD_CHECKOUT --config=tarflow256
  python benchmarks/sample_worker.py --impl=tarflow --tarflow_repo=PATH --config=tarflow256

Reads one JSON request per line on stdin, {"batch": B, "guidance": W}, runs that
sampler once (compiling it at its first request) and answers one JSON line:
{"seconds": ..., "compile_s": ...}. Implementations:
  baseline  simflow_jax of --baseline_repo, a checkout of commit 4746437 (the cached
            flow.inverse with sample.guide_for_block), an earlier sampler of this project;
  tarflow   apple/ml-tarflow's transformer_flow.Model.reverse (PyTorch, KV cache by
            torch.cat), imported from --tarflow_repo, never copied here.
Both sample the flow config with random non-trivial weights (common.random_params,
common.tarflow_model) from standard-normal noise tokens.
"""
import json
import sys
import time

# The baseline's packages must shadow this checkout's: first on sys.path, before any import.
_BASELINE_PATHS = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--baseline_repo=") and a != "--baseline_repo="]
sys.path[:0] = _BASELINE_PATHS[:1]

from absl import app, flags  # noqa: E402

import common  # noqa: E402  (benchmarks/common.py)

_IMPL = flags.DEFINE_enum("impl", "baseline", ["baseline", "tarflow"], "Sampler implementation.")
_CONFIG = flags.DEFINE_string("config", "tarflow256", "Flow config (common.FLOW_CONFIGS).")
_TARFLOW_REPO = flags.DEFINE_string("tarflow_repo", "", "Checkout of apple/ml-tarflow.")
flags.DEFINE_string("baseline_repo", "", "Checkout of commit 4746437 (read before the imports).")


def baseline_sampler():
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from configs import base  # noqa: PLC0415
  from simflow_jax import sample  # noqa: PLC0415
  from simflow_jax.models import flow as flow_lib  # noqa: PLC0415
  assert sample.__file__.startswith(_BASELINE_PATHS[0]), sample.__file__
  flow, _, _ = common.flow_model(_CONFIG.value)
  tokens = jnp.zeros((1, flow.seq_len, flow.token_dim))
  params = common.random_params(jax.jit(flow.init)(jax.random.key(0), tokens, jnp.zeros((1,), jnp.int32))["params"])
  compiled = {}

  def run(batch, guidance):
    key = (batch, guidance)
    t0 = time.perf_counter()
    if key not in compiled:
      cfg = base.get_base_config().sample
      cfg.guidance = guidance
      guides = sample.guide_for_block(flow, cfg)
      fn = jax.jit(lambda p, z, y: flow_lib.inverse(flow, p, z, y, "cached", guides))
      z = jax.ShapeDtypeStruct((batch, flow.seq_len, flow.token_dim), jnp.float32)
      compiled[key] = fn.lower(params, z, jax.ShapeDtypeStruct((batch,), jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    z = jax.random.normal(jax.random.key(batch), (batch, flow.seq_len, flow.token_dim))
    y = jnp.arange(batch, dtype=jnp.int32) % 10
    t0 = time.perf_counter()
    jax.block_until_ready(compiled[key](params, z, y))
    return time.perf_counter() - t0, compile_s

  return run


def tarflow_sampler():
  import torch  # noqa: PLC0415
  model = common.tarflow_model(_TARFLOW_REPO.value, _CONFIG.value).eval()
  side = common.FLOW_CONFIGS[_CONFIG.value]

  def run(batch, guidance):
    z = torch.randn(batch, side * side, 16)
    y = torch.arange(batch) % 10
    t0 = time.perf_counter()
    with torch.no_grad():
      model.reverse(z, y, guidance=guidance)
    return time.perf_counter() - t0, 0.0

  return run


def main(argv):
  del argv
  run = baseline_sampler() if _IMPL.value == "baseline" else tarflow_sampler()
  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    req = json.loads(line)
    seconds, compile_s = run(int(req["batch"]), float(req["guidance"]))
    print(json.dumps({"seconds": seconds, "compile_s": compile_s}), flush=True)


if __name__ == "__main__":
  app.run(main)
