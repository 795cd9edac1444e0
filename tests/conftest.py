"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory) -> str:
  """A workdir holding configs/tiny.py trained for its 4 steps, built once per session
  (per xdist worker) and shared by the CLI tests (evaluate, likelihood, sample)."""
  from configs import tiny
  from simflow_jax import train
  config = tiny.get_config()
  workdir = str(tmp_path_factory.getbasetemp() / "tiny_trained")
  train.train_and_evaluate(config, workdir)
  return workdir
