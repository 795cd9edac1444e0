"""Tests for simflow_jax.data (sources, preprocess, pipeline) and scripts/build_array_record.py.

Tiny inputs only: a 21-image ImageFolder in a temp dir, the embedded MNIST-5k
digits, tiny ImageNet-style tars. grain runs with worker_count=0.
"""
import importlib.util
import io
import os
import pathlib
import re
import shutil
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs.base import get_base_config
from simflow_jax.data import mnist5k
from simflow_jax.data import pipeline
from simflow_jax.data import preprocess
from simflow_jax.data import sources

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat")
SYNSETS = ("n01440764", "n01443537")  # ImageNet label ids 0 and 1


def _load_build_script():
  spec = importlib.util.spec_from_file_location("build_array_record",
                                                ROOT / "scripts" / "build_array_record.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


bar = _load_build_script()
tfds.disable_progress_bar()


def data_cfg(**overrides):
  cfg = get_base_config().data
  cfg.update(overrides)
  return cfg


def _hash(image: np.ndarray) -> bytes:
  return np.ascontiguousarray(image).tobytes()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  """ROOT/train/<3 classes>/5 images + ROOT/val/<3 classes>/2 images; mixed sizes, modes, formats."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 5), ("val", 2)):
    for c, name in enumerate(CLASSES):
      os.makedirs(root / split / name)
      for i in range(per_class):
        h, w = 20 + 3 * i, 28 - 2 * c
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        if split == "train" and (c, i) == (0, 1):
          img = img.convert("L")
        if split == "train" and (c, i) == (1, 2):
          img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        if split == "train" and (c, i) == (2, 3):
          img.save(root / split / name / f"{i}.jpg", format="JPEG")
          continue
        img.save(root / split / name / f"{i}.png")
  return str(root)


# ---- preprocess -------------------------------------------------------------------------


def test_center_crop_resize_box_halving_then_center_crop():
  # 8x12 -> size 4: the short side 8 >= 2*4, so one BOX halving to 4x6 (each 2x2 block, all
  # equal, becomes its value), no bicubic change (short side == 4), crop columns 1..4.
  blocks = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
  img = np.kron(blocks, np.ones((2, 2), np.uint8))[..., None].repeat(3, axis=-1)  # (8, 12, 3)
  out = preprocess.center_crop_resize(img, 4)
  np.testing.assert_array_equal(out, blocks[:, 1:5, None].repeat(3, axis=-1))


def test_center_crop_resize_bicubic_keeps_constant_and_shapes():
  # 10x15 -> size 4: BOX to 5x7, BICUBIC to 4x6 (round(7*0.8) = 6), crop to 4x4.
  out = preprocess.center_crop_resize(np.full((10, 15, 3), 77, np.uint8), 4)
  np.testing.assert_array_equal(out, np.full((4, 4, 3), 77, np.uint8))
  gray = preprocess.center_crop_resize(np.full((9, 5, 1), 200, np.uint8), 8)  # upsampling, 'L'
  np.testing.assert_array_equal(gray, np.full((8, 8, 1), 200, np.uint8))


def _adm_center_crop_arr(pil_image, image_size):
  """guided-diffusion's image_datasets.center_crop_arr, verbatim."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


@pytest.mark.parametrize("shape,size", [((57, 83, 3), 16), ((40, 30, 3), 24), ((31, 64, 3), 32)])
def test_center_crop_resize_matches_adm(shape, size):
  img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  np.testing.assert_array_equal(preprocess.center_crop_resize(img, size),
                                _adm_center_crop_arr(Image.fromarray(img), size))


def test_center_crop_resize_passes_mnist_through_and_to_float():
  images, _ = mnist5k.load_mnist5k("validation")
  digit = images[0]
  assert preprocess.center_crop_resize(digit, 32) is digit
  np.testing.assert_array_equal(preprocess.to_float(np.array([0, 255, 51], np.uint8)),
                                np.array([-1.0, 1.0, -0.6], np.float32))
  assert preprocess.to_float(images[:2]).dtype == np.float32


# ---- training loader --------------------------------------------------------------------


def test_mnist5k_train_loader_yields_unaltered_training_digits():
  cfg = data_cfg(batch_size=16)
  batch = next(pipeline.make_train_loader(cfg, seed=0))
  assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  train_images, train_labels = mnist5k.load_mnist5k("train", cfg.num_val)
  index = {_hash(preprocess.to_float(x)): int(y) for x, y in zip(train_images, train_labels)}
  for image, label in zip(batch["image"], batch["label"]):
    assert index[_hash(image)] == label  # a training digit, unflipped, with its own label


def test_train_loader_is_deterministic_for_a_seed():
  cfg = data_cfg(batch_size=8, random_flip=True)
  it = pipeline.make_train_loader(cfg, seed=3)
  first = [next(it) for _ in range(3)]
  again = pipeline.make_train_loader(cfg, seed=3)
  for batch in first:
    other = next(again)
    np.testing.assert_array_equal(batch["image"], other["image"])
    np.testing.assert_array_equal(batch["label"], other["label"])
  other_seed = next(pipeline.make_train_loader(cfg, seed=4))
  assert not np.array_equal(first[0]["label"], other_seed["label"])


def test_train_epochs_cover_the_split_and_reshuffle():
  cfg = data_cfg(num_val=4990, batch_size=10)  # 10 training digits, one per class
  it = pipeline.make_train_loader(cfg, seed=0)
  epoch1, epoch2 = next(it)["label"], next(it)["label"]
  assert sorted(epoch1) == list(range(10)) and sorted(epoch2) == list(range(10))
  assert not np.array_equal(epoch1, epoch2)


def test_hosts_read_disjoint_shards():
  cfg = data_cfg(num_val=4990, batch_size=10)  # 2 hosts x 5 = each host's whole shard
  host0 = next(pipeline.make_train_loader(cfg, seed=0, process_index=0, process_count=2))
  host1 = next(pipeline.make_train_loader(cfg, seed=0, process_index=1, process_count=2))
  assert host0["image"].shape == (5, 32, 32, 1)
  assert set(host0["label"]).isdisjoint(host1["label"])
  assert sorted(np.concatenate([host0["label"], host1["label"]])) == list(range(10))


def test_restored_state_continues_the_stream_exactly():
  cfg = data_cfg(num_val=4900, batch_size=8, random_flip=True)  # 100 examples: epoch = 12.5 batches
  it = pipeline.make_train_loader(cfg, seed=7)
  for _ in range(11):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]  # crosses the epoch boundary
  restored = pipeline.make_train_loader(cfg, seed=7)
  next(restored)  # a fresh iterator that has moved on: set_state must override that
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


