"""Writes training metrics, images and hyperparameters without TensorFlow.

One `MetricWriter` per run writes, under its `logdir`:

  events.out.tfevents.*         TensorBoard event file (scalars, images, hparams)
  metrics.jsonl                 one JSON object per `write_scalars` call:
                                {"step": 100, "loss": 0.25, ...}
  images/<name>_<step:08d>.png  one PNG per `write_images` entry (a batch: one grid)
  hparams.json                  the flattened hyperparameters ("optim.lr": 1e-4)

  MetricWriter(logdir, *, just_logging=False, flush_secs=60.0, drop_rows_after=None)
    .write_scalars(step, {name: number})
    .write_images(step, {name: (H, W, C) or (N, H, W, C) uint8 / float in [0, 1]})
    .write_hparams({name: value, nested dicts or a ConfigDict})
    .flush(), .close()   (also a context manager)
    .event_file          this writer's TensorBoard event file (None when just logging)

The event file is tensorboardX's `SummaryWriter`: it builds the summaries, frames
the records and writes them from a background thread at least every `flush_secs`
seconds and on `close()`, to local paths, gs:// (google-cloud-storage) or s3://
(boto3). The hparams summaries go to this writer's own event file rather than
through `add_hparams`, which would start a separate run in a sub-folder. A run
resumed from the checkpoint of step S passes `drop_rows_after=S`, which becomes
tensorboardX's `purge_step=S + 1`: TensorBoard then hides the events of steps
after S that earlier event files hold (logged before a preemption, then replayed).

What stays ours, because tensorboardX does not do it:
  - metrics.jsonl: a plain-text log that scripts and tests read without an event
    parser. With `drop_rows_after=S` the rows of steps after S and a torn last
    line are removed first, in an atomic rewrite, so the file keeps one row per
    step. Its file operations go through `etils.epath`, so it may live on gs://
    (with gcsfs); object stores cannot append, so there the file is held in memory,
    read back first when it exists, and re-uploaded whole on `flush()` and once
    `flush_secs` have passed since the last upload. Local files are appended to and
    flushed on every write.
  - hparams.json: the same hyperparameters as plain JSON; TensorBoard's hparams
    record holds only strings, numbers and booleans (lists go in as JSON strings).
  - PNG files and the grid: tensorboardX writes images only into the event file,
    and its batch grid has no gap between tiles and turns greyscale into RGB.
  - `just_logging=True` (the writer of non-zero processes in a multi-host run):
    every write is logged with absl logging and no file is created at all.
"""
import io
import itertools
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboardX import SummaryWriter, record_writer
from tensorboardX import summary as tbx_summary

from simflow_jax import files

GRID_GAP = 2  # black pixels between the tiles of an image grid
_WRITER_IDS = itertools.count()
# tensorboardX's remote event-file writers: scheme -> (its "installed" flag, what to install).
_REMOTE_EVENT_WRITERS = {"gs": ("GCS_ENABLED", "google-cloud-storage"),
                         "s3": ("S3_ENABLED", "boto3")}


def _is_remote(path: epath.Path) -> bool:
  """True for object-store paths (gs://, s3://), which cannot be appended to."""
  return "://" in os.fspath(path)


def _check_event_writer_backend(logdir: str) -> None:
  """Raises a clear error when tensorboardX cannot write event files under `logdir`."""
  if "://" not in logdir:
    return
  scheme = logdir.split("://", 1)[0]
  if scheme not in _REMOTE_EVENT_WRITERS:
    raise ValueError(f"TensorBoard event files can go to a local folder, gs:// or s3://, not "
                     f"{scheme}://; choose another logdir.")
  flag, package = _REMOTE_EVENT_WRITERS[scheme]
  if not getattr(record_writer, flag):
    raise OSError(f"Writing TensorBoard event files to {scheme}:// needs {package}; "
                  f"run `pip install {package}`.")


