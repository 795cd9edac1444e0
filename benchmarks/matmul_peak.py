"""The machine's dense-matmul rate: the yardstick for the train step's achieved FLOP/s.

  python benchmarks/matmul_peak.py [--size=2048 --reps=10 --dtype=float32 --num_devices=0]

Prints one JSON object: {"machine": {...}, "matmul": {size, dtype, devices, reps,
flops_per_call, flops_per_s (median call), flops_per_s_best}}; every device multiplies
its own size x size matrices at the same time (benchmarks/common.matmul_peak).
benchmarks/train_throughput.py measures the same number in its own process.
"""
from absl import app, flags

import common  # benchmarks/common.py (benchmarks/ is on sys.path when run as a file)

_SIZE = flags.DEFINE_integer("size", 2048, "Matrix side.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed matmuls.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matrix dtype.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices used (0 = all local devices).")


def main(argv):
  del argv
  if _SIZE.value < 1 or _REPS.value < 1:
    raise app.UsageError("--size and --reps must be >= 1.")
  peak = common.matmul_peak(common.devices(_NUM_DEVICES.value), _SIZE.value, _REPS.value,
                            _DTYPE.value)
  common.emit({"machine": common.machine(), "matmul": peak})


if __name__ == "__main__":
  app.run(main)
