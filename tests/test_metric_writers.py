"""Tests for simflow_jax.metric_writers: JSONL, TensorBoard events, PNGs, hparams."""
import io
import json
import os
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image
from tensorboardX.proto import event_pb2, plugin_hparams_pb2
from tensorboardX.record_writer import masked_crc32c

from simflow_jax import metric_writers
from simflow_jax.metric_writers import MetricWriter


def read_events(path) -> list[event_pb2.Event]:
  """Parses a TFRecord event file, checking both CRCs of every record."""
  data = epath.Path(path).read_bytes()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    assert header_crc == masked_crc32c(header), f"bad length CRC at byte {pos}"
    body = data[pos + 12:pos + 12 + length]
    (body_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
    assert body_crc == masked_crc32c(body), f"bad data CRC at byte {pos}"
    events.append(event_pb2.Event.FromString(body))
    pos += 16 + length
  assert pos == len(data), "trailing bytes after the last record"
  return events


def scalar_values(events) -> dict[tuple[int, str], float]:
  return {(e.step, v.tag): v.simple_value
          for e in events if e.HasField("summary") for v in e.summary.value
          if v.HasField("simple_value")}


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in epath.Path(path).read_text().splitlines()]


def test_scalars_jsonl_round_trip(tmp_path):
  with MetricWriter(tmp_path) as w:
    w.write_scalars(10, {"loss": jnp.float32(0.25), "lr": np.float64(1e-4), "n": 3})
    w.write_scalars(np.int32(20), {"loss": jnp.array([0.125])})
  rows = read_jsonl(tmp_path / "metrics.jsonl")
  assert rows == [{"step": 10, "loss": 0.25, "lr": 1e-4, "n": 3.0},
                  {"step": 20, "loss": 0.125}]


def test_jsonl_appends_across_writers(tmp_path):
  """A run resumed after a preemption keeps the earlier rows."""
  with MetricWriter(tmp_path) as w:
    w.write_scalars(1, {"a": 1.0})
  with MetricWriter(tmp_path) as w:
    w.write_scalars(2, {"a": 2.0})
  assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("remote", [False, True])
def test_resume_drops_replayed_rows(tmp_path, monkeypatch, remote):
  """Rows logged after the restored checkpoint (replayed after the resume) are dropped first, a
  torn last line too: one row per step. `remote` runs the object-store path on a local folder."""
  monkeypatch.setattr(metric_writers, "_is_remote", lambda path: remote)
  with MetricWriter(tmp_path) as w:
    for step in range(1, 6):
      w.write_scalars(step, {"a": float(step)})
  with open(tmp_path / "metrics.jsonl", "ab") as f:
    f.write(b'{"step": 6, "a"')  # a run killed mid-write
  with MetricWriter(tmp_path, drop_rows_after=3) as w:
    w.write_scalars(4, {"a": 40.0})
  assert read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 1, "a": 1.0}, {"step": 2, "a": 2.0}, {"step": 3, "a": 3.0}, {"step": 4, "a": 40.0}]
  # TensorBoard hides the earlier files' events from step 4 on: a session restart at step 4.
  restarts = [e.step for e in read_events(w.event_file)
              if e.session_log.status == event_pb2.SessionLog.START]
  assert restarts == [4]
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_tensorboard_event_file_contains_scalars(tmp_path):
  w = MetricWriter(tmp_path)
  w.write_scalars(5, {"loss": jnp.float32(1.5), "train/bpd": 3.25})
  w.write_scalars(7, {"loss": 0.1})
  w.flush()
  files = list(tmp_path.glob("events.out.tfevents.*"))
  assert files == [w.event_file]
  w.close()
  events = read_events(files[0])
  assert events[0].file_version == "brain.Event:2"
  values = scalar_values(events)
  assert values == {(5, "loss"): 1.5, (5, "train/bpd"): 3.25,
                    (7, "loss"): pytest.approx(0.1, rel=1e-7)}


