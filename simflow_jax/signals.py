"""Stopping a long run when asked: SIGINT (Ctrl-C) and SIGTERM (a preemption notice).

Every long mode (training, sampling, evaluation, likelihood, the study, the dry run) works in
units (a step, a shard of samples, a batch, an evaluator, a row-seed) and wraps its loop in
`StopOnSignal`: the first signal only records itself, the loop checks `stop.signum` between
units, keeps what is done, and raises errors.Interrupted (main.py exits 128 + signal: 130 for
SIGINT, 143 for SIGTERM). Nothing is raised inside whatever code the signal interrupts (XLA
callbacks swallow a KeyboardInterrupt). A second signal ends the process at once with the
signal's default action. Multi-process runs agree on stopping with `stop_agreed`, so every
process stops after the same unit.
"""
import os
import signal
import threading

import jax
import numpy as np

from simflow_jax.errors import Interrupted


class StopOnSignal:
  """SIGINT / SIGTERM handlers for a loop over units (main thread only; the previous handlers
  come back on exit). `unit` and `then` word the message: "stopping after the current {unit}
  to {then}"."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, unit: str = "step", then: str = "save a checkpoint"):
    self.signum = None
    self.unit, self.then = unit, then
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc_info):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signum is not None:  # the second signal: stop now
      os.write(2, f"{name} again: exiting now; what was saved before is kept.\n".encode())
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    os.write(2, f"{name} received: stopping after the current {self.unit} to {self.then} "
                f"(send {name} again to exit at once).\n".encode())

  def interrupted(self, message: str) -> Interrupted:
    """The exception that ends the run: `message` says what was kept and how to resume."""
    return Interrupted(f"Interrupted by {signal.Signals(self.signum).name}: {message}", self.signum)


def stop_agreed(stop: StopOnSignal, done: int = 0, every: int = 1) -> bool:
  """Whether to stop before the next unit. Multi-process runs agree on it every `every` units
  (one process may get the signal a unit later than another; all must stop together): a
  collective that every process must reach at the same unit counts."""
  if jax.process_count() == 1:
    return stop.signum is not None
  if done % every:
    return False
  from jax.experimental import multihost_utils  # local: a collective only multi-host runs need
  signum = int(np.max(multihost_utils.process_allgather(np.int32(stop.signum or 0))))
  if signum and stop.signum is None:
    stop.signum = signum
  return bool(signum)
