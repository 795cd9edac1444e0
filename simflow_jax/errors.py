"""The exceptions a run ends with that main.py turns into exit codes (not user errors)."""


class NonFiniteLossError(FloatingPointError):
  """A NaN/inf training loss: the run stops with its step, the last good checkpoint kept (exit 1)."""


class Interrupted(Exception):
  """Stopped by a signal after saving a checkpoint; `signum` is the signal (exit 128 + signum)."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
