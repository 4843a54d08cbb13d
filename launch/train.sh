#!/usr/bin/env bash
# Starts (or resumes) an etcjax training run on every worker of a TPU VM.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF
Usage: launch/train.sh --name NAME --zone ZONE --bucket gs://BUCKET --run RUN
                       --config CONFIG [--workdir gs://...] [--data-dir gs://...]
                       [--key-file FILE] [--init-from FILE] [options] [-- MAIN_ARGS...]

Start \`python -m etcjax.main --config=CONFIG --workdir=WORKDIR MAIN_ARGS\` detached on
every worker (--worker=all); on a pod slice the processes find each other by themselves
(jax.distributed.initialize() reads the TPU metadata). Each worker logs to
~/etcjax-logs/RUN.log; follow them with launch/logs.sh.

The workdir holds the checkpoints. Starting the same RUN again (after a crash, a
preemption and launch/create.sh + launch/setup.sh, or launch/stop.sh) resumes from its
last checkpoint; launch/supervise.sh does all that by itself.

Options:
  --bucket gs://BUCKET  Cloud Storage bucket for the workdir and the TFDS data
  --run RUN             run name: letters, digits, '.', '_', '-'
  --config CONFIG       config file in the checkout, e.g. configs/vit_imagenette.py
                        (a config argument goes after a colon: configs/x.py:arg)
  --workdir DIR         default: gs://BUCKET/etcjax/runs/RUN
  --data-dir DIR        TFDS data dir (config.data_dir and TFDS_DATA_DIR) for the run
                        (default: gs://BUCKET/tensorflow_datasets; prepare it once with
                        \`tfds build\`, or let the first run download into it)
  --key-file FILE       a local EtC key file (researcher mode): copied to every worker
                        as ~/etcjax-keys/RUN.key (mode 0600) and passed as
                        --config.key_file. Never put keys in the bucket.
  --init-from FILE      pretrained ViT weights (.npz / .safetensors) to fine-tune from:
                        a local file (copied with scp) or gs://... (downloaded by the
                        workers with \`gcloud storage cp\`), kept as ~/etcjax-weights/NAME
                        on every worker (fetched once) and passed as --config.init_from
  -- MAIN_ARGS...       more arguments for etcjax.main, e.g. --config.batch_size=1024
$ETCJAX_COMMON_HELP
EOF
}

bucket=''
run=''
config=''
workdir=''
data_dir=''
key_file=''
init_from=''
extra=()
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --bucket) etcjax_need_value "$@"; bucket=${2%/}; shift 2 ;;
    --run) etcjax_need_value "$@"; run=$2; shift 2 ;;
    --config) etcjax_need_value "$@"; config=$2; shift 2 ;;
    --workdir) etcjax_need_value "$@"; workdir=$2; shift 2 ;;
    --data-dir) etcjax_need_value "$@"; data_dir=$2; shift 2 ;;
    --key-file) etcjax_need_value "$@"; key_file=$2; shift 2 ;;
    --init-from) etcjax_need_value "$@"; init_from=$2; shift 2 ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) etcjax_die "unknown option: $1 (arguments for etcjax.main go after --; see --help)" ;;
  esac
done
etcjax_check_common
etcjax_check_run "$run"
[[ -n $config ]] || etcjax_die "--config is required, e.g. --config configs/vit_imagenette.py"
if [[ -z $workdir || -z $data_dir ]]; then
  [[ $bucket =~ ^gs://[a-z0-9][-_.a-z0-9]*$ ]] ||
    etcjax_die "--bucket must look like gs://BUCKET (got '$bucket')"
fi
workdir=${workdir:-$bucket/etcjax/runs/$run}
data_dir=${data_dir:-$bucket/tensorflow_datasets}
if [[ $workdir != gs://* ]]; then
  etcjax_note "warning: --workdir $workdir is not on Cloud Storage: each worker writes its" \
    "own local copy and the checkpoints are lost with the VM"
fi

main_args=(--config="$config" --workdir="$workdir" --config.data_dir="$data_dir")
if [[ -n $key_file ]]; then
  [[ -f $key_file || $ETCJAX_DRY_RUN == 1 ]] || etcjax_die "--key-file $key_file: no such file"
  etcjax_note "copy the key to every worker (mode 0600)"
  etcjax_ssh all "mkdir -p etcjax-keys && chmod 700 etcjax-keys"
  etcjax_run gcloud compute tpus tpu-vm scp "$key_file" "$ETCJAX_NAME:etcjax-keys/$run.key" \
    "${ETCJAX_GCLOUD_FLAGS[@]}" --worker=all
  etcjax_ssh all "chmod 600 etcjax-keys/$run.key"
  # Relative to the checkout, where the run starts.
  main_args+=(--config.key_file="../etcjax-keys/$run.key")
fi
if [[ -n $init_from ]]; then
  weights=etcjax-weights/${init_from##*/}
  [[ $weights =~ ^etcjax-weights/[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    etcjax_die "--init-from $init_from: the file name may only contain letters, digits, '.', '_', '-'"
  etcjax_note "put the pretrained weights on every worker (once)"
  if [[ $init_from == gs://* ]]; then
    etcjax_ssh all "mkdir -p etcjax-weights && { test -f $weights || gcloud storage cp $(etcjax_quote "$init_from") $weights; }"
  else
    [[ -f $init_from || $ETCJAX_DRY_RUN == 1 ]] || etcjax_die "--init-from $init_from: no such file"
    etcjax_ssh all "mkdir -p etcjax-weights"
    etcjax_run gcloud compute tpus tpu-vm scp "$init_from" "$ETCJAX_NAME:$weights" \
      "${ETCJAX_GCLOUD_FLAGS[@]}" --worker=all
  fi
  main_args+=(--config.init_from="../$weights")
fi
main_args+=(${extra[@]+"${extra[@]}"})
etcjax_note "start run $run on every worker; workdir $workdir"
etcjax_ssh all "$ETCJAX_REMOTE_WORKER start $(etcjax_join "$run" --data-dir "$data_dir" -- "${main_args[@]}")"
