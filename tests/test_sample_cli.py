"""--mode=sample (commands/sample.py): the grid PNG, the ADM .npz export against the library sampler,
bit-exact resume, seeds, the object-store write path, the clear errors, and the .npz layout
helpers (figures.to_uint8, write_npz_shard / merge_npz_shards)."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from simflow_jax import checkpoint, files, sample
from simflow_jax.commands import sample as export
from simflow_jax.evals import figures
from simflow_jax.models import build

NUM, BATCH, CLASSES = 20, 8, (1, 3, 5)  # 3 shards: 8, 8, 4 samples


def make_config(**sample_fields):
  config = tiny.get_config()
  config.sample.num_samples, config.sample.batch_size, config.sample.classes = NUM, BATCH, CLASSES
  for key, value in sample_fields.items():
    config.sample[key] = value
  return config


def load_npz(path):
  with np.load(path) as f:
    return f["arr_0"], f["arr_1"]


@pytest.fixture(scope="module")
def trained(tiny_trained):
  return tiny_trained


def copy_run(trained, folder) -> str:
  """A workdir of our own holding the trained checkpoints (samples written here stay here)."""
  shutil.copytree(os.path.join(trained, "checkpoints"), os.path.join(folder, "checkpoints"))
  return str(folder)


@pytest.fixture(scope="module")
def first(trained, tmp_path_factory):
  """One export into a fresh workdir: (workdir, result, merged arrays (images, labels))."""
  workdir = copy_run(trained, tmp_path_factory.mktemp("sample_first"))
  result = export.run(make_config(), workdir)
  images, labels = load_npz(result["npz_path"])
  return workdir, result, images, labels


def test_grid_png(first):
  _, result, _, _ = first
  assert result["grid_path"].endswith(os.path.join("samples", "sample_grid.png"))
  with Image.open(result["grid_path"]) as im:
    cols, rows = tiny.get_config().train.grid_per_class, len(CLASSES)
    assert im.size == (cols * 34 + 2, rows * 34 + 2)  # 32-pixel tiles, 2-pixel padding
    assert im.mode == "L"                             # 1-channel digits
    grid = np.asarray(im)
  tiles = [grid[2 + r * 34:2 + r * 34 + 32, 2 + c * 34:2 + c * 34 + 32]
           for r in range(rows) for c in range(cols)]
  assert len({t.tobytes() for t in tiles}) == len(tiles)  # every tile its own sample


def test_npz_layout_and_balanced_labels(first):
  workdir, result, images, labels = first
  assert result["npz_path"] == os.path.join(workdir, "samples", f"samples_{NUM}x32x32x3.npz")
  assert (result["num_samples"], result["shards_sampled"], result["shards_resumed"]) == (NUM, 3, 0)
  assert result["checkpoint_step"] == 4 and result["images_per_sec"] > 0
  assert images.dtype == np.uint8 and images.shape == (NUM, 32, 32, 3)
  assert np.array_equal(images[..., 0], images[..., 2])  # grayscale repeated to RGB
  assert images.std() > 0
  assert labels.dtype == np.int64 and np.array_equal(labels, np.arange(NUM) % 10)
  assert np.array_equal(np.bincount(labels, minlength=10), np.full(10, 2))
  shards = sorted(os.listdir(os.path.join(workdir, "samples", "npz")))
  assert shards == ["settings.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
  assert [load_npz(os.path.join(workdir, "samples", "npz", s))[0].shape[0] for s in shards[1:]] == [8, 8, 4]
  umask = os.umask(0o022)
  os.umask(umask)
  assert os.stat(result["npz_path"]).st_mode & 0o777 == 0o666 & ~umask  # not the 0o600 of a temp file


def test_shards_are_the_library_sampler(first):
  """Shard i = make_sample_fn on its labels (padded with class 0 to the batch) with noise
  fold_in(key(seed), i): the mesh-sharded sampler computes the same images."""
  workdir, _, images, _ = first
  config = make_config()
  models = build.build_models(config)
  params = checkpoint.load_params(workdir, config, use_ema=True)
  fn = sample.make_sample_fn(models, config.sample)
  for shard, start, count in [(0, 0, 8), (2, 16, 4)]:
    padded = np.zeros(BATCH, np.int32)
    padded[:count] = np.arange(start, start + count) % 10
    ref = figures.to_uint8(fn(params, padded, jax.random.fold_in(jax.random.key(config.seed), shard)))[:count]
    got = images[start:start + count, ..., :1]
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # rounding of float noise at .5
    assert np.mean(got == ref) > 0.99


@pytest.mark.slow
def test_sampling_restores_the_generator_alone_sharded_by_the_mesh_rules(first, trained, tmp_path,
                                                                         monkeypatch):
  """mesh.fsdp=8 on the 8 devices: the command restores the EMA generator alone (no optimiser
  moments, no raw copy, no discriminator; never load_params' whole state), the sampler gets it
  split over 'fsdp' by the mesh rules, and the samples are those of the fsdp=1 export."""
  _, _, images, labels = first
  config = make_config()
  config.mesh.fsdp, config.mesh.fsdp_min_size = 8, 256  # the tiny model's larger kernels split
  monkeypatch.setattr(checkpoint, "load_params", lambda *a, **k: pytest.fail("whole state read"))
  restore_targets, sampler_params = [], []
  real_restore = checkpoint.ocp.CheckpointManager.restore

  def spy_restore(self, step, args=None):
    restore_targets.append(args)
    return real_restore(self, step, args=args)

  real_sampler = export._make_sharded_sampler

  def spy_sampler(*a, **k):
    fn = real_sampler(*a, **k)

    def wrapped(params, labels, rng):
      sampler_params.append(params)
      return fn(params, labels, rng)
    return wrapped

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "restore", spy_restore)
  monkeypatch.setattr(export, "_make_sharded_sampler", spy_sampler)
  result = export.run(config, copy_run(trained, tmp_path))

  state_reads = [a["state"] for a in restore_targets if a is not None and "state" in a]
  assert len(state_reads) == 1  # one partial restore of the state item ...
  assert set(state_reads[0].item) == {"ema"}  # ... of the EMA alone
  assert set(state_reads[0].item["ema"]) == {"vae", "flow"}
  params = sampler_params[0]
  assert all(p is params for p in sampler_params)  # restored once
  models = build.build_models(config)
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  expected = export.sharding.tree_shardings(
      jax.eval_shape(lambda r: build.init_params(models, r), jax.random.key(0)), mesh, config.mesh,
      prefix=".ema")
  split = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    want = expected[path[0].key]
    for p in path[1:]:
      want = want[p.key]
    assert leaf.sharding == want, jax.tree_util.keystr(path)
    if "fsdp" in tuple(want.spec):
      split += 1
      assert leaf.addressable_shards[0].data.size == leaf.size // 8
  assert split > 0 and dict(mesh.shape) == {"data": 1, "fsdp": 8}
  images2, labels2 = load_npz(result["npz_path"])
  assert np.array_equal(labels2, labels)
  assert np.abs(images2.astype(int) - images.astype(int)).max() <= 1  # float rounding at .5
  assert np.mean(images2 == images) > 0.99


def test_resume_is_bit_exact(first):
  workdir, _, images, labels = first
  npz_dir = os.path.join(workdir, "samples", "npz")
  kept = {s: os.stat(os.path.join(npz_dir, s)).st_mtime_ns for s in ("shard_00000.npz", "shard_00002.npz")}
  os.remove(os.path.join(npz_dir, "shard_00001.npz"))
  os.remove(os.path.join(workdir, "samples", f"samples_{NUM}x32x32x3.npz"))
  result = export.run(make_config(), workdir)
  assert (result["shards_sampled"], result["shards_resumed"]) == (1, 2)
  assert {s: os.stat(os.path.join(npz_dir, s)).st_mtime_ns for s in kept} == kept  # not rewritten
  images2, labels2 = load_npz(result["npz_path"])
  assert np.array_equal(images2, images) and np.array_equal(labels2, labels)


def test_same_seed_same_samples_through_the_object_store_path(first, trained, tmp_path, monkeypatch):
  """A from-scratch export in another workdir reproduces the first one exactly. It runs the
  gs:// code path (stage locally, then upload / download through epath) on a local folder."""
  _, _, images, labels = first
  monkeypatch.setattr(files, "is_local", lambda path: False)
  result = export.run(make_config(), copy_run(trained, tmp_path))
  assert result["shards_sampled"] == 3
  images2, labels2 = load_npz(result["npz_path"])
  assert np.array_equal(images2, images) and np.array_equal(labels2, labels)
  assert not [f for f in os.listdir(os.path.dirname(result["npz_path"])) if f.startswith(".tmp")]


def test_other_seed_other_samples(first, trained, tmp_path):
  _, _, images, labels = first
  config = make_config(num_samples=8)
  config.seed = 1
  images_b, labels_b = load_npz(export.run(config, copy_run(trained, tmp_path))["npz_path"])
  assert np.array_equal(labels_b, labels[:8])
  assert np.mean(images_b != images[:8]) > 0.3


def test_changed_settings_do_not_mix_with_old_shards(first):
  workdir, _, _, _ = first
  config = make_config()
  config.seed = 1
  with pytest.raises(ValueError, match=r"differ in: seed.*delete .*npz"):
    export.run(config, workdir)
  with pytest.raises(ValueError, match=r"differ in: guidance, num_samples"):
    export.run(make_config(num_samples=24, guidance=1.0), workdir)


# The argument checks come before the checkpoint is read: an empty workdir proves it.
@pytest.mark.parametrize("fields, message", [
    ({"classes": (1, 10)}, r"class ids \[10\] are outside \[0, 10\)"),
    ({"batch_size": 12}, r"batch_size=12 .* multiple of the 8 devices.*batch_size=8"),
])
def test_bad_arguments(tmp_path, fields, message):
  with pytest.raises(ValueError, match=message):
    export.run(make_config(**fields), str(tmp_path))


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="train first"):
    export.run(make_config(), str(tmp_path))


