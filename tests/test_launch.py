"""Tests for the Cloud TPU scripts in launch/: dry-run commands, --help, shellcheck.

Dry runs check the printed gcloud commands and that each remote --command is
valid shell. A fake `gcloud` on PATH (it logs its arguments and replays scripted
TPU states) drives the real, non-dry paths: watch.sh's preemption recovery and
setup.sh's tarball of this checkout.
"""
import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("create", "setup", "train", "logs", "watch", "delete")
SETTINGS = ("PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "SPOT", "QUEUED",
            "QR_NAME", "BUCKET", "RUN_NAME", "CONFIG", "WORKDIR", "DATA_PATH", "EXTRA_ARGS",
            "REPO_URL", "BRANCH", "REMOTE_DIR", "PYTHON_VERSION", "PIP_EXTRA", "MAX_RESTARTS",
            "POLL_SECS", "WORKER", "DRY_RUN", "TARBALL")
BASE = "--project=proj --zone=us-east5-a"


def launch(script, *args, path_prefix=None, **settings):
  """Runs launch/<script>.sh with only the given settings (none leak from the caller)."""
  env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
  env.update(PROJECT="proj", BUCKET="bkt", ZONE="us-east5-a")
  env.update({k: str(v) for k, v in settings.items()})
  if path_prefix is not None:
    env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
  return subprocess.run(["bash", str(LAUNCH / f"{script}.sh"), *args], env=env,
                        capture_output=True, text=True, timeout=60, check=False)


def dry(script, **settings):
  result = launch(script, "--dry-run", **settings)
  assert result.returncode == 0, result.stderr
  return result.stdout


def commands(output):
  """The printed commands (comments dropped), each split into words as bash would."""
  return [shlex.split(line) for line in output.splitlines() if line and not line.startswith("#")]


def remote_commands(output):
  return [word.removeprefix("--command=") for cmd in commands(output) for word in cmd
          if word.startswith("--command=")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_runs_nothing(script, tmp_path):
  result = launch(script, "--help", path_prefix=_fake_gcloud(tmp_path))
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f"Usage: launch/{script}.sh")
  assert not (tmp_path / "calls").exists(), "--help called gcloud"


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument_fails_with_usage(script):
  result = launch(script, "--bogus")
  assert result.returncode != 0
  assert "unknown argument '--bogus'" in result.stderr and "Usage:" in result.stderr


def test_create_spot_v5p():
  out = dry("create", ACCELERATOR_TYPE="v5p-64", SPOT=1)
  assert commands(out) == [shlex.split(
      f"gcloud compute tpus tpu-vm create simflow {BASE} --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5 --spot")]


def test_create_on_demand_v4_has_no_spot_flag():
  out = dry("create", ACCELERATOR_TYPE="v4-32", SPOT=0, TPU_NAME="mytpu")
  assert commands(out) == [shlex.split(
      f"gcloud compute tpus tpu-vm create mytpu {BASE} --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base")]


def test_create_queued_v5e_waits_for_active():
  out = dry("create", ACCELERATOR_TYPE="v5litepod-16", QUEUED=1, SPOT=1)
  cmds = commands(out)
  assert cmds[0] == shlex.split(
      f"gcloud compute tpus queued-resources create simflow-qr {BASE} --node-id=simflow "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot")
  assert cmds[1] == shlex.split(
      f"gcloud compute tpus queued-resources describe simflow-qr {BASE} "
      "--format=value(state.state)")


def test_runtime_version_override_and_unknown_accelerator():
  out = dry("create", ACCELERATOR_TYPE="v6e-16", RUNTIME_VERSION="custom-image")
  assert "--accelerator-type=v6e-16 --version=custom-image" in out
  assert "--version=v2-alpha-tpuv6e" in dry("create", ACCELERATOR_TYPE="v6e-16")
  result = launch("create", "--dry-run", ACCELERATOR_TYPE="x9-8")
  assert result.returncode != 0 and "unknown ACCELERATOR_TYPE 'x9-8'" in result.stderr


def test_dry_run_env_var_equals_flag():
  assert launch("create", DRY_RUN=1).stdout == dry("create")


def test_bad_settings_fail_clearly():
  result = launch("create", "--dry-run", SPOT="yes")
  assert result.returncode != 0 and "SPOT must be 0 or 1" in result.stderr


def test_real_run_needs_project_and_bucket(tmp_path):
  fake = _fake_gcloud(tmp_path)
  result = launch("create", PROJECT="my-project", path_prefix=fake)
  assert result.returncode != 0 and "set PROJECT" in result.stderr
  result = launch("create", BUCKET="my-bucket", path_prefix=fake)
  assert result.returncode != 0 and "set BUCKET" in result.stderr


def test_setup_copies_this_checkout_to_all_workers():
  out = dry("setup", RUN_NAME="r1")
  cmds = commands(out)
  assert cmds[0][:3] == ["tar", "-czf", "/tmp/simflow-jax-r1.tar.gz"]
  assert cmds[1] == shlex.split(
      f"gcloud compute tpus tpu-vm scp /tmp/simflow-jax-r1.tar.gz simflow:simflow-jax-r1.tar.gz "
      f"{BASE} --worker=all")
  ssh = cmds[2]
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "simflow"]
  assert "--worker=all" in ssh
  (remote,) = remote_commands(out)
  assert "tar -xzf simflow-jax-r1.tar.gz -C simflow-jax" in remote
  assert 'uv pip install --python .venv/bin/python -e ".[tpu]" gcsfs' in remote
  assert "uv venv --python 3.12 .venv" in remote


