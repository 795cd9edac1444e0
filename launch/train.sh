#!/usr/bin/env bash
# Starts main.py on every worker of the TPU VM at once, in the background (nohup).
set -euo pipefail

USAGE="Usage: launch/train.sh [--dry-run] [--help]

Runs on every worker of TPU_NAME, at the same time (tpu-vm ssh --worker=all):
  cd ~/REMOTE_DIR && nohup .venv/bin/python main.py --config=CONFIG \\
      --workdir=WORKDIR --config.data.path=DATA_PATH EXTRA_ARGS >> logs/RUN_NAME.log &
WORKDIR defaults to gs://BUCKET/runs/RUN_NAME and DATA_PATH to gs://BUCKET/imagenet.
main.py calls jax.distributed.initialize() itself on a multi-host slice and resumes
from the latest checkpoint in WORKDIR, so running this again continues the run.
A run this script started before on a worker is stopped first.
--dry-run (or DRY_RUN=1) prints the commands instead of running them."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
do_train