class _LocalAppendFile:
  """A local file opened for appending; every write reaches the OS at once."""

  def __init__(self, path: epath.Path):
    self._file = path.open("ab")

  def write(self, data: bytes) -> None:
    self._file.write(data)
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _RewriteFile:
  """An append-only file on an object store: held in memory, uploaded whole.

  Existing content is read back first, so appending continues an earlier file.
  """

  def __init__(self, path: epath.Path, flush_secs: float):
    self._path = path
    self._flush_secs = flush_secs
    self._buffer = io.BytesIO()
    if path.exists():
      self._buffer.write(path.read_bytes())
    self._dirty = False
    self._last_upload = time.monotonic()

  def write(self, data: bytes) -> None:
    self._buffer.write(data)
    self._dirty = True
    if time.monotonic() - self._last_upload >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      self._path.write_bytes(self._buffer.getvalue())
      self._dirty = False
    self._last_upload = time.monotonic()

  def close(self) -> None:
    self.flush()


def _open_append(path: epath.Path, flush_secs: float):
  return _RewriteFile(path, flush_secs) if _is_remote(path) else _LocalAppendFile(path)


def _drop_rows_after(path: epath.Path, step: int) -> int:
  """Removes the rows with "step" > step from a metrics.jsonl (atomic rewrite); returns how
  many. A torn last line (a run killed while writing it) goes too."""
  if not path.exists():
    return 0
  lines = path.read_bytes().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and row.get("step", 0) <= step:
      kept.append(line if line.endswith(b"\n") else line + b"\n")
  if len(kept) != len(lines):
    data = b"".join(kept)
    files.write_atomic(path, lambda tmp: epath.Path(tmp).write_bytes(data))
  return len(lines) - len(kept)


def _to_float(name: str, value: Any) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(
        f"Scalar {name!r} has shape {arr.shape}; write_scalars takes one number per "
        "name (reduce it first, e.g. with .mean()).")
  return float(arr.reshape(()))


def _to_uint8_images(name: str, image: Any) -> np.ndarray:
  """Returns (N, H, W, C) uint8 from (H, W, C) / (N, H, W, C) uint8 or float in [0, 1]."""
  arr = np.asarray(image)
  if arr.ndim == 3:
    arr = arr[None]  # (H, W, C) -> (1, H, W, C)
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or arr.shape[0] < 1:
    raise ValueError(
        f"Image {name!r} has shape {arr.shape}; expected (H, W, C) or (N >= 1, H, W, C) "
        "with C in (1, 3, 4).")
  if arr.dtype == np.uint8:
    return arr
  if np.issubdtype(arr.dtype, np.floating):
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise ValueError(
      f"Image {name!r} has dtype {arr.dtype}; pass uint8 in [0, 255] or float in [0, 1].")


def image_grid(images: np.ndarray, gap: int = GRID_GAP) -> np.ndarray:
  """Tiles (N, H, W, C) images into one (H', W', C) image, row by row.

  cols = ceil(sqrt(N)) tiles per row, rows = ceil(N / cols); `gap` black pixels
  between neighbouring tiles (none around the edge), and the unused cells of the
  last row black, so H' = rows * (H + gap) - gap and W' = cols * (W + gap) - gap.
  A single image comes back unchanged.
  """
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  cells = np.pad(images, ((0, rows * cols - n), (0, gap), (0, gap), (0, 0)))
  grid = cells.reshape(rows, cols, h + gap, w + gap, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape(rows * (h + gap), cols * (w + gap), c)[:rows * (h + gap) - gap,
                                                              :cols * (w + gap) - gap]


def _png_bytes(image: np.ndarray) -> bytes:
  """PNG encoding of one (H, W, C) uint8 image (C = 1 is written as greyscale)."""
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = io.BytesIO()
  pil.save(out, format="PNG")
  return out.getvalue()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix=f"{name}."))
    else:
      flat[name] = value
  return flat


def _jsonable(value: Any) -> Any:
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return str(value)


