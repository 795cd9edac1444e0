"""Reading the weight files the converters (scripts/convert_*.py) take, with one-line errors.

  load_state_dict(path, what)   a torch .pth/.pt/.bin state dict (or a .safetensors file) ->
                                {name: numpy array}; a {'state_dict': ...} / {'model': ...}
                                wrapper is unwrapped. A missing file, a file torch cannot read
                                (garbage, a pickle of something else) or one that holds no state
                                dict (a list, a dict without tensors) raise WeightsFileError (a
                                missing one MissingWeightsFileError) naming the file and `what`
                                was expected.
  reading(path, what)           a context: the ValueError (whose message says what was
                                expected: another model's state dict, a layout to choose) or
                                KeyError (a missing parameter) of a conversion becomes a
                                WeightsFileError naming the file.
  run_cli(main, argv)           runs a converter's main: those errors, and a file-system error
                                writing the output (files.describe_os_error), become one
                                `Error:` line on stderr and exit 2; any other exception is a bug
                                and keeps its traceback.
Needs torch only for .pth files (the [convert] extra), safetensors only for .safetensors.
"""
import contextlib
import os
import sys
from typing import Callable, Mapping

import numpy as np

from simflow_jax import files

USAGE_EXIT = 2
_WRAPPERS = ("state_dict", "model")


class WeightsFileError(ValueError):
  """A converter's input file is not what it must be; the message names the file."""


class MissingWeightsFileError(FileNotFoundError):
  """A converter's input file does not exist; the message names it and where to get it."""


def _one_line(text) -> str:
  return " ".join(str(text).split())


def _first_line(e: BaseException) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def check_file(path: str, what: str, hint: str = "") -> None:
  """MissingWeightsFileError / WeightsFileError unless `path` is an existing regular file."""
  if not os.path.exists(path):
    raise MissingWeightsFileError(f"{path}: no such file; expected {what}." + (f" {hint}" if hint else ""))
  if not os.path.isfile(path):
    raise WeightsFileError(f"{path} is a directory, not a file; expected {what}.")


def _to_numpy(value) -> np.ndarray:
  if value.is_floating_point():
    return value.detach().float().numpy()  # bfloat16 / float16 files too
  return value.detach().numpy()


def load_state_dict(path: str, what: str, hint: str = "") -> dict[str, np.ndarray]:
  """The tensors of the state dict in `path` as numpy arrays (floats as float32)."""
  check_file(path, what, hint)
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise WeightsFileError("reading a .safetensors file needs the safetensors package: "
                             "pip install -e '.[convert]'") from e
    try:
      return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on foreign bytes
      raise WeightsFileError(f"{path} is not a readable .safetensors file ({_first_line(e)}); "
                             f"expected {what}.") from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise WeightsFileError("reading a .pth file needs torch: pip install -e '.[convert]' (CPU torch "
                           "is enough).") from e
  try:
    sd = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types on foreign bytes
    raise WeightsFileError(f"{path} is not a torch state dict file (torch.load failed with "
                           f"{type(e).__name__}); expected {what}.") from e
  for key in _WRAPPERS:
    if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
      sd = sd[key]
  if not isinstance(sd, Mapping):
    raise WeightsFileError(f"{path} holds a {type(sd).__name__}, not a state dict (a dict of "
                           f"tensors); expected {what}.")
  tensors = {k: _to_numpy(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
  if not tensors:
    raise WeightsFileError(f"{path} holds a dict without tensors (keys {sorted(map(str, sd))[:5]}), "
                           f"not a state dict; expected {what}.")
  return tensors


@contextlib.contextmanager
def reading(path: str, what: str):
  """Turns a conversion's ValueError / KeyError into a WeightsFileError naming the file."""
  try:
    yield
  except (WeightsFileError, MissingWeightsFileError):
    raise
  except KeyError as e:
    raise WeightsFileError(f"{path} lacks the parameter {e}; expected {what}.") from e
  except ValueError as e:
    raise WeightsFileError(f"{path}: {_one_line(e)}") from e


def run_cli(main: Callable, argv=None):
  """main(argv), with the input-file and file-system errors as one `Error:` line, exit 2."""
  try:
    return main(argv)
  except (WeightsFileError, MissingWeightsFileError) as e:
    message = str(e)
  except OSError as e:
    if e.errno not in files.USER_ERRNOS:
      raise
    message = files.describe_os_error(e)
  sys.stderr.write("Error: " + _one_line(message) + "\n")
  sys.stderr.flush()
  sys.exit(USAGE_EXIT)