def test_flip_mirrors_some_images_only():
  cfg = data_cfg(num_val=4990, batch_size=10, random_flip=True)
  train_images, _ = mnist5k.load_mnist5k("train", cfg.num_val)
  plain = {_hash(preprocess.to_float(x)) for x in train_images}
  mirrored = {_hash(preprocess.to_float(x[:, ::-1])) for x in train_images}
  it = pipeline.make_train_loader(cfg, seed=0)
  seen = [_hash(image) for _ in range(4) for image in next(it)["image"]]
  assert all(h in plain or h in mirrored for h in seen)
  assert any(h in plain for h in seen) and any(h in mirrored for h in seen)


# ---- eval loader ------------------------------------------------------------------------


@pytest.mark.parametrize("process_count,batch_size,num_examples", [(4, 64, None), (2, 8, 37)])
def test_eval_loader_counts_every_example_once(process_count, batch_size, num_examples):
  cfg = data_cfg()
  images, labels = mnist5k.load_mnist5k("validation", cfg.num_val)
  total = len(labels) if num_examples is None else num_examples
  seen, num_batches = [], []
  for host in range(process_count):
    batches = list(pipeline.make_eval_loader(cfg, "validation", batch_size, host, process_count,
                                             num_examples))
    num_batches.append(len(batches))
    for batch in batches:
      assert batch["image"].shape == (batch_size // process_count, 32, 32, 1)
      assert batch["mask"].dtype == bool
      seen += [(_hash(x), int(y)) for x, y, m in zip(batch["image"], batch["label"], batch["mask"]) if m]
  assert len(set(num_batches)) == 1  # every host runs the same number of steps
  want = [(_hash(preprocess.to_float(x)), int(y)) for x, y in zip(images[:total], labels[:total])]
  assert sorted(seen) == sorted(want)


# ---- ImageFolder ------------------------------------------------------------------------


def test_imagefolder_source_records_and_labels(folder):
  train = sources.make_source(data_cfg(source="imagefolder", path=folder, channels=3), "train")
  assert len(train) == 15 and train.classes == list(CLASSES)
  for i in range(len(train)):
    record = train[i]
    assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
    name = CLASSES[record["label"]]
    assert f"{os.sep}{name}{os.sep}" in train.files[i]
  png = train.files.index(os.path.join(folder, "train", "cat", "0.png"))
  np.testing.assert_array_equal(train[png]["image"], np.asarray(Image.open(train.files[png])))
  val = sources.make_source(data_cfg(source="imagefolder", path=folder), "validation")  # finds val/
  assert len(val) == 6 and sorted(val.labels) == [0, 0, 1, 1, 2, 2]
  assert val[0]["image"].shape[-1] == 1  # data.channels=1 decodes to grayscale


def test_imagefolder_loaders(folder):
  cfg = data_cfg(source="imagefolder", path=folder, channels=3, image_size=16, random_flip=True,
                 batch_size=4)
  batch = next(pipeline.make_train_loader(cfg, seed=0))
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert set(batch["label"]) <= {0, 1, 2}
  batches = list(pipeline.make_eval_loader(cfg, "validation", 4))
  assert len(batches) == 2 and sum(int(b["mask"].sum()) for b in batches) == 6


# ---- synthetic ---------------------------------------------------------------------------


def test_synthetic_source_is_fixed_and_any_size():
  cfg = data_cfg(source="synthetic", image_size=24, channels=3, num_classes=7, batch_size=32)
  a, b = sources.make_source(cfg, "train"), sources.make_source(cfg, "train")
  np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
  assert a[5]["label"] == b[5]["label"]
  assert not np.array_equal(a[5]["image"], a[6]["image"])
  assert not np.array_equal(a[5]["image"], sources.make_source(cfg, "validation")[5]["image"])
  batch = next(pipeline.make_train_loader(cfg, seed=0))
  assert batch["image"].shape == (32, 24, 24, 3) and batch["image"].dtype == np.float32
  assert set(batch["label"]) <= set(range(7)) and len(set(batch["label"])) > 1
  assert abs(batch["image"].mean()) < 0.05  # uniform uint8 noise centred at 127.5


# ---- array_record (tfds layout) built by scripts/build_array_record.py -------------------


def _records(source):
  return sorted((_hash(source[i]["image"]), int(source[i]["label"])) for i in range(len(source)))


def test_build_from_imagefolder_reads_back_identically(folder, tmp_path):
  out = str(tmp_path / "tfds")
  bar.main(["--imagefolder", folder, "--data_dir", out, "--name", "tiny_folder"])
  for split in ("train", "validation"):
    cfg = data_cfg(source="tfds", path=out, tfds_name="tiny_folder", channels=3)
    built = sources.make_source(cfg, split)
    folder_source = sources.make_source(data_cfg(source="imagefolder", path=folder, channels=3), split)
    assert _records(built) == _records(folder_source)  # same pixels (gray/RGBA -> RGB), same labels
  cfg = data_cfg(source="tfds", path=out, tfds_name="tiny_folder", channels=3, image_size=8,
                 batch_size=6)
  batch = next(pipeline.make_train_loader(cfg, seed=0))
  assert batch["image"].shape == (6, 8, 8, 3) and set(batch["label"]) <= {0, 1, 2}


def _jpeg(rng, mode="RGB") -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)).convert(mode).save(
      buffer, format="JPEG")
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_build_from_imagenet_tars(tmp_path):
  rng = np.random.default_rng(0)
  with tarfile.open(tmp_path / bar.IMAGENET_TRAIN_TAR, "w") as outer:
    for synset in SYNSETS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        _add(tar, f"{synset}_1.JPEG", _jpeg(rng))
        _add(tar, f"{synset}_2.JPEG", _jpeg(rng, "CMYK"))  # like ImageNet's 22 CMYK JPEGs
      _add(outer, f"{synset}.tar", inner.getvalue())
  with tarfile.open(tmp_path / bar.IMAGENET_VAL_TAR, "w") as tar:
    for i in (3, 1, 2):  # not in sorted order inside the tar
      _add(tar, f"ILSVRC2012_val_0000000{i}.JPEG", _jpeg(rng))
  labels = tmp_path / "val_labels.txt"
  labels.write_text(f"{SYNSETS[1]}\n{SYNSETS[0]}\n{SYNSETS[1]}\n")  # for val_1, val_2, val_3
  out = str(tmp_path / "tfds")
  bar.main(["--imagenet_tars", str(tmp_path), "--data_dir", out, "--val_labels", str(labels)])

  val = tfds.data_source("imagenet2012", split="validation", data_dir=out)  # plain tfds reads it
  assert {r["file_name"].decode(): int(r["label"]) for r in val} == {
      "ILSVRC2012_val_00000001.JPEG": 1, "ILSVRC2012_val_00000002.JPEG": 0,
      "ILSVRC2012_val_00000003.JPEG": 1}
  cfg = data_cfg(source="tfds", path=out, channels=3, num_classes=1000)
  train = sources.make_source(cfg, "train")
  assert sorted(int(train[i]["label"]) for i in range(len(train))) == [0, 0, 1, 1]
  assert all(train[i]["image"].shape == (12, 18, 3) for i in range(len(train)))


