#!/usr/bin/env bash
# Deletes a TPU VM. The workdir on Cloud Storage (checkpoints, metrics) is kept.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF2
Usage: launch/delete.sh --name NAME --zone ZONE [--yes] [--async] [options]

Delete the TPU VM or pod slice with \`gcloud compute tpus tpu-vm delete\`. Everything on
its disks (code, venv, logs, key copies) goes; the workdir in the bucket stays.

Options:
  --yes      do not ask for confirmation (gcloud --quiet)
  --async    return without waiting for the deletion to finish
$ETCJAX_COMMON_HELP
EOF2
}

yes=0
async=0
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --yes) yes=1; shift ;;
    --async) async=1; shift ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common

cmd=(gcloud compute tpus tpu-vm delete "$ETCJAX_NAME" "${ETCJAX_GCLOUD_FLAGS[@]}")
if [[ $yes == 1 ]]; then
  cmd+=(--quiet)
fi
if [[ $async == 1 ]]; then
  cmd+=(--async)
fi
etcjax_run "${cmd[@]}"
