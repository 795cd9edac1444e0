#!/usr/bin/env bash
# Follows the training log of one worker (worker 0 by default) of the TPU VM.
set -euo pipefail

USAGE="Usage: launch/logs.sh [--dry-run] [--help]

Runs tail -F ~/REMOTE_DIR/logs/RUN_NAME.log on worker WORKER (default 0) of TPU_NAME.
Ctrl-C stops following the log; training keeps running.
--dry-run (or DRY_RUN=1) prints the command instead of running it."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"
do_logs
