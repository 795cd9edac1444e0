#!/usr/bin/env bash
# Settings and helpers shared by the Cloud TPU VM scripts in launch/.
#
# Sourced by create.sh, setup.sh, train.sh, logs.sh, watch.sh and delete.sh;
# not run on its own. Every setting is an environment variable with a default:
#
#   ACCELERATOR_TYPE=v4-32 SPOT=0 BUCKET=my-bucket launch/create.sh
#
# DRY_RUN=1 (or --dry-run) prints the commands instead of running them.

# ---- settings --------------------------------------------------------------------
PROJECT="${PROJECT:-my-project}"            # GCP project id
ZONE="${ZONE:-us-east5-a}"                  # v5p: us-east5-a, v5e: us-west4-a, v4: us-central2-b
TPU_NAME="${TPU_NAME:-simflow}"             # TPU VM (node) name
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"  # v5p-64 | v4-32 | v5litepod-16 | v6e-16 | ...
RUNTIME_VERSION="${RUNTIME_VERSION:-}"      # empty = the JAX base image for ACCELERATOR_TYPE
SPOT="${SPOT:-1}"                           # 1 = Spot (preemptible, cheap), 0 = on-demand
QUEUED="${QUEUED:-0}"                       # 1 = request through a queued resource
QR_NAME="${QR_NAME:-${TPU_NAME}-qr}"        # queued resource id (QUEUED=1)
BUCKET="${BUCKET:-my-bucket}"               # GCS bucket (no gs://) for data and runs
RUN_NAME="${RUN_NAME:-imagenet256}"         # run name: workdir and log file names
CONFIG="${CONFIG:-configs/imagenet256.py}"  # trainer config, relative to the repo root
WORKDIR="${WORKDIR:-gs://${BUCKET}/runs/${RUN_NAME}}"  # checkpoints, metrics, samples
DATA_PATH="${DATA_PATH-gs://${BUCKET}/imagenet}"       # --config.data.path (set empty: keep the config's)
EXTRA_ARGS="${EXTRA_ARGS:-}"                # more main.py flags, e.g. --config.train.num_steps=400000
REPO_URL="${REPO_URL:-}"                    # git URL cloned on every worker; empty = copy this checkout
BRANCH="${BRANCH:-main}"                    # branch / tag / commit for REPO_URL
REMOTE_DIR="${REMOTE_DIR:-simflow-jax}"     # code dir on the workers, relative to $HOME
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"    # Python for the workers' virtualenv (made with uv)
PIP_EXTRA="${PIP_EXTRA:-gcsfs}"             # extra pip packages (gcsfs: gs:// paths in etils.epath)
MAX_RESTARTS="${MAX_RESTARTS:-10}"          # watch.sh: recoveries before it gives up
POLL_SECS="${POLL_SECS:-300}"               # watch.sh / create.sh: seconds between state checks
WORKER="${WORKER:-0}"                       # logs.sh: which worker's log to follow
DRY_RUN="${DRY_RUN:-0}"                     # 1 = print commands, run nothing

# ---- derived ---------------------------------------------------------------------
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${LAUNCH_DIR}")"
LOG_FILE="${REMOTE_DIR}/logs/${RUN_NAME}.log"  # on each worker, relative to $HOME
PID_FILE="${REMOTE_DIR}/logs/${RUN_NAME}.pid"
TARBALL="${TARBALL:-/tmp/simflow-jax-${RUN_NAME}.tar.gz}"
UV_INSTALL_URL="https://astral.sh/uv/install.sh"

die() {
  echo "error: $*" >&2
  exit 1
}

# Prints the runtime version for an accelerator type (Cloud TPU docs, "TPU software versions").
default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "unknown ACCELERATOR_TYPE '$1'; set RUNTIME_VERSION yourself" ;;
  esac
}

# Parses the arguments every script accepts: --dry-run and -h/--help (prints $USAGE).
parse_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help)
        echo "${USAGE}"
        echo
        echo "Settings (environment variables) are at the top of launch/common.sh."
        exit 0
        ;;
      *)
        echo "${USAGE}" >&2
        die "unknown argument '$1'"
        ;;
    esac
    shift
  done
  check_settings
}

check_settings() {
  [[ "${SPOT}" =~ ^[01]$ ]] || die "SPOT must be 0 or 1, got '${SPOT}'"
  [[ "${QUEUED}" =~ ^[01]$ ]] || die "QUEUED must be 0 or 1, got '${QUEUED}'"
  [[ "${DRY_RUN}" =~ ^[01]$ ]] || die "DRY_RUN must be 0 or 1, got '${DRY_RUN}'"
  [[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, got '${MAX_RESTARTS}'"
  [[ "${POLL_SECS}" =~ ^[0-9]+$ ]] || die "POLL_SECS must be a number, got '${POLL_SECS}'"
  RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime_version "${ACCELERATOR_TYPE}")}"
  if [[ "${DRY_RUN}" == 0 ]]; then
    command -v gcloud >/dev/null || die "gcloud not found: install the Google Cloud CLI"
    [[ "${PROJECT}" != my-project ]] || die "set PROJECT to your GCP project id"
    [[ "${BUCKET}" != my-bucket ]] || die "set BUCKET to your GCS bucket (without gs://)"
  fi
}

