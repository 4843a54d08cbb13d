#!/usr/bin/env bash
# Keeps an etcjax run going on a (Spot) TPU VM until it finishes: recreates the VM when it
# has been preempted, sets it up again and restarts the run, which resumes from its last
# checkpoint in the bucket.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF
Usage: launch/supervise.sh --name NAME --zone ZONE --bucket gs://BUCKET --run RUN
                           --config CONFIG [create options] [setup options]
                           [train options] [--poll SECONDS] [--max-failures N] [--once]
                           [options] [-- MAIN_ARGS...]

Every --poll seconds, look at the TPU VM and the run on its workers and act:
  VM missing               create, set up, start the run
  VM PREEMPTED/TERMINATED  delete, create, set up, start the run (it resumes)
  VM READY, no environment set up, start the run
  run RUNNING everywhere   wait
  run DONE everywhere      exit 0 (the VM is kept: launch/delete.sh)
  run FAILED somewhere     stop it everywhere and start again, at most N times
  otherwise (PREEMPTED, INTERRUPTED, STOPPED, NONE: e.g. a maintenance event or a VM
                           restart)  start the run again (it resumes)
  VM in another state      wait (CREATING, RESTARTING, ...); STOPPED: exit 1

Create options (launch/create.sh): --accelerator-type --version --spot --preemptible
Setup options (launch/setup.sh):   --ref --repo --python --jax
Train options (launch/train.sh):   --bucket --run --config --workdir --data-dir --key-file
                                   --init-from,
                                   and MAIN_ARGS after --
Options:
  --poll SECONDS     time between checks (default: 300)
  --max-failures N   failed starts to retry before giving up with exit 1 (default: 3)
  --once             one check-and-act pass, then exit (e.g. from cron); exit 0 when the
                     run is done or going, 1 when it failed too often
$ETCJAX_COMMON_HELP
Under --dry-run it prints the commands of every branch, each after a comment naming it.
EOF
}

create_args=()
setup_args=()
train_args=()
main_args=()
poll=300
max_failures=3
once=0
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --accelerator-type | --version)
      etcjax_need_value "$@"; create_args+=("$1" "$2"); shift 2 ;;
    --spot | --preemptible) create_args+=("$1"); shift ;;
    --ref | --repo | --python | --jax)
      etcjax_need_value "$@"; setup_args+=("$1" "$2"); shift 2 ;;
    --bucket | --run | --config | --workdir | --data-dir | --key-file | --init-from)
      etcjax_need_value "$@"; train_args+=("$1" "$2"); shift 2 ;;
    --poll) etcjax_need_value "$@"; poll=$2; shift 2 ;;
    --max-failures) etcjax_need_value "$@"; max_failures=$2; shift 2 ;;
    --once) once=1; shift ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; main_args=("$@"); break ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common
