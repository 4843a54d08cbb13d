#!/usr/bin/env bash
# Stops an etcjax run on every worker of a TPU VM; it saves a checkpoint first.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF2
Usage: launch/stop.sh --name NAME --zone ZONE --run RUN [--wait SECONDS] [options]

Send SIGTERM to the run on every worker (--worker=all) and wait for it to exit. The
trainer treats SIGTERM like a preemption notice: all hosts agree on a step, save a
checkpoint at it and exit, so launch/train.sh with the same RUN resumes from there.

Options:
  --run RUN         the run name given to launch/train.sh
  --wait SECONDS    how long each worker waits for the run to exit (default: 300)
$ETCJAX_COMMON_HELP
EOF2
}

run=''
wait_s=300
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --run) etcjax_need_value "$@"; run=$2; shift 2 ;;
    --wait) etcjax_need_value "$@"; wait_s=$2; shift 2 ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common
etcjax_check_run "$run"
[[ $wait_s =~ ^[0-9]+$ ]] || etcjax_die "--wait must be a number of seconds, got '$wait_s'"

etcjax_ssh all "$ETCJAX_REMOTE_WORKER $(etcjax_join stop "$run" --wait "$wait_s")"
