"""grain input pipelines: a checkpointable, sharded training stream and one-pass eval batches.

One job: turn a source (`sources.make_source`) into numpy batches for the trainer.

Training (`make_train_loader`): ONE global stream, the same whatever the number of
hosts: the whole split shuffled with `seed` (a new order every epoch), repeated
forever, center-cropped/resized to `data.image_size` (ADM) and flipped left-right
with probability 1/2 when `data.random_flip` (the flip's randomness is drawn from
the example's position in the global stream). Global batch k is examples
[k B, (k + 1) B) of that stream (B = `data.batch_size`); host h of n loads only
its slice [k B + h B/n, k B + (h + 1) B/n) of it, in order, so the hosts' slices
concatenated in process order (what `jax.make_array_from_process_local_data`
builds) are the global batch: 2 hosts x 4 devices train on exactly the batches
of 1 host x 8 devices. Images are scaled to float32 [-1, 1]. The same seed gives
the same stream. The returned grain DatasetIterator has `get_state()` /
`set_state()`: restoring a saved state in a fresh iterator continues exactly
where the saved one was (store the state in the checkpoint). Its state counts
host-local examples; `rescale_train_state` converts a state saved with another
host count (worker_count 0 only).

Eval (`make_eval_loader`): one pass over (the first `num_examples` of) a split,
no shuffle, no flip; global batch k holds examples [k B, (k + 1) B) (zero images
with `mask=False` past the end), host h loads its slice of each as in training, and
every host yields the same number of batches, so summing masked values over all
hosts counts every example exactly once, and any host count evaluates the same
global batches (per-batch noise keyed by the batch index agrees).

Batches are dicts of numpy arrays:
  image (B_host, H, W, C) float32 in [-1, 1], label (B_host,) int32
  (+ mask (B_host,) bool in eval)
`data.worker_count > 0` runs the per-example work and batching in that many
grain worker processes (absl flags must be parsed first, as app.run does). Each
worker builds whole batches from its own slice, so the batch order depends on
worker_count: keep it fixed within a run (a saved state restores only into a
loader with the same worker_count).
"""
import math

import grain
import numpy as np

from simflow_jax.data import preprocess
from simflow_jax.data import sources

# Per-example reads run in threads (Pillow decoding and resizing release the GIL).
_READ_THREADS = 16


