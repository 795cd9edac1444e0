#!/usr/bin/env bash
# Keeps a Spot / queued TPU run going: after a preemption it recreates the TPU and resumes.
set -euo pipefail

USAGE="Usage: launch/watch.sh [--dry-run] [--help]

Every POLL_SECS seconds, checks TPU_NAME (and QR_NAME when QUEUED=1):
  READY / ACTIVE, main.py running on worker 0   -> keep waiting
  READY / ACTIVE, main.py stopped on worker 0   -> print the log tail and exit 0
                                                   (training finished, or crashed)
  PREEMPTED / SUSPENDED / FAILED / gone         -> delete, create, setup, train:
                                                   main.py resumes from WORKDIR's checkpoint
  creating / queued                             -> keep waiting
Gives up (exit 1) after MAX_RESTARTS recoveries. A TPU that does not exist yet counts
as gone, so watch.sh alone also starts a run from nothing.
--dry-run (or DRY_RUN=1) prints the commands of one check and of one recovery."

# shellcheck source=common.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_args "$@"

recover() {
  do_delete || note "nothing to delete"
  do_create
  do_setup
  do_train
}

if [[ "${DRY_RUN}" == 1 ]]; then
  note "every ${POLL_SECS}s: the TPU state"
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "${QR_NAME}" "${GCLOUD_FLAGS[@]}" \
      --format='value(state.state)'
  fi
  run gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --format='value(state)'
  note "when it is READY: is main.py running on worker 0?"
  tpu_ssh 0 "${TRAINING_STATUS_COMMAND}"
  note "when it is preempted or gone (at most MAX_RESTARTS=${MAX_RESTARTS} times):"
  recover
  exit 0
fi

restarts=0
while true; do
  health="$(tpu_health)"
  case "${health}" in
    ready)
      case "$(training_status)" in
        running) note "$(date -u +%FT%TZ) ${TPU_NAME}: training" ;;
        stopped)
          note "main.py is not running on worker 0 (finished or crashed); last lines of its log:"
          tpu_ssh 0 "tail -n 30 ${LOG_FILE}" || true
          exit 0
          ;;
        *) note "$(date -u +%FT%TZ) could not reach worker 0; trying again" ;;
      esac
      ;;
    lost)
      if ((restarts >= MAX_RESTARTS)); then
        die "${TPU_NAME} lost again after ${restarts} recoveries (MAX_RESTARTS=${MAX_RESTARTS})"
      fi
      restarts=$((restarts + 1))
      note "$(date -u +%FT%TZ) ${TPU_NAME} preempted or gone: recovery ${restarts}/${MAX_RESTARTS}"
      recover
      ;;
    *) note "$(date -u +%FT%TZ) ${TPU_NAME}: being created or queued" ;;
  esac
  sleep "${POLL_SECS}"
done
