"""Progress lines for the long modes (sampling, evaluation, likelihood), as training logs them.

  p = progress.Progress("Export", total=num_shards, unit="shards", stop=stop)
  for ...:
    ...one unit...
    p.update()      # logs "Export: 12/469 shards, 3.1 shards/s, ETA 147s" now and then

A line is logged every `every` units (default: a tenth of the total, or 10), at least every
`seconds` seconds, and at the last unit.
With `stop` (a signals.StopOnSignal), update() also checks, between units, whether every
process agreed to stop (signals.stop_agreed) and then raises Stopped: the caller keeps what is
finished and ends the run with stop.interrupted(...).
"""
import time
from typing import Optional

from absl import logging

from simflow_jax import signals


class Stopped(Exception):
  """A stop was agreed between two units of a Progress (what is finished is kept)."""


class Progress:
  """Counts units of one pass; logs done/total, the rate and the ETA."""

  def __init__(self, what: str, total: Optional[int] = None, unit: str = "batches",
               every: Optional[int] = None, seconds: float = 30.0,
               stop: Optional[signals.StopOnSignal] = None):
    self.what, self.total, self.unit = what, total, unit
    every = (total // 10 if total else 10) if every is None else every
    self.every, self.seconds, self.stop = max(1, int(every)), float(seconds), stop
    self.done = 0
    self.t0 = self._last = time.time()

  def line(self) -> str:
    """The progress line as it stands: done/total, rate and ETA."""
    elapsed = max(time.time() - self.t0, 1e-9)
    rate = self.done / elapsed
    text = f"{self.what}: {self.done}" + (f"/{self.total}" if self.total else "")
    text += f" {self.unit}, {rate:.3g} {self.unit}/s"
    if self.total:
      text += f", ETA {max(self.total - self.done, 0) / max(rate, 1e-9):.0f}s"
    return text

  def update(self, n: int = 1) -> None:
    """n more units are finished: log when due; raise Stopped when a stop is agreed."""
    self.done += n
    now = time.time()
    last = self.total is not None and self.done >= self.total
    if self.done % self.every == 0 or now - self._last >= self.seconds or last:
      logging.info("%s", self.line())
      self._last = now
    if self.stop is not None and not last and signals.stop_agreed(self.stop):
      raise Stopped(self.line())