def test_two_writers_get_distinct_event_files(tmp_path):
  """Writers started in the same second (tensorboardX names files by the second) do not clash."""
  with MetricWriter(tmp_path) as a, MetricWriter(tmp_path) as b:
    a.write_scalars(1, {"x": 1.0})
    b.write_scalars(1, {"x": 2.0})
  assert a.event_file != b.event_file
  assert scalar_values(read_events(a.event_file)) == {(1, "x"): 1.0}
  assert scalar_values(read_events(b.event_file)) == {(1, "x"): 2.0}


def test_just_logging_writes_nothing(tmp_path):
  logdir = tmp_path / "run"
  w = MetricWriter(logdir, just_logging=True)
  w.write_scalars(1, {"loss": 1.0})
  w.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
  w.write_hparams({"lr": 1e-4})
  w.flush()
  w.close()
  assert w.event_file is None
  assert not logdir.exists()


def image_values(events) -> list[tuple[int, str, np.ndarray]]:
  """(step, tag, decoded (H, W, C) pixels) of every image in the events."""
  out = []
  for e in events:
    for v in e.summary.value:
      if v.HasField("image"):
        with Image.open(io.BytesIO(v.image.encoded_image_string)) as im:
          pixels = np.asarray(im)
        assert pixels.shape == (v.image.height, v.image.width, v.image.colorspace)
        out.append((e.step, v.tag, pixels))
  return out


def test_single_image_png_and_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # (H, W, C)
  with MetricWriter(tmp_path) as w:
    w.write_images(42, {"samples/grid": rgb})
  assert [p.name for p in (tmp_path / "images").iterdir()] == ["samples_grid_00000042.png"]
  with Image.open(tmp_path / "images" / "samples_grid_00000042.png") as im:
    assert im.size == (10, 6) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
  ((step, tag, pixels),) = image_values(read_events(w.event_file))
  assert (step, tag) == (42, "samples/grid")
  np.testing.assert_array_equal(pixels, rgb)