def test_setup_from_git_repo_does_not_copy():
  out = dry("setup", REPO_URL="https://github.com/me/simflow-jax.git", BRANCH="dev")
  assert "scp" not in out and "tar -czf" not in out
  (remote,) = remote_commands(out)
  assert ("git clone --depth=1 --branch dev https://github.com/me/simflow-jax.git simflow-jax"
          in remote)
  assert "git -C simflow-jax fetch --depth=1 origin dev" in remote


def test_train_starts_main_on_all_workers_in_background():
  out = dry("train", BUCKET="bkt", RUN_NAME="run7",
            EXTRA_ARGS="--config.train.num_steps=10 --config.optim.lr_flow=3e-4")
  (ssh,) = commands(out)
  assert "--worker=all" in ssh
  (remote,) = remote_commands(out)
  assert ("nohup .venv/bin/python main.py --config=configs/imagenet256.py "
          "--workdir=gs://bkt/runs/run7 --config.data.path=gs://bkt/imagenet "
          "--config.train.num_steps=10 --config.optim.lr_flow=3e-4 "
          ">> logs/run7.log 2>&1 < /dev/null &") in remote
  assert "echo $! > $p" in remote


def test_train_remote_command_runs_restarts_and_reports(tmp_path):
  """Runs train.sh's worker command here, with a fake .venv/bin/python that sleeps."""
  venv_bin = tmp_path / "simflow-jax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text('#!/bin/sh\necho "started: $*"\nexec sleep 60\n')
  (venv_bin / "python").chmod(0o755)
  (train,) = remote_commands(dry("train", RUN_NAME="r"))
  status = remote_commands(dry("watch", RUN_NAME="r"))[0]
  pid_file = tmp_path / "simflow-jax" / "logs" / "r.pid"

  def worker(command):
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path,
                            env={**os.environ, "HOME": str(tmp_path)}, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()

  assert worker(status) == "stopped"  # no pid file yet
  pids = []
  try:
    for _ in range(2):  # the second start stops the first run
      assert "main.py pid" in worker(train)
      pids.append(int(pid_file.read_text()))
      assert worker(status) == "running"
    assert pids[0] != pids[1]
    old_state = subprocess.run(["ps", "-o", "stat=", "-p", str(pids[0])], capture_output=True,
                               text=True, check=False).stdout.strip()
    # gone, or a zombie ("Z", plus modifiers such as "N" when the tests run under nice)
    assert old_state[:1] in ("", "Z"), f"first run still alive: {old_state}"
  finally:
    for pid in pids:
      subprocess.run(["kill", str(pid)], capture_output=True, check=False)
  log = (tmp_path / "simflow-jax" / "logs" / "r.log").read_text()
  started = "started: main.py --config=configs/imagenet256.py --workdir=gs://bkt/runs/r"
  assert log.count(started) == 2
  # Once the run has ended, the status command says stopped.
  deadline = time.monotonic() + 10
  while worker(status) != "stopped":
    assert time.monotonic() < deadline, "status still 'running' after the run was killed"
    time.sleep(0.1)


def test_train_workdir_and_config_overrides():
  out = dry("train", CONFIG="configs/demo.py", WORKDIR="gs://other/w", DATA_PATH="")
  (remote,) = remote_commands(out)
  assert "main.py --config=configs/demo.py --workdir=gs://other/w >>" in remote


def test_logs_follows_worker_log():
  (remote,) = remote_commands(dry("logs", RUN_NAME="run7"))
  assert remote == "tail -n 100 -F simflow-jax/logs/run7.log"
  assert "--worker=3" in dry("logs", WORKER=3)
  assert "--worker=0" in dry("logs")


def test_delete_vm_and_queued_resource():
  assert commands(dry("delete")) == [shlex.split(
      f"gcloud compute tpus tpu-vm delete simflow {BASE} --quiet")]
  assert commands(dry("delete", QUEUED=1)) == [shlex.split(
      f"gcloud compute tpus queued-resources delete simflow-qr {BASE} --force --quiet")]


def test_watch_dry_run_shows_check_and_full_recovery():
  out = dry("watch", QUEUED=1)
  verbs = [" ".join(c[3:5]) for c in commands(out) if c[0] == "gcloud"]
  assert verbs == [
      "queued-resources describe", "tpu-vm describe", "tpu-vm ssh",  # the check
      "queued-resources delete", "queued-resources create", "queued-resources describe",
      "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh"]  # delete, create, setup, train
  assert "main.py --config=configs/imagenet256.py --workdir=gs://bkt/runs/imagenet256" in out


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("queued", (0, 1))
def test_dry_run_output_is_valid_shell(script, queued):
  """The printed commands paste into a shell, and every remote --command parses."""
  out = dry(script, QUEUED=queued, EXTRA_ARGS="--config.train.num_steps=5")
  assert subprocess.run(["bash", "-n"], input=out, text=True, check=False).returncode == 0
  for remote in remote_commands(out):
    check = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, (remote, check.stderr)


