#!/usr/bin/env bash
# Shows the state of a TPU VM and, with --run, of an etcjax run on each of its workers.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF2
Usage: launch/status.sh --name NAME --zone ZONE [--run RUN] [options]

Print the TPU VM's state (READY, CREATING, PREEMPTED, ...), health and type, and with
--run one line per worker: "etcjax-status RUN HOST STATE", STATE one of NOSETUP, NONE,
RUNNING, DONE, STOPPED, PREEMPTED, FAILED:CODE, INTERRUPTED (worker.sh --help).

Options:
  --run RUN   the run name given to launch/train.sh
$ETCJAX_COMMON_HELP
EOF2
}

run=''
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --run) etcjax_need_value "$@"; run=$2; shift 2 ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common

etcjax_run gcloud compute tpus tpu-vm describe "$ETCJAX_NAME" "${ETCJAX_GCLOUD_FLAGS[@]}" \
  --format='table(state,health,acceleratorType,runtimeVersion,schedulingConfig.spot)'
if [[ -n $run ]]; then
  etcjax_check_run "$run"
  etcjax_ssh all "$ETCJAX_REMOTE_WORKER $(etcjax_join status "$run")"
fi
