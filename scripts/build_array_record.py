"""Builds a tfds dataset as array_record files, without TensorFlow, for data.source='tfds'.

One job: write images from an ImageFolder or from the ImageNet tars in exactly
the layout `tfds.data_source` reads (DIR/<name>/<version>/<name>-<split>.array_record-*
+ dataset_info.json + features.json), using tfds's own writer with a small
builder defined here. No TensorFlow: tfds's stock imagenet2012 builder needs it
(tf.io) only to *build*; reading the result needs only tfds, array_record and
Pillow. Images are stored as their original JPEG/PNG bytes; an image whose
colour mode does not fit (CMYK, RGBA, palette ...) is converted (RGB, or L for
--channels=1) and re-encoded (JPEG quality 100, or PNG). The features are
image, label (tfds ClassLabel: names + count in features.json / label.labels.txt)
and file_name; dataset_info.json holds the split sizes.

  (a) ImageNet from the official tars (DIR holds ILSVRC2012_img_train.tar, a tar
      of per-class tars, and/or ILSVRC2012_img_val.tar):
        python scripts/build_array_record.py --imagenet_tars=DIR --data_dir=OUT
      writes OUT/imagenet2012/5.1.0 with the same features, label ids and version
      as tfds's imagenet2012; validation labels come from --val_labels (one synset
      per line, in the sorted order of the validation file names; default: the
      validation_labels.txt shipped inside tensorflow-datasets).
  (b) An ImageFolder ROOT/<split>/<class>/*.{jpg,jpeg,png} (splits: train,
      val or validation, test):
        python scripts/build_array_record.py --imagefolder=ROOT --data_dir=OUT [--name=NAME]
      With the default --name=imagenet2012 the class folders must be ImageNet
      synsets (n01440764 ...) and label ids follow tfds's imagenet2012; any other
      name writes OUT/NAME/1.0.0 with labels = sorted class folders of the train
      split (the torchvision ImageFolder order).

Then train with
  --config.data.source=tfds --config.data.path=OUT --config.data.tfds_name=NAME
(the script prints the exact flags). Building again into the same OUT reuses an
already prepared dataset; delete OUT/NAME to rebuild.
"""
import argparse
import io
import os
import sys
import tarfile
from typing import Callable, Iterator

from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

from simflow_jax.data import preprocess, sources

IMAGENET_NAME = "imagenet2012"
IMAGENET_VERSION = "5.1.0"   # tfds's imagenet2012 version: tfds.data_source('imagenet2012') reads it
FOLDER_VERSION = "1.0.0"
IMAGENET_TRAIN_TAR = "ILSVRC2012_img_train.tar"
IMAGENET_VAL_TAR = "ILSVRC2012_img_val.tar"
FOLDER_SPLITS = ("train", "validation", "test")  # "validation" also finds a folder named "val"

Examples = Callable[[], Iterator[tuple[str, dict]]]


def encode_image(data: bytes, channels: int, jpeg_only: bool = False) -> bytes:
  """The bytes to store for an image file's content `data`.

  Kept unchanged when it is a JPEG (or PNG, unless jpeg_only) whose mode the
  reader decodes to `channels` channels (RGB or L for 3, L for 1); otherwise
  converted to RGB / L and re-encoded: JPEG quality 100 when the input was a
  JPEG or jpeg_only, else PNG (lossless).
  """
  with Image.open(io.BytesIO(data)) as img:
    formats = ("JPEG",) if jpeg_only else ("JPEG", "PNG")
    modes = ("RGB", "L") if channels == 3 else ("L",)
    if img.format in formats and img.mode in modes:
      return data
    out_format = "JPEG" if jpeg_only or img.format == "JPEG" else "PNG"
    converted = preprocess.decode_8bit(img, "RGB" if channels == 3 else "L")  # 16-bit scaled, alpha on white
  buffer = io.BytesIO()
  converted.save(buffer, format=out_format, **({"quality": 100} if out_format == "JPEG" else {}))
  return buffer.getvalue()


