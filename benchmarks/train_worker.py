"""ml-tarflow's train step timed in its own process, for side-by-side runs of
benchmarks/train_throughput.py --tarflow_repo=PATH.

  python benchmarks/train_worker.py --tarflow_repo=PATH --config=tarflow256 --batch=32

Builds apple/ml-tarflow's transformer_flow.Model for the flow config (imported from
--tarflow_repo, never copied here; random non-trivial weights, common.tarflow_model) with
AdamW (lr 1e-4), then reads one JSON request per line on stdin, {"steps": N}, runs N
steps (model.get_loss on random inputs, backward, AdamW) and answers one JSON line:
{"seconds": [one per step]}.

Its own process because PyTorch in the JAX benchmark's process slows the JAX step (both
use the same cores and allocator; a torch step just before a JAX step also evicts its caches).
"""
import json
import sys
import time

from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)

_TARFLOW_REPO = flags.DEFINE_string("tarflow_repo", "", "Checkout of apple/ml-tarflow.")
_CONFIG = flags.DEFINE_string("config", "tarflow256", "Flow config (common.FLOW_CONFIGS).")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.")


def main(argv):
  del argv
  import torch  # noqa: PLC0415
  model = common.tarflow_model(_TARFLOW_REPO.value, _CONFIG.value).train()
  side = common.FLOW_CONFIGS[_CONFIG.value]
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x, y = torch.randn(_BATCH.value, 16, side, side), torch.arange(_BATCH.value) % 10

  def step():
    t0 = time.perf_counter()
    z, _, logdets = model(x, y)
    loss = model.get_loss(z, logdets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss.item()
    return time.perf_counter() - t0

  print(json.dumps({"ready": True}), flush=True)
  for line in sys.stdin:
    steps = int(json.loads(line)["steps"])
    print(json.dumps({"seconds": [step() for _ in range(steps)]}), flush=True)


if __name__ == "__main__":
  app.run(main)