# ---- real (non-dry) runs against a fake gcloud -------------------------------------

def _fake_gcloud(tmp_path, node_states=(), qr_states=(), training=()):
  """A `gcloud` that logs its arguments and replays states; "GONE" fails like a missing TPU.

  Each list is consumed one answer per call; the last answer repeats.
  """
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name, answers in (("node", node_states), ("qr", qr_states), ("training", training)):
    (tmp_path / name).write_text("".join(f"{a}\n" for a in answers))
  script = f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
answer() {{
  local f={tmp_path}/$1 a
  a="$(head -n 1 "$f")"
  if [ "$(wc -l < "$f")" -gt 1 ]; then sed -i 1d "$f"; fi
  if [ "$a" = GONE ]; then exit 1; fi
  echo "$a"
}}
case "$*" in
  *"tpu-vm describe"*) answer node ;;
  *"queued-resources describe"*) answer qr ;;
  *"echo running"*) answer training ;;
esac
"""
  (bin_dir / "gcloud").write_text(script)
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir


def _calls(tmp_path):
  return [line.split()[:4] for line in (tmp_path / "calls").read_text().splitlines()]


def test_watch_recreates_after_preemption_and_resumes(tmp_path):
  fake = _fake_gcloud(tmp_path, node_states=["READY", "PREEMPTED", "READY"],
                      training=["running", "stopped"])
  result = launch("watch", path_prefix=fake, POLL_SECS=0, TARBALL=tmp_path / "code.tar.gz")
  assert result.returncode == 0, result.stderr
  assert "recovery 1/10" in result.stdout and "finished or crashed" in result.stdout
  verbs = [" ".join(c[2:4]) for c in _calls(tmp_path)]
  assert verbs == [
      "tpu-vm describe", "tpu-vm ssh",            # READY, training
      "tpu-vm describe",                          # PREEMPTED
      "tpu-vm delete", "tpu-vm create", "tpu-vm scp", "tpu-vm ssh", "tpu-vm ssh",
      "tpu-vm describe", "tpu-vm ssh",            # READY, stopped
      "tpu-vm ssh"]                               # log tail
  calls = (tmp_path / "calls").read_text()
  assert "main.py --config=configs/imagenet256.py --workdir=gs://bkt/runs/imagenet256" in calls


def test_watch_gives_up_after_max_restarts(tmp_path):
  fake = _fake_gcloud(tmp_path, node_states=["GONE"])
  result = launch("watch", path_prefix=fake, POLL_SECS=0, MAX_RESTARTS=2,
                  TARBALL=tmp_path / "code.tar.gz")
  assert result.returncode == 1
  assert "after 2 recoveries (MAX_RESTARTS=2)" in result.stderr
  creates = [c for c in _calls(tmp_path) if c[2:4] == ["tpu-vm", "create"]]
  assert len(creates) == 2


def test_watch_queued_recreates_suspended_resource(tmp_path):
  fake = _fake_gcloud(tmp_path, qr_states=["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"],
                      node_states=["READY"], training=["stopped"])
  result = launch("watch", path_prefix=fake, POLL_SECS=0, QUEUED=1,
                  TARBALL=tmp_path / "code.tar.gz")
  assert result.returncode == 0, result.stderr
  verbs = [" ".join(c[2:4]) for c in _calls(tmp_path)]
  assert verbs[:4] == ["queued-resources describe", "queued-resources delete",
                       "queued-resources create", "queued-resources describe"]
  # Waited through WAITING_FOR_RESOURCES, then ACTIVE + READY, then setup and train.
  assert verbs[4:] == ["queued-resources describe", "tpu-vm describe", "tpu-vm scp",
                       "tpu-vm ssh", "tpu-vm ssh", "queued-resources describe",
                       "tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh"]


def test_setup_tarball_holds_this_checkout(tmp_path):
  if not (REPO / ".git").exists() or shutil.which("git") is None:
    pytest.skip("needs a git checkout and git")
  fake = _fake_gcloud(tmp_path)
  tarball = tmp_path / "code.tar.gz"
  result = launch("setup", path_prefix=fake, TARBALL=tarball)
  assert result.returncode == 0, result.stderr
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"setup.py", "launch/common.sh", "tests/test_launch.py"} <= names
  assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)
  assert f"tpu-vm scp {tarball} simflow:code.tar.gz" in (tmp_path / "calls").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
  scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
  assert len(scripts) == len(SCRIPTS) + 1  # + common.sh
  result = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_strict_and_executable():
  for script in LAUNCH.glob("*.sh"):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    if script.name != "common.sh":
      assert "set -euo pipefail" in text, script
      assert os.access(script, os.X_OK), f"{script} is not executable"