class MetricWriter:
  """Writes scalars (JSONL + TensorBoard), images (PNG + TensorBoard) and hparams."""

  def __init__(self, logdir: str | os.PathLike, *, just_logging: bool = False,
               flush_secs: float = 60.0, drop_rows_after: int | None = None):
    self.logdir = epath.Path(logdir)
    self.just_logging = just_logging
    self._closed = False
    self.event_file: epath.Path | None = None  # this writer's TensorBoard event file
    if just_logging:
      self._jsonl = self._tb = None
      return
    _check_event_writer_backend(os.fspath(self.logdir))
    self.logdir.mkdir(parents=True, exist_ok=True)
    if drop_rows_after is not None:
      dropped = _drop_rows_after(self.logdir / "metrics.jsonl", int(drop_rows_after))
      if dropped:
        logging.info("metrics.jsonl: dropped %d rows after step %d (logged before the run "
                     "stopped, replayed now)", dropped, drop_rows_after)
    self._jsonl = _open_append(self.logdir / "metrics.jsonl", flush_secs)
    # tensorboardX names the file by the second and the host; the suffix keeps the files of
    # writers started in the same second (by one process or several) apart.
    self._tb = SummaryWriter(
        os.fspath(self.logdir), flush_secs=flush_secs,
        purge_step=None if drop_rows_after is None else int(drop_rows_after) + 1,
        filename_suffix=f".{os.getpid()}.{next(_WRITER_IDS)}")
    self.event_file = epath.Path(self._tb.file_writer.event_writer._ev_writer._file_name)

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f"MetricWriter for {self.logdir} is closed; create a new one.")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes {name: number}; jax/numpy scalars (or size-1 arrays) are converted with float()."""
    self._check_open()
    step = int(step)
    if "step" in scalars:
      raise ValueError("'step' is the JSONL row key; rename the scalar called 'step'.")
    values = {name: _to_float(name, value) for name, value in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
    if self.just_logging:
      return
    self._jsonl.write((json.dumps({"step": step, **values}) + "\n").encode())
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def write_images(self, step: int, images: Mapping[str, Any], png: bool = True) -> None:
    """Writes each entry as one image: an (H, W, C) image as it is, an (N, H, W, C) batch
    tiled into one grid (see `image_grid`).

    File (unless png=False, for an image the caller has saved already): images/<name>_<step:08d>.png,
    a "/" in the name becoming "_". TensorBoard: the same image under the tag <name>.
    """
    self._check_open()
    step = int(step)
    batches = {name: _to_uint8_images(name, image) for name, image in images.items()}
    logging.info("[%d] images: %s", step,
                 ", ".join(f"{k}{tuple(v.shape)}" for k, v in batches.items()))
    if self.just_logging:
      return
    image_dir = self.logdir / "images"
    for name, batch in batches.items():
      grid = image_grid(batch)
      if png:
        image_dir.mkdir(parents=True, exist_ok=True)
        (image_dir / f"{name.replace('/', '_')}_{step:08d}.png").write_bytes(_png_bytes(grid))
      self._tb.add_image(name, grid, step, dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes flattened hparams ("optim.lr": 1e-4) to hparams.json and TensorBoard.

    Accepts nested mappings or an ml_collections.ConfigDict. Tuples become JSON
    lists (JSON strings in TensorBoard); other non-JSON values become strings.
    """
    self._check_open()
    if hasattr(hparams, "to_dict"):
      hparams = hparams.to_dict()
    flat = {k: _jsonable(v) for k, v in _flatten(hparams).items()}
    logging.info("hparams: %s", flat)
    if self.just_logging:
      return
    (self.logdir / "hparams.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")
    tb_hparams = {k: v if isinstance(v, (str, bool, int, float)) else json.dumps(v)
                  for k, v in flat.items()}
    for summary in tbx_summary.hparams(tb_hparams, {}):  # experiment, session start, session end
      self._tb.file_writer.add_summary(summary, global_step=0)

  def flush(self) -> None:
    """Writes out metrics.jsonl and the event file (events still queued in tensorboardX's
    writer thread follow within `flush_secs`, or on `close()`)."""
    if self.just_logging or self._closed:
      return
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    """Writes everything out and closes the files; calling it again does nothing."""
    if self._closed:
      return
    if not self.just_logging:
      self._jsonl.close()
      self._tb.close()
    self._closed = True

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