# Quotes one word for printing: bare when safe, --flag='value' or 'value' otherwise.
quote_word() {
  local word="$1" prefix=""
  if [[ "${word}" =~ ^[A-Za-z0-9_./:=@%+,-]*$ ]]; then
    printf '%s' "${word}"
    return
  fi
  if [[ "${word}" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
    prefix="${BASH_REMATCH[1]}"
    word="${BASH_REMATCH[2]}"
  fi
  printf "%s'%s'" "${prefix}" "${word//\'/\'\\\'\'}"
}

# Runs a command, or prints it (copy-pastable) under DRY_RUN=1.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local out="" word
    for word in "$@"; do
      out+="$(quote_word "${word}") "
    done
    echo "${out% }"
  else
    "$@"
  fi
}

# Prints a comment line (in dry-run output too, so it stays a valid script).
note() {
  echo "# $*"
}

GCLOUD_FLAGS=(--project="${PROJECT}" --zone="${ZONE}")

# Runs a shell command on TPU workers: tpu_ssh WORKER(S) COMMAND (WORKER: all | 0 | 0,1 ...).
# With --worker=all, gcloud runs the command on every worker at the same time.
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --worker="$1" --command="$2"
}

# Prints the node state (READY, PREEMPTED, ...) or nothing when the node does not exist.
node_state() {
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
    --format='value(state)' 2>/dev/null || true
}

# Prints the queued resource state (ACTIVE, SUSPENDED, ...) or nothing when it does not exist.
qr_state() {
  gcloud compute tpus queued-resources describe "${QR_NAME}" "${GCLOUD_FLAGS[@]}" \
    --format='value(state.state)' 2>/dev/null || true
}

# Classifies the TPU: prints "ready", "lost" (preempted, failed or gone: recreate it)
# or "pending" (being created or queued: wait).
tpu_health() {
  local state
  if [[ "${QUEUED}" == 1 ]]; then
    state="$(qr_state)"
    case "${state}" in
      ACTIVE) ;;
      "" | SUSPENDING | SUSPENDED | FAILED | DELETING) echo lost; return ;;
      *) echo pending; return ;;
    esac
  fi
  state="$(node_state)"
  case "${state}" in
    READY) echo ready ;;
    "" | PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING) echo lost ;;
    *) echo pending ;;
  esac
}

# ---- actions (one per script; watch.sh chains them) ---------------------------------

do_create() {
  local spot=()
  [[ "${SPOT}" == 1 ]] && spot=(--spot)
  if [[ "${QUEUED}" == 1 ]]; then
    note "queued resource ${QR_NAME} -> TPU ${TPU_NAME} (${ACCELERATOR_TYPE}, ${RUNTIME_VERSION})"
    run gcloud compute tpus queued-resources create "${QR_NAME}" "${GCLOUD_FLAGS[@]}" \
      --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
      --runtime-version="${RUNTIME_VERSION}" ${spot[@]+"${spot[@]}"}
    wait_until_ready
  else
    note "TPU VM ${TPU_NAME} (${ACCELERATOR_TYPE}, ${RUNTIME_VERSION}); gcloud waits until READY"
    run gcloud compute tpus tpu-vm create "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" ${spot[@]+"${spot[@]}"}
  fi
}

# Polls until the queued resource is ACTIVE and its node READY; fails if it is lost.
wait_until_ready() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    note "then every ${POLL_SECS}s until the state is ACTIVE:"
    run gcloud compute tpus queued-resources describe "${QR_NAME}" "${GCLOUD_FLAGS[@]}" \
      --format='value(state.state)'
    return
  fi
  local health
  while true; do
    health="$(tpu_health)"
    case "${health}" in
      ready) note "${QR_NAME} is ACTIVE, ${TPU_NAME} is READY"; return ;;
      lost) die "queued resource ${QR_NAME} failed, was suspended or was removed" ;;
      *)
        note "$(date -u +%FT%TZ) ${QR_NAME} is queued or provisioning; next check in ${POLL_SECS}s"
        sleep "${POLL_SECS}"
        ;;
    esac
  done
}