def test_encode_image_keeps_or_converts():
  rng = np.random.default_rng(0)
  rgb_jpeg, cmyk_jpeg = _jpeg(rng), _jpeg(rng, "CMYK")
  assert bar.encode_image(rgb_jpeg, 3) == rgb_jpeg
  fixed = Image.open(io.BytesIO(bar.encode_image(cmyk_jpeg, 3)))
  assert (fixed.format, fixed.mode) == ("JPEG", "RGB")
  png = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(png, format="PNG")
  assert bar.encode_image(png.getvalue(), 3) == png.getvalue()
  assert Image.open(io.BytesIO(bar.encode_image(png.getvalue(), 3, jpeg_only=True))).format == "JPEG"
  assert Image.open(io.BytesIO(bar.encode_image(png.getvalue(), 1))).mode == "L"


def test_imagenet2012_name_needs_synset_folders(folder, tmp_path):
  with pytest.raises(ValueError, match="not ImageNet synsets"):
    bar.build_imagefolder(folder, str(tmp_path / "tfds"))


# ---- clear errors -----------------------------------------------------------------------


def test_clear_errors(folder, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.data.path"):
    sources.make_source(data_cfg(source="imagefolder", path=str(tmp_path / "nope")), "train")
  with pytest.raises(ValueError, match="config.data.path"):
    sources.make_source(data_cfg(source="imagefolder", path=""), "train")
  with pytest.raises(FileNotFoundError, match="no split folder"):
    sources.make_source(data_cfg(source="imagefolder", path=str(tmp_path)), "train")
  os.makedirs(tmp_path / "train" / "empty_class")
  with pytest.raises(FileNotFoundError, match="No images"):
    sources.make_source(data_cfg(source="imagefolder", path=str(tmp_path)), "train")
  with pytest.raises(ValueError, match="num_classes=3"):
    sources.make_source(data_cfg(source="imagefolder", path=folder, num_classes=2), "train")
  with pytest.raises(FileNotFoundError, match="build_array_record.py"):
    sources.make_source(data_cfg(source="tfds", path=str(tmp_path), channels=3, num_classes=1000),
                        "train")
  with pytest.raises(ValueError, match="config.data.path"):
    sources.make_source(data_cfg(source="tfds", path=""), "train")
  with pytest.raises(ValueError, match="channels=1"):
    sources.make_source(data_cfg(channels=3), "train")
  with pytest.raises(ValueError, match="Unknown data.source"):
    sources.make_source(data_cfg(source="cifar"), "train")
  with pytest.raises(ValueError, match="multiple of the number of hosts"):
    pipeline.make_train_loader(data_cfg(batch_size=10), seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match="has 500"):
    pipeline.make_eval_loader(data_cfg(), "validation", 8, num_examples=501)


# ---- unreadable files -------------------------------------------------------------------


def _unreadable_folder(folder, tmp_path) -> str:
  """A copy of `folder` plus a truncated JPEG (train/ant) and a text file named fake.jpg (train/bee)."""
  root = tmp_path / "broken"
  shutil.copytree(folder, root)
  jpeg = root / "train" / "ant" / "9_truncated.jpg"
  pixels = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(jpeg, quality=95)
  data = jpeg.read_bytes()
  jpeg.write_bytes(data[:len(data) // 2])
  (root / "train" / "bee" / "fake.jpg").write_text("not an image\n")
  return str(root)


def test_unreadable_images_are_named_or_skipped(folder, tmp_path, caplog):
  root = _unreadable_folder(folder, tmp_path)
  cfg = data_cfg(source="imagefolder", path=root, channels=3, image_size=16, batch_size=17)
  source = sources.make_source(cfg, "train")
  for name in ("9_truncated.jpg", "fake.jpg"):
    path = next(f for f in source.files if f.endswith(name))
    with pytest.raises(sources.UnreadableImageError, match=re.escape(path) + ".*skip_unreadable"):
      source[source.files.index(path)]
  with pytest.raises(sources.UnreadableImageError, match=r"Cannot read image .*(9_truncated|fake)\.jpg"):
    next(pipeline.make_train_loader(cfg, seed=0))  # through grain's reader threads

  cfg.skip_unreadable = True
  source = sources.make_source(cfg, "train")
  bad = source.files.index(next(f for f in source.files if f.endswith("fake.jpg")))
  record = source[bad]  # the next readable file stands in, with its own label
  np.testing.assert_array_equal(record["image"], source[bad + 1]["image"])
  assert record["label"] == source.labels[bad + 1]
  with caplog.at_level("WARNING"):
    batches = [next(pipeline.make_train_loader(cfg, seed=0)) for _ in range(2)]
  assert batches[0]["image"].shape == (17, 16, 16, 3)  # a whole epoch: both files met
  np.testing.assert_array_equal(batches[0]["image"], batches[1]["image"])  # deterministic
  skipped = [r.getMessage() for r in caplog.records if "skip_unreadable" in r.getMessage()]
  assert any("9_truncated.jpg" in m for m in skipped) and any("fake.jpg" in m for m in skipped)
  assert any("2 unreadable file(s) skipped so far" in m for m in skipped)
