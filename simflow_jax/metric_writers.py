"""Writes training metrics, images and hyperparameters without TensorFlow.

`clu.metric_writers` imports TensorFlow; this module does not. One
`MetricWriter` per run writes, under its `logdir`:

  metrics.jsonl                 one JSON object per `write_scalars` call:
                                {"step": 100, "loss": 0.25, ...}
                                (`drop_rows_after=S` first removes rows of steps > S)
  events.out.tfevents.*         TensorBoard event file (scalars, images, hparams),
                                framed and CRC'd as TensorBoard expects, built from
                                the protos that ship with tensorboardX
  images/<name>_<step>.png      one PNG per image (a batch adds _<index>)
  hparams.json                  the flattened hyperparameters ("optim.lr": 1e-4)

  MetricWriter(logdir, *, just_logging=False, flush_secs=60.0, drop_rows_after=None)
    .write_scalars(step, {name: number})
    .write_images(step, {name: (H, W, C) or (N, H, W, C) uint8 / float in [0, 1]})
    .write_hparams({name: value, nested dicts or a ConfigDict})
    .flush(), .close()   (also a context manager)
    .event_file          this writer's TensorBoard event file (None when just logging)

Every write is logged with absl logging; `just_logging=True` (the writer of
non-zero processes in a multi-host run) logs and writes no file at all.

File operations go through `etils.epath`, so `logdir` may be a `gs://` path
when gcsfs is installed. Object stores cannot append: for such paths each
append-only file is kept in memory and re-uploaded whole on `flush()`, and on a
write once `flush_secs` seconds have passed since the last upload; an existing
metrics.jsonl is read back first, so a run resumed after a preemption keeps its earlier rows.
Local files are appended to and flushed on every write. A run resumed from the
checkpoint of step S passes `drop_rows_after=S`: the rows of steps after S (logged
before a preemption, then replayed) are removed first (the file is rewritten
atomically), so metrics.jsonl keeps one row per step. TensorBoard event files
keep both; TensorBoard itself discards the older events of a step that goes back.
"""
import io
import itertools
import json
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.record_writer import masked_crc32c

from simflow_jax import files

_WRITER_IDS = itertools.count()


def _is_remote(path: epath.Path) -> bool:
  """True for object-store paths (gs://, s3://), which cannot be appended to."""
  return "://" in os.fspath(path)


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


def _record(data: bytes) -> bytes:
  """Frames one serialized Event as a TFRecord: length, its CRC, data, data CRC."""
  header = struct.pack("<Q", len(data))  # little-endian uint64, as TFRecord requires
  return b"".join([header, struct.pack("<I", masked_crc32c(header)),
                   data, struct.pack("<I", masked_crc32c(data))])


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
  if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
    raise ValueError(
        f"Image {name!r} has shape {arr.shape}; expected (H, W, C) or (N, H, W, C) "
        "with C in (1, 3, 4).")
  if arr.dtype == np.uint8:
    return arr
  if np.issubdtype(arr.dtype, np.floating):
    return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
  raise ValueError(
      f"Image {name!r} has dtype {arr.dtype}; pass uint8 in [0, 255] or float in [0, 1].")


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
      self._jsonl = self._events = None
      return
    self.logdir.mkdir(parents=True, exist_ok=True)
    if drop_rows_after is not None:
      dropped = _drop_rows_after(self.logdir / "metrics.jsonl", int(drop_rows_after))
      if dropped:
        logging.info("metrics.jsonl: dropped %d rows after step %d (logged before the run "
                     "stopped, replayed now)", dropped, drop_rows_after)
    self._jsonl = _open_append(self.logdir / "metrics.jsonl", flush_secs)
    event_name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
                  f".{os.getpid()}.{next(_WRITER_IDS)}")
    self.event_file = self.logdir / event_name
    self._events = _open_append(self.event_file, flush_secs)
    self._write_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write_event(self, event: event_pb2.Event) -> None:
    self._check_open()
    self._events.write(_record(event.SerializeToString()))

  def _write_summary(self, step: int, summary: summary_pb2.Summary) -> None:
    self._write_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

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
    self._write_summary(step, summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=value)
        for name, value in values.items()]))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Writes each (H, W, C) image, or each image of an (N, H, W, C) batch, as a PNG.

    Files: images/<name>_<step:08d>.png for (H, W, C); images/<name>_<step:08d>_<i>.png
    for each image i of a batch. TensorBoard tags: <name>, or <name>/<i> for a batch.
    A "/" in a name becomes "_" in the file name.
    """
    self._check_open()
    step = int(step)
    batches = {name: (_to_uint8_images(name, image), np.ndim(image) == 4)
               for name, image in images.items()}
    logging.info("[%d] images: %s", step,
                 ", ".join(f"{k}{tuple(v.shape)}" for k, (v, _) in batches.items()))
    if self.just_logging:
      return
    image_dir = self.logdir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    tb_values = []
    for name, (batch, is_batch) in batches.items():
      stem = f"{name.replace('/', '_')}_{step:08d}"
      for i, image in enumerate(batch):
        png = _png_bytes(image)
        (image_dir / (f"{stem}_{i}.png" if is_batch else f"{stem}.png")).write_bytes(png)
        height, width, channels = image.shape
        tb_values.append(summary_pb2.Summary.Value(
            tag=f"{name}/{i}" if is_batch else name,
            image=summary_pb2.Summary.Image(height=height, width=width, colorspace=channels,
                                            encoded_image_string=png)))
    self._write_summary(step, summary_pb2.Summary(value=tb_values))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Writes flattened hparams ("optim.lr": 1e-4) to hparams.json and TensorBoard.

    Accepts nested mappings or an ml_collections.ConfigDict. Tuples become JSON
    lists; other non-JSON values become strings.
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
    for summary in tbx_summary.hparams(tb_hparams, {}):
      self._write_summary(0, summary)

  def flush(self) -> None:
    if self.just_logging or self._closed:
      return
    self._jsonl.flush()
    self._events.flush()

  def close(self) -> None:
    """Flushes and closes the files; calling it again does nothing."""
    if self._closed:
      return
    if not self.just_logging:
      self._jsonl.close()
      self._events.close()
    self._closed = True

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