# ---- ADM .npz export ----------------------------------------------------------------
def test_to_uint8_values():
  x = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(figures.to_uint8(x), [0, 0, 128, 191, 255, 255])
  assert figures.to_uint8(jnp.asarray(x)).dtype == np.uint8


def test_npz_shards_layout_and_merge(tmp_path):
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  rgb = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  p1, p2, out = str(tmp_path / "s1.npz"), str(tmp_path / "s2.npz"), str(tmp_path / "all.npz")
  export.write_npz_shard(p1, gray, np.array([0, 1, 2]))
  export.write_npz_shard(p2, rgb, np.array([7, 8], np.int32))
  with np.load(p1) as f:
    assert sorted(f.files) == ["arr_0", "arr_1"]
    assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (3, 8, 8, 3)
    for c in range(3):
      np.testing.assert_array_equal(f["arr_0"][..., c], gray[..., 0])
    assert np.issubdtype(f["arr_1"].dtype, np.integer)
    np.testing.assert_array_equal(f["arr_1"], [0, 1, 2])
  assert export.merge_npz_shards([p1, p2], out) == 5
  with np.load(out) as f:
    assert f["arr_0"].shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(f["arr_0"][3:], rgb)
    np.testing.assert_array_equal(f["arr_1"], [0, 1, 2, 7, 8])
  assert sorted(os.listdir(tmp_path)) == ["all.npz", "s1.npz", "s2.npz"]  # no temporary files left
  with pytest.raises(ValueError, match="uint8"):
    export.write_npz_shard(p1, gray.astype(np.float32), np.array([0, 1, 2]))
  with pytest.raises(ValueError, match="one per image"):
    export.write_npz_shard(p1, gray, np.array([0, 1]))
  export.write_npz_shard(str(tmp_path / "small.npz"), rng.integers(0, 256, (1, 4, 4, 3), dtype=np.uint8), [0])
  with pytest.raises(ValueError, match="merge shards of one run"):
    export.merge_npz_shards([p1, str(tmp_path / "small.npz")], out)