def _builder(name: str, version: str, features: tfds.features.FeaturesDict,
             splits: dict[str, Examples], data_dir: str) -> tfds.core.DatasetBuilder:
  """A tfds GeneratorBasedBuilder (not registered) named `name` writing `splits` as array_record."""
  dataset_name = name

  class _FileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version(version)

    def _info(self) -> tfds.core.DatasetInfo:
      return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager  # everything is local
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      yield from splits[split]()

  return _FileBuilder(data_dir=data_dir, file_format="array_record")


def _prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def _imagenet_features() -> tfds.features.FeaturesDict:
  """tfds imagenet2012's features (same label names file, so the same label ids)."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(encoding_format="jpeg"),
      "label": tfds.features.ClassLabel(names_file=imagenet_common.label_names_file()),
      "file_name": tfds.features.Text(),
  })


def _folder_examples(split_dir: str, channels: int, jpeg_only: bool) -> Examples:
  def generate():
    for class_name in sources.list_class_dirs(split_dir):
      class_dir = os.path.join(split_dir, class_name)
      for path in sources.list_images(class_dir):
        with open(path, "rb") as f:
          image = encode_image(f.read(), channels, jpeg_only)
        key = os.path.relpath(path, split_dir)
        yield key, dict(image=image, label=class_name, file_name=os.path.basename(path))
  return generate


def build_imagefolder(root: str, data_dir: str, name: str = IMAGENET_NAME,
                      channels: int = 3) -> tfds.core.DatasetBuilder:
  """ROOT/<split>/<class>/* -> data_dir/name/<version> array_record files (module docstring)."""
  if channels not in (1, 3):
    raise ValueError(f"--channels must be 1 or 3, got {channels}")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"ImageFolder root {root!r} does not exist.")
  split_dirs = {}
  for split in FOLDER_SPLITS:
    try:
      split_dirs[split] = sources.find_split_dir(root, split)
    except FileNotFoundError:
      continue
  if not split_dirs:
    raise FileNotFoundError(f"{root!r} has none of the split folders train/, val/ (or validation/), "
                            "test/; expected ROOT/<split>/<class>/*.jpg")
  if name == IMAGENET_NAME:
    if channels != 3:
      raise ValueError("imagenet2012 images are RGB: use --channels=3 (or another --name)")
    with open(imagenet_common.label_names_file()) as f:
      synsets = set(f.read().split())
    for split_dir in split_dirs.values():
      unknown = [c for c in sources.list_class_dirs(split_dir) if c not in synsets]
      if unknown:
        raise ValueError(f"Class folders {unknown[:5]} in {split_dir!r} are not ImageNet synsets "
                         "(n01440764 ...); pass --name=YOUR_DATASET_NAME to build a generic dataset.")
    features, version = _imagenet_features(), IMAGENET_VERSION
  else:
    classes = sources.list_class_dirs(split_dirs.get("train", next(iter(split_dirs.values()))))
    for split_dir in split_dirs.values():
      extra = sorted(set(sources.list_class_dirs(split_dir)) - set(classes))
      if extra:
        raise ValueError(f"{split_dir!r} has class folders {extra[:5]} that the train split lacks.")
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, channels)),
        "label": tfds.features.ClassLabel(names=classes),
        "file_name": tfds.features.Text(),
    })
    version = FOLDER_VERSION
  splits = {split: _folder_examples(d, channels, jpeg_only=name == IMAGENET_NAME)
            for split, d in split_dirs.items()}
  return _prepare(_builder(name, version, features, splits, data_dir))


def _imagenet_train_examples(tar_path: str) -> Examples:
  def generate():
    with tarfile.open(tar_path, mode="r|") as outer:
      for member in outer:
        if not member.isfile() or not member.name.endswith(".tar"):
          continue
        synset = os.path.basename(member.name)[:-len(".tar")]
        inner_bytes = io.BytesIO(outer.extractfile(member).read())  # one class, ~150 MB
        with tarfile.open(fileobj=inner_bytes, mode="r:") as inner:
          for image in inner:
            if image.isfile():
              data = encode_image(inner.extractfile(image).read(), 3, jpeg_only=True)
              file_name = os.path.basename(image.name)
              yield file_name, dict(image=data, label=synset, file_name=file_name)
  return generate


def _imagenet_val_examples(tar_path: str, labels_path: str) -> Examples:
  with open(labels_path) as f:
    labels = f.read().split()
  with tarfile.open(tar_path, mode="r:") as tar:
    names = sorted(os.path.basename(m.name) for m in tar.getmembers() if m.isfile())
  if len(names) != len(labels):
    raise ValueError(f"{tar_path} has {len(names)} images but {labels_path} has {len(labels)} "
                     "labels; --val_labels needs one synset per line for the sorted file names.")
  label_of = dict(zip(names, labels))

  def generate():
    with tarfile.open(tar_path, mode="r|") as tar:
      for member in tar:
        if member.isfile():
          file_name = os.path.basename(member.name)
          data = encode_image(tar.extractfile(member).read(), 3, jpeg_only=True)
          yield file_name, dict(image=data, label=label_of[file_name], file_name=file_name)
  return generate


def default_val_labels() -> str:
  """tfds's ImageNet validation labels: synsets in the sorted order of the 50,000 file names."""
  return os.fspath(tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt"))


def build_imagenet_tars(tar_dir: str, data_dir: str, val_labels: str = "") -> tfds.core.DatasetBuilder:
  """ILSVRC2012_img_{train,val}.tar in tar_dir -> data_dir/imagenet2012/5.1.0 (module docstring)."""
  train_tar = os.path.join(tar_dir, IMAGENET_TRAIN_TAR)
  val_tar = os.path.join(tar_dir, IMAGENET_VAL_TAR)
  splits = {}
  if os.path.exists(train_tar):
    splits["train"] = _imagenet_train_examples(train_tar)
  if os.path.exists(val_tar):
    labels_path = val_labels or default_val_labels()
    if not os.path.exists(labels_path):
      raise FileNotFoundError(f"Validation labels file {labels_path!r} does not exist.")
    splits["validation"] = _imagenet_val_examples(val_tar, labels_path)
  if not splits:
    raise FileNotFoundError(f"Neither {train_tar} nor {val_tar} exists: download them from "
                            "https://image-net.org/download-images and pass their folder as --imagenet_tars.")
  return _prepare(_builder(IMAGENET_NAME, IMAGENET_VERSION, _imagenet_features(), splits, data_dir))


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--imagefolder", help="ROOT with ROOT/<split>/<class>/*.{jpg,jpeg,png}")
  source.add_argument("--imagenet_tars", help="folder with ILSVRC2012_img_train.tar / _val.tar")
  parser.add_argument("--data_dir", required=True, help="tfds data_dir to write (data.path)")
  parser.add_argument("--name", default=IMAGENET_NAME, help="dataset name (data.tfds_name); ImageFolder only")
  parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="ImageFolder only")
  parser.add_argument("--val_labels", default="",
                      help="ImageNet tars only: validation synsets, one per line, sorted file-name order "
                           "(default: tensorflow-datasets' validation_labels.txt)")
  args = parser.parse_args(argv)
  if args.imagenet_tars and (args.name != IMAGENET_NAME or args.channels != 3):
    parser.error("--imagenet_tars always builds imagenet2012 (RGB); --name/--channels are for --imagefolder")
  if args.imagefolder and args.val_labels:
    parser.error("--val_labels is for --imagenet_tars")
  return args


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.imagefolder:
    builder = build_imagefolder(args.imagefolder, args.data_dir, args.name, args.channels)
  else:
    builder = build_imagenet_tars(args.imagenet_tars, args.data_dir, args.val_labels)
  info = builder.info
  counts = ", ".join(f"{split}={info.splits[split].num_examples}" for split in sorted(info.splits))
  print(f"Wrote {builder.data_path} ({counts}; {info.features['label'].num_classes} classes)")
  print("Train with: --config.data.source=tfds "
        f"--config.data.path={os.path.abspath(args.data_dir)} --config.data.tfds_name={builder.name} "
        f"--config.data.num_classes={info.features['label'].num_classes} "
        f"--config.data.channels={info.features['image'].shape[-1]}")


if __name__ == "__main__":
  main(sys.argv[1:])