@pytest.mark.parametrize("n, rows, cols", [(1, 1, 1), (3, 2, 2), (5, 2, 3), (100, 10, 10)])
def test_image_grid_layout(n, rows, cols):
  """ceil(sqrt(N)) tiles per row, row-major, GRID_GAP black pixels between tiles, empty cells
  black."""
  h, w, gap = 3, 4, metric_writers.GRID_GAP
  batch = np.arange(1, n + 1, dtype=np.uint8)[:, None, None, None] * np.ones((1, h, w, 3), np.uint8)
  grid = metric_writers.image_grid(batch)
  assert grid.shape == (rows * (h + gap) - gap, cols * (w + gap) - gap, 3)
  expected = np.zeros_like(grid)
  for k in range(n):
    y, x = (k // cols) * (h + gap), (k % cols) * (w + gap)
    expected[y:y + h, x:x + w] = k + 1
  np.testing.assert_array_equal(grid, expected)


def test_image_batch_written_as_one_grid(tmp_path):
  """A batch of N images is one PNG (and one TensorBoard image) of the grid, not N files."""
  batch = np.stack([np.full((5, 7, 1), v, np.float32) for v in (0.0, 0.5, 1.0)])  # (3, 5, 7, 1)
  batch[1, 0, 0, 0] = 2.0  # out of range: clipped to white
  with MetricWriter(tmp_path) as w:
    w.write_images(3, {"recon": jnp.asarray(batch)})
  assert [p.name for p in (tmp_path / "images").iterdir()] == ["recon_00000003.png"]
  gap = metric_writers.GRID_GAP
  with Image.open(tmp_path / "images" / "recon_00000003.png") as im:
    assert im.size == (2 * (7 + gap) - gap, 2 * (5 + gap) - gap) and im.mode == "L"
    pixels = np.asarray(im)
  np.testing.assert_array_equal(pixels, metric_writers.image_grid(
      np.round(np.clip(batch, 0, 1) * 255).astype(np.uint8))[..., 0])
  tiles = {(0, 0): 0, (0, 7 + gap): 128, (5 + gap, 0): 255}  # top-left pixel of tiles 0, 1, 2
  for (y, x), value in tiles.items():
    assert pixels[y + 1, x + 1] == value
  assert pixels[0, 7 + gap] == 255  # tile 1's clipped pixel
  assert pixels[5 + gap, 7 + gap:].max() == 0  # the empty fourth cell
  ((step, tag, tb_pixels),) = image_values(read_events(w.event_file))
  assert (step, tag) == (3, "recon")
  np.testing.assert_array_equal(tb_pixels, np.repeat(pixels[..., None], 3, axis=-1))


def test_hparams_flattened_json_and_tensorboard_in_the_same_run(tmp_path):
  cfg = ml_collections.ConfigDict({"optim": {"lr": 1e-4, "b1": 0.9},
                                   "flow": {"layers": (2, 8), "dtype": "bfloat16"},
                                   "seed": np.int64(3), "enabled": True})
  with MetricWriter(tmp_path) as w:
    w.write_hparams(cfg)
    w.write_scalars(1, {"loss": 1.0})
  assert json.loads((tmp_path / "hparams.json").read_text()) == {
      "optim.lr": 1e-4, "optim.b1": 0.9, "flow.layers": [2, 8], "flow.dtype": "bfloat16",
      "seed": 3, "enabled": True}
  assert list(tmp_path.rglob("events.out.tfevents.*")) == [w.event_file]  # no sub-run folder
  values = {v.tag: v for e in read_events(w.event_file) for v in e.summary.value}
  assert {"_hparams_/experiment", "_hparams_/session_start_info", "loss"} <= set(values)
  start = plugin_hparams_pb2.HParamsPluginData.FromString(
      values["_hparams_/session_start_info"].metadata.plugin_data.content).session_start_info
  assert start.hparams["optim.lr"].number_value == 1e-4
  assert start.hparams["seed"].number_value == 3
  assert start.hparams["enabled"].bool_value is True
  assert start.hparams["flow.dtype"].string_value == "bfloat16"
  assert start.hparams["flow.layers"].string_value == "[2, 8]"


def test_bad_inputs_raise_clear_errors(tmp_path):
  with MetricWriter(tmp_path) as w:
    with pytest.raises(ValueError, match="one number per name"):
      w.write_scalars(1, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="row key"):
      w.write_scalars(1, {"step": 1.0})
    with pytest.raises(ValueError, match=r"C in \(1, 3, 4\)"):
      w.write_images(1, {"x": np.zeros((4, 4, 2), np.uint8)})
    with pytest.raises(ValueError, match=r"N >= 1"):
      w.write_images(1, {"x": np.zeros((0, 4, 4, 3), np.uint8)})
    with pytest.raises(ValueError, match="dtype int32"):
      w.write_images(1, {"x": np.zeros((4, 4, 3), np.int32)})
  with pytest.raises(ValueError, match="closed"):
    w.write_scalars(2, {"loss": 1.0})


def test_rewrite_file_keeps_existing_content_and_uploads_on_flush(tmp_path):
  """The object-store path (gs://): existing rows are kept, writes land on flush."""
  path = epath.Path(tmp_path) / "metrics.jsonl"
  path.write_bytes(b"old\n")
  f = metric_writers._RewriteFile(path, flush_secs=3600.0)
  f.write(b"new\n")
  assert path.read_bytes() == b"old\n"  # not yet uploaded
  f.flush()
  assert path.read_bytes() == b"old\nnew\n"
  f.write(b"last\n")
  f.close()
  assert path.read_bytes() == b"old\nnew\nlast\n"


def test_rewrite_file_uploads_after_flush_secs(tmp_path):
  path = epath.Path(tmp_path) / "events"
  f = metric_writers._RewriteFile(path, flush_secs=0.0)
  f.write(b"abc")
  assert path.read_bytes() == b"abc"


def test_object_store_paths_use_the_rewrite_file():
  assert metric_writers._is_remote(epath.Path("gs://bucket/runs/a"))
  assert not metric_writers._is_remote(epath.Path("/tmp/runs/a"))


def test_event_file_backend_errors_before_writing(tmp_path, monkeypatch):
  """A gs:// workdir without google-cloud-storage, or a scheme tensorboardX cannot write, fails
  with a clear message before any file is made."""
  monkeypatch.setattr(metric_writers.record_writer, "GCS_ENABLED", False)
  with pytest.raises(OSError, match="pip install google-cloud-storage"):
    MetricWriter("gs://bucket/runs/a")
  with pytest.raises(ValueError, match="local folder, gs:// or s3://"):
    MetricWriter("az://container/runs/a")


class _FakeGCS:
  """google.cloud.storage as tensorboardX's GCS event writer uses it, storing each object under
  ./gs:/<bucket>/<name> of the folder it was opened in, where the os-backed gs:// paths of the
  test below land too."""

  Client = staticmethod(lambda: None)
  uploaded: set[str] = set()  # the object names written

  class Bucket:
    def __init__(self, client, name):
      self.name = name

  class Blob:
    def __init__(self, name, bucket):
      # Absolute: tensorboardX uploads again when the writer is garbage-collected.
      self.path = epath.Path(os.getcwd(), "gs:", bucket.name, name)
      self.generation = None

    def upload_from_string(self, data, if_generation_match=None):
      assert if_generation_match == self.generation
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.write_bytes(data)
      _FakeGCS.uploaded.add(self.path.name)
      self.generation = (self.generation or 0) + 1


def test_gs_logdir_end_to_end(tmp_path, monkeypatch):
  """A gs:// logdir: tensorboardX uploads the event file, metrics.jsonl is uploaded whole and its
  resume rewrite works, the grid PNG and hparams.json land there. gs:// paths run on the local
  disk (under ./gs:/) and the GCS client is a fake."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(epath.gpath.PosixGPath, "_backend",
                      property(lambda self: epath.backend.os_backend))
  monkeypatch.setattr(_FakeGCS, "uploaded", set())
  monkeypatch.setattr(metric_writers.record_writer, "storage", _FakeGCS, raising=False)
  monkeypatch.setattr(metric_writers.record_writer, "GCS_ENABLED", True)
  logdir = "gs://bucket/runs/a"
  with MetricWriter(logdir, flush_secs=3600.0) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"loss": float(step)})
    w.write_images(3, {"samples": np.zeros((4, 2, 2, 3), np.uint8)})
    w.write_hparams({"lr": 0.5})
  with MetricWriter(logdir, drop_rows_after=1) as w2:
    w2.write_scalars(2, {"loss": 20.0})
  local = tmp_path / "gs:" / "bucket" / "runs" / "a"
  assert read_jsonl(local / "metrics.jsonl") == [{"step": 1, "loss": 1.0},
                                                 {"step": 2, "loss": 20.0}]
  assert str(w.event_file).startswith(logdir + "/events.out.tfevents.")
  # Written through tensorboardX's GCS writer:
  assert _FakeGCS.uploaded == {w.event_file.name, w2.event_file.name}
  events = read_events(local / w.event_file.name)
  assert scalar_values(events) == {(1, "loss"): 1.0, (2, "loss"): 2.0, (3, "loss"): 3.0}
  assert [tag for _, tag, _ in image_values(events)] == ["samples"]
  assert scalar_values(read_events(local / w2.event_file.name)) == {(2, "loss"): 20.0}
  assert [p.name for p in (local / "images").iterdir()] == ["samples_00000003.png"]
  assert json.loads((local / "hparams.json").read_text()) == {"lr": 0.5}
