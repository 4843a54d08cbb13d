#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host) or pod slice (several hosts) for etcjax.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF
Usage: launch/create.sh --name NAME --zone ZONE [--accelerator-type TYPE]
                        [--version RUNTIME] [--spot | --preemptible] [options]

Create a Cloud TPU VM or pod slice with \`gcloud compute tpus tpu-vm create\`.

Options:
  --accelerator-type TYPE  e.g. v4-8 (one host), v4-32 (a pod slice of 4 hosts),
                           v5litepod-8, v5p-8, v6e-8 (default: v4-8)
  --version RUNTIME        TPU software version (default by TPU generation:
                           tpu-ubuntu2204-base for v2/v3/v4, v2-alpha-tpuv5-lite for
                           v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e;
                           list them with \`gcloud compute tpus tpu-vm versions list\`)
  --spot                   a Spot VM: much cheaper, can be preempted at any time
  --preemptible            the older preemptible VM (at most 24 h)
  --async                  return without waiting for the VM to be ready
$ETCJAX_COMMON_HELP

A preempted VM cannot be restarted: delete it and create it again, or let
launch/supervise.sh do that and resume the run from its last checkpoint.
EOF
}

accelerator=v4-8
version=''
provisioning=''
async=0
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --accelerator-type) etcjax_need_value "$@"; accelerator=$2; shift 2 ;;
    --version) etcjax_need_value "$@"; version=$2; shift 2 ;;
    --spot | --preemptible)
      [[ -z $provisioning || $provisioning == "$1" ]] ||
        etcjax_die "--spot and --preemptible exclude each other"
      provisioning=$1
      shift
      ;;
    --async) async=1; shift ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common
[[ $accelerator =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
  etcjax_die "--accelerator-type '$accelerator' is not a TPU type such as v4-8 or v5litepod-16"
if [[ -z $version ]]; then
  case $accelerator in
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) etcjax_die "no default runtime for '$accelerator': pass --version" ;;
  esac
fi

cmd=(gcloud compute tpus tpu-vm create "$ETCJAX_NAME" "${ETCJAX_GCLOUD_FLAGS[@]}"
  --accelerator-type="$accelerator" --version="$version")
if [[ -n $provisioning ]]; then
  cmd+=("$provisioning")
fi
if [[ $async == 1 ]]; then
  cmd+=(--async)
fi
etcjax_run "${cmd[@]}"
