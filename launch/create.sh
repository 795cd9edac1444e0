#!/usr/bin/env bash
# Creates the Cloud TPU VM, or a queued resource for it (QUEUED=1), Spot (SPOT=1) or on-demand.
set -euo pipefail

USAGE="Usage: launch/create.sh [--dry-run] [--help]

Creates TPU_NAME (ACCELERATOR_TYPE, e.g. v5p-64, v4-32, v5litepod-16) in ZONE of PROJECT:
  QUEUED=0  gcloud compute tpus tpu-vm create (returns when the VM is READY)
  QUEUED=1  gcloud compute tpus queued-resources create QR_NAME --node-id=TPU_NAME,
            then waits until the queued resource is ACTIVE
SPOT=1 adds --spot (preemptible; launch/watch.sh recreates it after a preemption).
RUNTIME_VERSION defaults to the JAX base image for the accelerator.
--dry-run (or DRY_RUN=1) prints the gcloud commands instead of running them."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
do_create
