"""Tests for simflow_jax.metric_writers: JSONL, TensorBoard events, PNGs, hparams."""
import io
import json
import struct

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image
from tensorboardX.proto import event_pb2
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


def test_single_image_png_and_tensorboard(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, size=(6, 10, 3), dtype=np.uint8)  # (H, W, C)
  with MetricWriter(tmp_path) as w:
    w.write_images(42, {"samples/grid": rgb})
  png = tmp_path / "images" / "samples_grid_00000042.png"
  with Image.open(png) as im:
    assert im.size == (10, 6) and im.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(im), rgb)
  (image_event,) = [e for e in read_events(w.event_file) if e.HasField("summary")]
  (value,) = image_event.summary.value
  assert (image_event.step, value.tag) == (42, "samples/grid")
  assert (value.image.height, value.image.width, value.image.colorspace) == (6, 10, 3)
  with Image.open(io.BytesIO(value.image.encoded_image_string)) as im:
    np.testing.assert_array_equal(np.asarray(im), rgb)


def test_float_image_batch_written_one_png_each(tmp_path):
  batch = np.stack([np.full((5, 7, 1), v, np.float32) for v in (0.0, 0.5, 1.0)])  # (3, 5, 7, 1)
  batch[1, 0, 0, 0] = 2.0  # out of range: clipped to white
  with MetricWriter(tmp_path) as w:
    w.write_images(3, {"recon": jnp.asarray(batch)})
  for i, expected in enumerate((0, 128, 255)):
    with Image.open(tmp_path / "images" / f"recon_00000003_{i}.png") as im:
      assert im.size == (7, 5) and im.mode == "L"
      pixels = np.asarray(im)
    assert pixels[1, 1] == expected
  with Image.open(tmp_path / "images" / "recon_00000003_1.png") as im:
    assert np.asarray(im)[0, 0] == 255
  tags = [v.tag for e in read_events(w.event_file) if e.HasField("summary")
          for v in e.summary.value]
  assert tags == ["recon/0", "recon/1", "recon/2"]


def test_hparams_flattened_json_and_tensorboard(tmp_path):
  cfg = ml_collections.ConfigDict({"optim": {"lr": 1e-4, "b1": 0.9},
                                   "flow": {"layers": (2, 8), "dtype": "bfloat16"},
                                   "seed": np.int64(3), "enabled": True})
  with MetricWriter(tmp_path) as w:
    w.write_hparams(cfg)
  assert json.loads((tmp_path / "hparams.json").read_text()) == {
      "optim.lr": 1e-4, "optim.b1": 0.9, "flow.layers": [2, 8], "flow.dtype": "bfloat16",
      "seed": 3, "enabled": True}
  tags = {v.tag for e in read_events(w.event_file) if e.HasField("summary")
          for v in e.summary.value}
  assert "_hparams_/session_start_info" in tags


def test_bad_inputs_raise_clear_errors(tmp_path):
  with MetricWriter(tmp_path) as w:
    with pytest.raises(ValueError, match="one number per name"):
      w.write_scalars(1, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="row key"):
      w.write_scalars(1, {"step": 1.0})
    with pytest.raises(ValueError, match=r"C in \(1, 3, 4\)"):
      w.write_images(1, {"x": np.zeros((4, 4, 2), np.uint8)})
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