[[ $poll =~ ^[0-9]+$ ]] || etcjax_die "--poll must be a number of seconds, got '$poll'"
[[ $max_failures =~ ^[0-9]+$ ]] || etcjax_die "--max-failures must be a number, got '$max_failures'"
run=''
for ((i = 0; i < ${#train_args[@]}; i += 2)); do
  if [[ ${train_args[i]} == --run ]]; then
    run=${train_args[i + 1]}
  fi
done
etcjax_check_run "$run"

common=(--name "$ETCJAX_NAME" --zone "$ETCJAX_ZONE")
if [[ -n $ETCJAX_PROJECT ]]; then
  common+=(--project "$ETCJAX_PROJECT")
fi
dry=()
if [[ $ETCJAX_DRY_RUN == 1 ]]; then
  dry=(--dry-run)
fi
# Each step is the script a user would run by hand, with the same flags.
step() {
  local script=$1
  shift
  "$here/$script" "${common[@]}" ${dry[@]+"${dry[@]}"} "$@"
}
do_create() { step create.sh ${create_args[@]+"${create_args[@]}"}; }
do_setup() { step setup.sh ${setup_args[@]+"${setup_args[@]}"}; }
do_train() {
  step train.sh "${train_args[@]}" -- ${main_args[@]+"${main_args[@]}"}
}
do_stop() { step stop.sh --run "$run"; }
do_delete() { step delete.sh --yes; }

# Check every option now rather than after the first hour of waiting.
(
  dry=(--dry-run)
  do_create && do_setup && do_train
) >/dev/null

# Prints the VM's state, or MISSING, or UNKNOWN when gcloud could not tell.
vm_state() {
  local out err
  err=$(mktemp)
  if out=$(etcjax_run gcloud compute tpus tpu-vm describe "$ETCJAX_NAME" \
    "${ETCJAX_GCLOUD_FLAGS[@]}" --format='value(state)' 2>"$err"); then
    printf '%s\n' "${out:-UNKNOWN}"
  elif grep -qiE 'NOT_FOUND|not found' "$err"; then
    echo MISSING
  else
    cat "$err" >&2
    echo UNKNOWN
  fi
  rm -f "$err"
}

# The remote command that prints "etcjax-status RUN HOST STATE" on each worker.
status_command() {
  printf '%s' "if [ -f $ETCJAX_REMOTE_DIR/launch/worker.sh ];" \
    " then $ETCJAX_REMOTE_WORKER $(etcjax_join status "$run");" \
    " else echo etcjax-status $(etcjax_quote "$run") \$(hostname) NOSETUP; fi"
}

# Prints the run's state on each worker, one per line, or UNKNOWN.
run_states() {
  local out
  if out=$(etcjax_ssh all "$(status_command)"); then
    printf '%s\n' "$out" | awk '$1 == "etcjax-status" { print $4 }'
  else
    echo UNKNOWN
  fi
}

# attempt STEP...: runs the steps in order until one fails; a failure (no Spot capacity,
# a network error) is reported and retried at the next poll instead of ending the loop.
attempt() {
  local s
  for s in "$@"; do
    if ! "$s"; then
      etcjax_note "$s failed; trying again in ${poll}s"
      return 0
    fi
  done
}

if [[ $ETCJAX_DRY_RUN == 1 ]]; then
  etcjax_note "check the VM"
  etcjax_run gcloud compute tpus tpu-vm describe "$ETCJAX_NAME" "${ETCJAX_GCLOUD_FLAGS[@]}" \
    --format='value(state)'
  etcjax_note "VM missing: create it, set it up, start the run"
  do_create && do_setup && do_train
  etcjax_note "VM PREEMPTED or TERMINATED: delete it first, then as above"
  do_delete
  etcjax_note "VM READY: check the run on every worker"
  etcjax_ssh all "$(status_command)"
  etcjax_note "run FAILED on a worker: stop it everywhere, then start it again"
  do_stop && do_train
  exit 0
fi

failures=0
while true; do
  state=$(vm_state)
  etcjax_note "VM $ETCJAX_NAME: $state"
  case $state in
    MISSING) attempt do_create do_setup do_train ;;
    PREEMPTED | TERMINATED) attempt do_delete do_create do_setup do_train ;;
    STOPPED)
      etcjax_note "the VM was stopped by someone: not touching it"
      exit 1
      ;;
    READY)
      states=$(run_states | sort | uniq -c | awk '{ printf "%s%s x%s", sep, $2, $1; sep = ", " }')
      etcjax_note "run $run: ${states:-no answer}"
      if [[ $states =~ UNKNOWN || -z $states ]]; then
        :  # a worker did not answer; ask again next time
      elif [[ $states =~ NOSETUP ]]; then
        attempt do_setup do_train
      elif [[ $states =~ FAILED ]]; then
        failures=$((failures + 1))
        if ((failures > max_failures)); then
          etcjax_note "run $run failed $failures times; giving up (see launch/logs.sh)"
          exit 1
        fi
        attempt do_stop do_train
      elif [[ ! $states =~ (NONE|STOPPED|PREEMPTED|INTERRUPTED|RUNNING) ]]; then
        etcjax_note "run $run is done; the VM is still up (launch/delete.sh)"
        exit 0
      elif [[ $states =~ RUNNING && ! $states =~ (NONE|STOPPED|PREEMPTED|INTERRUPTED) ]]; then
        :  # going
      else
        # Some or all workers lost their process (SIGTERM, VM restart): restart them
        # all together so that every host resumes from the same checkpoint.
        attempt do_stop do_train
      fi
      ;;
    *) ;;  # CREATING, STARTING, RESTARTING, REPAIRING, DELETING, UNKNOWN: wait
  esac
  if [[ $once == 1 ]]; then
    exit 0
  fi
  sleep "$poll"
done
