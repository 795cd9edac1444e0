#!/usr/bin/env bash
# Deletes the TPU VM (QUEUED=0) or its queued resource together with the VM (QUEUED=1).
set -euo pipefail

USAGE="Usage: launch/delete.sh [--dry-run] [--help]

QUEUED=0  gcloud compute tpus tpu-vm delete TPU_NAME --quiet
QUEUED=1  gcloud compute tpus queued-resources delete QR_NAME --force --quiet
Checkpoints, metrics and samples stay in WORKDIR on GCS; logs on the workers are lost.
--dry-run (or DRY_RUN=1) prints the command instead of running it."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
do_delete