# The shell command that puts the code in ~/REMOTE_DIR on a worker.
fetch_code_command() {
  if [[ -n "${REPO_URL}" ]]; then
    echo "if [ -d ${REMOTE_DIR}/.git ]; then git -C ${REMOTE_DIR} fetch --depth=1 origin ${BRANCH} && git -C ${REMOTE_DIR} checkout -f FETCH_HEAD; else git clone --depth=1 --branch ${BRANCH} ${REPO_URL} ${REMOTE_DIR}; fi"
  else
    echo "mkdir -p ${REMOTE_DIR} && tar -xzf $(basename "${TARBALL}") -C ${REMOTE_DIR}"
  fi
}

# Packs this checkout's files (tracked and untracked, not ignored, still on disk) into TARBALL.
make_tarball() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    note "pack the files of ${REPO_ROOT} listed by git ls-files --cached --others --exclude-standard:"
    echo "tar -czf ${TARBALL} -C ${REPO_ROOT} FILES..."
    return
  fi
  local files=() file
  while IFS= read -r -d '' file; do
    [[ -e "${REPO_ROOT}/${file}" ]] && files+=("${file}")
  done < <(git -C "${REPO_ROOT}" ls-files -z --cached --others --exclude-standard)
  ((${#files[@]})) || die "no files to copy in ${REPO_ROOT}: is it a git checkout? Or set REPO_URL."
  tar -czf "${TARBALL}" -C "${REPO_ROOT}" "${files[@]}"
}

do_setup() {
  if [[ -z "${REPO_URL}" ]]; then
    make_tarball
    note "copy it to every worker"
    run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU_NAME}:$(basename "${TARBALL}")" \
      "${GCLOUD_FLAGS[@]}" --worker=all
  fi
  note "on every worker: the code, a Python ${PYTHON_VERSION} virtualenv (uv), pip install -e '.[tpu]'"
  tpu_ssh all "set -e; $(fetch_code_command); cd ${REMOTE_DIR}; \
[ -x \$HOME/.local/bin/uv ] || curl -LsSf ${UV_INSTALL_URL} | sh; \
[ -x .venv/bin/python ] || \$HOME/.local/bin/uv venv --python ${PYTHON_VERSION} .venv; \
\$HOME/.local/bin/uv pip install --python .venv/bin/python -e \".[tpu]\" ${PIP_EXTRA}; \
.venv/bin/python -c \"import jax, socket, simflow_jax; print(socket.gethostname(), jax.__version__)\""
}

# The main.py command line (run in ~/REMOTE_DIR on every worker).
train_command() {
  local cmd=".venv/bin/python main.py --config=${CONFIG} --workdir=${WORKDIR}"
  [[ -n "${DATA_PATH}" ]] && cmd+=" --config.data.path=${DATA_PATH}"
  [[ -n "${EXTRA_ARGS}" ]] && cmd+=" ${EXTRA_ARGS}"
  echo "${cmd}"
}

# Worker shell function: is process $1 alive (and not a zombie left by a container init)?
ALIVE_FUNCTION="alive() { kill -0 \"\$1\" 2>/dev/null && ! ps -o stat= -p \"\$1\" | grep -q Z; }"

do_train() {
  note "start main.py on every worker at once, in the background; it resumes from ${WORKDIR}"
  note "(a run this script started before on the same worker is stopped first)"
  tpu_ssh all "set -e; cd ${REMOTE_DIR}; mkdir -p logs; p=logs/${RUN_NAME}.pid; ${ALIVE_FUNCTION}; \
if [ -f \$p ] && alive \$(cat \$p); then kill \$(cat \$p); \
for i in \$(seq 60); do alive \$(cat \$p) || break; sleep 1; done; \
if alive \$(cat \$p); then kill -9 \$(cat \$p); fi; fi; \
nohup $(train_command) >> logs/${RUN_NAME}.log 2>&1 < /dev/null & \
echo \$! > \$p; echo \"\$(hostname): main.py pid \$(cat \$p), log ~/${LOG_FILE}\""
}

# The worker shell command that prints "running" or "stopped" for the main.py train.sh started.
TRAINING_STATUS_COMMAND="${ALIVE_FUNCTION}; \
if [ -f ${PID_FILE} ] && alive \$(cat ${PID_FILE}); then echo running; else echo stopped; fi"

# Prints "running" or "stopped" for main.py on worker 0, or nothing if ssh failed.
training_status() {
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --worker=0 \
    --command="${TRAINING_STATUS_COMMAND}" 2>/dev/null | tail -n 1 || true
}

do_logs() {
  note "follow the log of worker ${WORKER} (Ctrl-C stops following, not training)"
  tpu_ssh "${WORKER}" "tail -n 100 -F ${LOG_FILE}"
}

do_delete() {
  if [[ "${QUEUED}" == 1 ]]; then
    note "delete queued resource ${QR_NAME} and its TPU ${TPU_NAME}"
    run gcloud compute tpus queued-resources delete "${QR_NAME}" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    note "delete TPU VM ${TPU_NAME}"
    run gcloud compute tpus tpu-vm delete "${TPU_NAME}" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}
