"""The dry run: counts match a real init, scanned layers are counted, memory, simulated meshes."""
import json

import jax
import numpy as np
import pytest

from configs import tiny
from simflow_jax import sharding, step_cost, steps
from simflow_jax.commands import dry_run
from simflow_jax.models import build, layers
from simflow_jax.pretrained import dinov2, lpips


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dry_run")
  config = tiny.get_config()
  config.dry_run.devices = 2
  out = dry_run.run(config, str(workdir))
  with open(workdir / "dry_run.json") as f:
    assert json.load(f) == json.loads(json.dumps(out)), "dry_run.json must hold the returned dict"
  return out


@pytest.fixture(scope="module")
def real_params():
  models = build.build_models(tiny.get_config())
  return jax.jit(lambda r: build.init_params(models, r))(jax.random.key(0))


def test_parameter_counts_equal_a_real_init(result, real_params):
  """The dry run counts the abstract, sharded train state; a real init of the models has as
  many parameters, in all and per model, and each model's count splits into its subtrees'."""
  counts = result["params"]
  assert counts["total"] == sum(x.size for x in jax.tree.leaves(real_params))
  assert {k for k in counts if "/" not in k} == {"total", *real_params}
  for name, sub in real_params.items():
    assert counts[name] == sum(x.size for x in jax.tree.leaves(sub)), name
    children = {k.split("/", 1)[1]: n for k, n in counts.items() if k.startswith(f"{name}/")}
    assert set(children) == set(sub) and sum(children.values()) == counts[name], name


def test_flops_memory_timing_and_estimates(result):
  f, m, t = result["flops"], result["memory"], result["timing_s"]
  assert result["mesh"]["devices"] == 2 and result["mesh"]["per_device_batch"] == 4
  assert f["per_step"] > 0
  assert f["per_example"] == pytest.approx(f["per_step"] / 8)
  n_params = result["params"]["total"]
  assert m["state_global_bytes"]["params"] == 4 * n_params  # float32
  # Adam keeps two moments per parameter (+ step counters); the EMA mirrors the generator.
  assert 2 * 4 * n_params <= m["state_global_bytes"]["opt_state"] < 2 * 4 * n_params + 1024
  assert m["state_global_bytes"]["ema"] == 4 * n_params  # tiny has no discriminator
  assert m["state_per_device_bytes"] == m["state_global_bytes"]  # mesh.fsdp=1: replicated
  c = m["compiled_per_device_bytes"]
  assert c["temp"] > 0 and c["peak"] > 0
  state_bytes = sum(m["state_per_device_bytes"].values())
  assert c["argument"] >= state_bytes, "the state is an argument of the step"
  assert c["alias"] >= m["state_per_device_bytes"]["params"], "the state is donated"
  assert t["trace_and_lower"] > 0 and t["compile"] > 0 and t["compile_cpu"] > 0
  est = result["estimates"]
  assert est["chips"] == 2 and set(est["per_chip"]) == set(step_cost.REFERENCE_CHIPS)
  for chip, e in est["per_chip"].items():
    # Compute-bound at the assumed utilisation, on as many chips as the mesh has devices.
    chip_flops = est["chips"] * step_cost.REFERENCE_CHIPS[chip].peak_flops * est["mfu"]
    assert e["step_time_s"] * chip_flops == pytest.approx(f["per_step"])
    assert e["fits_in_hbm"] is True  # a tiny step


def test_scanned_layers_are_counted_in_flops(result):
  """XLA counts a while loop's body once; one more layer per block must add its FLOPs."""
  config = tiny.get_config()
  assert config.flow.layers == (1, 1) and config.flow.scan_layers and config.flow.mlp_ratio == 4
  with config.unlocked():
    config.flow.layers = (2, 2)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  extra = step_cost.step_flops(config, mesh) - result["flops"]["per_step"]
  w, s, b = config.flow.width, build.build_models(config).flow.seq_len, config.data.batch_size
  # Per token and layer, forward: qkv + out + MLP matmuls 2 * 12 w^2, scores and mixing
  # 4 s w times the share of the (s, s) logits that n query chunks compute, (n + 1) / 2n
  # (layers.causal_attention); backward twice that. Two extra layers, b * s tokens.
  n = layers.attention_chunks(s)
  matmul_flops = 2 * 3 * b * s * (2 * 12 * w * w + 4 * s * w * (n + 1) / (2 * n))
  assert 1.0 <= extra / matmul_flops <= 1.2, (extra, matmul_flops)


def test_simulated_devices_in_a_subprocess_with_fsdp(real_params):
  config = tiny.get_config()
  with config.unlocked():
    config.data.batch_size = 16
    config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 256
  out = dry_run._analyze_in_subprocess(config, 16, compile=False)
  assert out["mesh"]["shape"] == {"data": 8, "fsdp": 2}
  assert out["memory"]["compiled_per_device_bytes"] is None and out["timing_s"]["compile"] is None
  # Leaves with >= 256 elements and an even dimension are split in two, the rest replicated.
  expected = 0
  for x in jax.tree.leaves(real_params):
    split = x.size >= 256 and any(d % 2 == 0 for d in x.shape)
    expected += 4 * x.size // (2 if split else 1)
  assert out["memory"]["state_per_device_bytes"]["params"] == expected
  assert expected < out["memory"]["state_global_bytes"]["params"]


def test_clear_errors():
  with pytest.raises(ValueError, match="dry_run.devices=999"):
    step_cost.analyze(tiny.get_config(), num_devices=999)
  config = tiny.get_config()
  with config.unlocked():
    config.data.batch_size = 6
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  with pytest.raises(ValueError, match="batch_size=6"):
    steps.build_step(config, mesh)


def test_abstract_frozen_networks_have_the_loaded_shapes():
  config = tiny.get_config()
  with config.unlocked():
    config.loss.w_lpips = 1.0
    config.repa.enabled, config.repa.encoder = True, "tiny"
  frozen = steps.abstract_frozen(config)
  flat = {tuple(k.key for k in path): x.shape
          for path, x in jax.tree_util.tree_flatten_with_path(frozen["lpips"])[0]}
  assert flat == lpips.expected_shapes()
  # The check that guards loading converted weights accepts arrays of these shapes.
  dinov2.check_params(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), frozen["repa_encoder"]),
                      "tiny")
  with pytest.raises(ValueError, match="do not match preset"):
    dinov2.check_params(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), frozen["repa_encoder"]),
                        "dinov2_s14")