def per_host_batch_size(batch_size: int, process_count: int) -> int:
  """The global batch size split evenly over hosts; a clear error if it does not divide."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"The global batch size {batch_size} must be a positive multiple of the "
                     f"number of hosts ({process_count}); change data.batch_size.")
  return batch_size // process_count


def rescale_train_state(state: dict, saved_count: int, process_count: int) -> dict:
  """A training iterator state saved by one of `saved_count` hosts -> the same position (the
  same number of global batches consumed) for a host of `process_count`. Every host of a run
  is at the same global batch, so any saved host's state serves. Only the single-process
  loader's state ({'next_index': n}, data.worker_count=0) can be converted."""
  if set(state) != {"next_index"}:
    raise ValueError(f"This checkpoint's data position was saved by {saved_count} hosts with "
                     f"data.worker_count > 0 and cannot be moved to {process_count} hosts; resume "
                     f"with {saved_count} processes, or train with data.worker_count=0.")
  examples = int(state["next_index"]) * saved_count  # global examples consumed: k * B
  if examples % process_count:
    raise ValueError(f"The saved data position ({examples} examples) is not a whole number of "
                     f"batches for {process_count} hosts.")
  return {"next_index": examples // process_count}


class _HostSlice(grain.MapDataset):
  """Host `index`'s slices of consecutive global batches of `parent`: element i is
  parent[(i // b) * B + index * b + i % b] with b = B / count."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
    super().__init__(parent)
    self._global, self._local, self._offset = global_batch, global_batch // count, index * (global_batch // count)
    self._length = len(parent) // global_batch * self._local

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, within = divmod(index, self._local)
    return self._parent[batch * self._global + self._offset + within]

  def __str__(self) -> str:
    return f"_HostSlice(global_batch={self._global}, host_batch={self._local}, offset={self._offset})"


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")


class _CropResize(grain.transforms.Map):
  """Record -> record with its image center-cropped/resized to (size, size, channels)."""

  def __init__(self, size: int, channels: int):
    self.size = size
    self.channels = channels

  def map(self, record: dict) -> dict:
    image = record["image"]
    if image.ndim != 3 or image.shape[-1] != self.channels:
      raise ValueError(f"The source yields images of shape {image.shape} but data.channels="
                       f"{self.channels}; set --config.data.channels={image.shape[-1]}.")
    return dict(record, image=preprocess.center_crop_resize(image, self.size))


class _CropResizeFlip(grain.transforms.RandomMap):
  """_CropResize, then a left-right flip with probability 1/2 (rng from grain: deterministic)."""

  def __init__(self, size: int, channels: int):
    self.crop = _CropResize(size, channels)

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    record = self.crop.map(record)
    return dict(record, image=preprocess.random_flip(record["image"], rng))


class _ToFloat(grain.transforms.Map):
  """Batch with uint8 images -> float32 images in [-1, 1]."""

  def map(self, batch: dict) -> dict:
    return dict(batch, image=preprocess.to_float(batch["image"]))


class _PaddedShard:
  """One host's eval shard padded to `length` records; padding has a zero image and mask=False."""

  def __init__(self, source, indices, length: int, image_shape: tuple[int, int, int]):
    self.source = source
    self.indices = indices
    self.length = length
    self.image_shape = image_shape

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict:
    if index < len(self.indices):
      return dict(self.source[self.indices[index]], mask=np.True_)
    return dict(image=np.zeros(self.image_shape, np.uint8), label=np.int32(0), mask=np.False_)


def _finish(ds: grain.MapDataset, batch_size: int, drop_remainder: bool,
            worker_count: int) -> grain.DatasetIterator:
  """MapDataset of uint8 records -> iterator of float32 batches (threads, then workers)."""
  read = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=max(2 * batch_size, 64))
  it_ds = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder).map(_ToFloat())
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def make_train_loader(data_cfg, seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.DatasetIterator:
  """The endless, shuffled, sharded training stream of `data_cfg.train_split` (module docstring)."""
  _check_process(process_index, process_count)
  batch = per_host_batch_size(data_cfg.batch_size, process_count)
  source = sources.make_source(data_cfg, data_cfg.train_split)
  if len(source) == 0:
    raise ValueError(f"The training split {data_cfg.train_split!r} has no examples.")
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  if data_cfg.random_flip:  # before the host slice: the flip depends on the global position
    ds = ds.random_map(_CropResizeFlip(data_cfg.image_size, data_cfg.channels))
  else:
    ds = ds.map(_CropResize(data_cfg.image_size, data_cfg.channels))
  ds = _HostSlice(ds, data_cfg.batch_size, process_index, process_count)
  return _finish(ds, batch, drop_remainder=True, worker_count=data_cfg.worker_count)


def make_eval_loader(data_cfg, split: str, batch_size: int, process_index: int = 0,
                     process_count: int = 1, num_examples: int | None = None) -> grain.DatasetIterator:
  """One ordered pass over `split` in masked, padded batches (module docstring).

  batch_size is GLOBAL (split over hosts like data.batch_size). num_examples:
  the first that many examples of the split (None = all of it).
  """
  _check_process(process_index, process_count)
  batch = per_host_batch_size(batch_size, process_count)
  source = sources.make_source(data_cfg, split)
  total = len(source) if num_examples is None else num_examples
  if not 0 < total <= len(source):
    raise ValueError(f"Cannot evaluate {total} examples: split {split!r} of data.source="
                     f"{data_cfg.source!r} has {len(source)}.")
  num_batches = math.ceil(total / batch_size)  # the same on every host
  # Host h loads rows [h b, (h + 1) b) of every global batch k (examples k B + h b ...), as in
  # training: any host count forms the same global batches in the same order.
  lo = process_index * batch
  indices = [i for k in range(num_batches) for i in range(k * batch_size + lo, k * batch_size + lo + batch)
             if i < total]  # padding only in the last global batch: after this host's examples
  shape = (data_cfg.image_size, data_cfg.image_size, data_cfg.channels)
  shard = _PaddedShard(source, indices, num_batches * batch, shape)
  ds = grain.MapDataset.source(shard).map(_CropResize(data_cfg.image_size, data_cfg.channels))
  return _finish(ds, batch, drop_remainder=False, worker_count=data_cfg.worker_count)
