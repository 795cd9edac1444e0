#!/usr/bin/env bash
# Installs simflow-jax on every worker of the TPU VM: code, a virtualenv, pip install -e '.[tpu]'.
set -euo pipefail

USAGE="Usage: launch/setup.sh [--dry-run] [--help]

On every worker of TPU_NAME (gcloud compute tpus tpu-vm ssh --worker=all):
  - the code in ~/REMOTE_DIR: a git clone of REPO_URL at BRANCH, or (REPO_URL empty)
    this checkout packed into a tarball and copied with tpu-vm scp --worker=all
  - a Python PYTHON_VERSION virtualenv ~/REMOTE_DIR/.venv made with uv
  - pip install -e '.[tpu]' plus PIP_EXTRA (gcsfs, for gs:// paths)
Safe to run again (after a code change, or on a recreated VM).
--dry-run (or DRY_RUN=1) prints the commands instead of running them."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
do_setup
