"""The dry run: counts match a real init, scanned layers are counted, memory (training, sampling,
evaluation), simulated meshes, stopping on SIGINT / SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import psutil
import pytest

from configs import tiny
from simflow_jax import errors, sharding, step_cost, steps
from simflow_jax.commands import dry_run
from simflow_jax.models import build, layers
from simflow_jax.pretrained import dinov2, inception, lpips

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


@pytest.mark.slow
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


@pytest.mark.slow
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


def _bytes(tree) -> int:
  return sum(4 * x.size for x in jax.tree.leaves(tree))


def test_sample_and_evaluate_sections(result, real_params):
  """Sampling holds the generator's parameters (no discriminator, no optimiser), its KV cache
  and the compiled sampler's buffers; evaluation adds the Inception network's."""
  s, e, t = result["sample"], result["evaluate"], result["train"]
  generator = {k: v for k, v in real_params.items() if k != "disc"}
  assert s["params_global_bytes"] == s["params_per_device_bytes"] == _bytes(generator)  # fsdp 1
  assert s["params_per_device_bytes"] < result["memory"]["state_per_device_bytes"]["params"] + 1
  config = tiny.get_config()
  flow = build.build_models(config).flow
  assert s["batch_size"] == config.sample.batch_size == 8 and s["per_device_batch"] == 4
  assert config.sample.guidance == 0 and s["kv_cache_dtype"] == "float32"
  # Keys and values of the largest block's layers, every token slot, float32.
  kv = max(flow.layers_per_block) * 2 * 4 * flow.seq_len * flow.width * 4
  assert s["kv_cache_per_device_bytes"] == kv
  c = s["compiled_per_device_bytes"]
  assert c["argument"] >= s["params_per_device_bytes"], "the parameters are the sampler's arguments"
  assert c["temp"] >= kv, "the KV cache lives in the sampler's temporaries"
  assert s["total_per_device_bytes"] == c["peak"] and s["compile_s"] > 0
  net_params = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 299, 299, 3), np.float32))["params"]
  assert e["inception_params_per_device_bytes"] == _bytes(net_params) > 90e6  # 23.8 M, replicated
  ci = e["inception_compiled_per_device_bytes"]
  assert ci["argument"] >= e["inception_params_per_device_bytes"] and ci["temp"] > 0
  assert e["total_per_device_bytes"] == max(s["total_per_device_bytes"],
                                            e["generator_params_per_device_bytes"] + ci["peak"])
  assert t["total_per_device_bytes"] == result["memory"]["compiled_per_device_bytes"]["peak"]


def _inference(config, devices: int = 8) -> dict:
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  return step_cost.inference_memory(config, mesh, compile=False)


def test_inference_memory_follows_the_mesh_batch_and_cache_dtype(real_params):
  """Params per device: fsdp 8 holds 1/8 of every split leaf, all of the others; the KV cache
  grows with the batch and the guided (doubled) batch, and halves in bfloat16."""
  config = tiny.get_config()
  with config.unlocked():
    config.mesh.fsdp_min_size = 256
    config.sample.batch_size = 16
  base = _inference(config)
  with config.unlocked():
    config.mesh.fsdp = 8
  split = _inference(config)
  generator = [x for k, v in real_params.items() if k != "disc" for x in jax.tree.leaves(v)]
  split_bytes = sum(4 * x.size for x in generator
                    if x.size >= 256 and any(d % 8 == 0 for d in x.shape))
  assert 0 < split_bytes < base["sample"]["params_per_device_bytes"]
  assert base["sample"]["params_per_device_bytes"] == _bytes(generator)
  assert split["sample"]["params_per_device_bytes"] == _bytes(generator) - split_bytes * 7 // 8
  assert (split["evaluate"]["generator_params_per_device_bytes"]
          == split["sample"]["params_per_device_bytes"])
  # The batch is split over all 8 devices, whatever the fsdp size.
  kv = base["sample"]["kv_cache_per_device_bytes"]
  assert split["sample"]["kv_cache_per_device_bytes"] == kv
  assert base["sample"]["per_device_batch"] == 2
  with config.unlocked():
    config.sample.batch_size = 32
  assert _inference(config)["sample"]["kv_cache_per_device_bytes"] == 2 * kv
  with config.unlocked():
    config.sample.kv_cache_dtype = "bfloat16"
  assert _inference(config)["sample"]["kv_cache_per_device_bytes"] == kv
  with config.unlocked():
    config.sample.guidance = 1.5
  assert _inference(config)["sample"]["kv_cache_per_device_bytes"] == 2 * kv
  for out in (base, split):
    assert out["sample"]["compiled_per_device_bytes"] is None
    assert out["sample"]["total_per_device_bytes"] == (out["sample"]["params_per_device_bytes"]
                                                       + out["sample"]["kv_cache_per_device_bytes"])


def test_a_signal_stops_the_dry_run_in_process(tmp_path, monkeypatch):
  """A signal received during a phase ends the run at the next phase boundary, writing nothing."""
  def analyze(config, num_devices, mfu, between):
    del config, num_devices, mfu
    os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler; the phase goes on
    between()
    raise AssertionError("the dry run went on after the signal")

  monkeypatch.setattr(step_cost, "analyze", analyze)
  config = tiny.get_config()
  config.dry_run.devices = 1
  with pytest.raises(errors.Interrupted, match="Interrupted by SIGTERM: nothing written") as e:
    dry_run.run(config, str(tmp_path))
  assert e.value.signum == signal.SIGTERM
  assert list(tmp_path.iterdir()) == []


def _cmdline(process) -> list:
  try:
    return process.cmdline()
  except psutil.Error:  # it ended meanwhile
    return []


@pytest.mark.slow
def test_sigint_stops_the_dry_run_and_its_subprocess(tmp_path):
  """main.py --mode=dry_run simulating more devices than it has: SIGINT while the subprocess
  works ends both, exit 130, the reason as the last line, no dry_run.json."""
  workdir, log = tmp_path / "dr", tmp_path / "stderr.txt"
  with open(log, "w") as err:  # 8 devices here (conftest): 16 are simulated in a subprocess
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"),
                             "--config=configs/tiny.py", "--mode=dry_run",
                             "--config.dry_run.devices=16", f"--workdir={workdir}"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
  try:
    deadline, child = time.monotonic() + 300, None
    while child is None and time.monotonic() < deadline and proc.poll() is None:
      child = next((c for c in psutil.Process(proc.pid).children(recursive=True)
                    if "simflow_jax.commands.dry_run" in " ".join(_cmdline(c))), None)
      time.sleep(0.2)
    assert child is not None, log.read_text()[-3000:]
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
  finally:
    proc.kill()
    proc.wait()
  stderr = log.read_text()
  assert proc.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1].startswith("Interrupted by SIGINT: nothing written;")
  child.wait(timeout=15)  # psutil.TimeoutExpired: the subprocess outlived the signal
  assert not child.is_running()
  assert not workdir.exists() or list(workdir.iterdir()) == []
