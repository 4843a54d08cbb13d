#!/usr/bin/env bash
# Runs ON each Cloud TPU VM worker (the launch/*.sh scripts call it through
# `gcloud compute tpus tpu-vm ssh --worker=...`): environment setup, and starting,
# inspecting and stopping one detached training run per run name.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF
Usage: worker.sh COMMAND [options]   (runs on a TPU worker, from the etcjax checkout)

Commands:
  setup [--python VERSION] [--jax SPEC]
      Create the virtualenv ~/etcjax-venv with uv (Python VERSION, default 3.11: the
      TPU images ship an older python3) and install etcjax from this checkout plus SPEC
      (default 'jax[tpu]', which brings libtpu from PyPI).
  start RUN [--data-dir DIR] [-- MAIN_ARGS...]
      Start \`python -m etcjax.main MAIN_ARGS\` detached (it survives the ssh session),
      with TFDS_DATA_DIR=DIR, logging to ~/etcjax-logs/RUN.log. Does nothing if RUN is
      already running on this worker.
  status RUN
      Print one line "etcjax-status RUN HOST STATE", STATE one of NOSETUP (no
      environment), NONE (never started), RUNNING, DONE (exit 0), STOPPED (by 'stop'),
      PREEMPTED (SIGTERM from elsewhere: saved a checkpoint and exited with 143),
      FAILED:CODE, INTERRUPTED (no exit code: the VM restarted or the process was killed).
  logs RUN [--lines N] [--follow]
      Print the last N (default 100) lines of the run's log; --follow keeps tailing.
  stop RUN [--wait SECONDS]
      Send SIGTERM to the run (it saves a checkpoint, then exits; see the README) and wait
      up to SECONDS (default 300) for it to exit.

Options:
  --dry-run   print the commands without running them
  -h, --help  show this help
EOF
}

venv=$HOME/etcjax-venv
logs=$HOME/etcjax-logs

if [[ ${1:-} == --dry-run ]]; then
  ETCJAX_DRY_RUN=1
  shift
fi
cmd=${1:-}
[[ -n $cmd ]] || { usage >&2; exit 2; }
shift
case $cmd in
  -h | --help) usage; exit 0 ;;
esac
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}

run=''
python_version=3.11
jax_spec='jax[tpu]'
data_dir=''
lines=100
follow=0
wait_s=300
rest=()
if [[ $cmd != setup ]]; then
  [[ $# -gt 0 && $1 != -* ]] || etcjax_die "$cmd needs a run name"
  run=$1
  shift
  etcjax_check_run "$run"
fi
while (($#)); do
  case $1 in
    --python) etcjax_need_value "$@"; python_version=$2; shift 2 ;;
    --jax) etcjax_need_value "$@"; jax_spec=$2; shift 2 ;;
    --data-dir) etcjax_need_value "$@"; data_dir=$2; shift 2 ;;
    --lines) etcjax_need_value "$@"; lines=$2; shift 2 ;;
    --follow) follow=1; shift ;;
    --wait) etcjax_need_value "$@"; wait_s=$2; shift 2 ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; rest=("$@"); break ;;
    *) etcjax_die "unknown option for $cmd: $1 (see --help)" ;;
  esac
done
[[ $lines =~ ^[0-9]+$ ]] || etcjax_die "--lines must be a number, got '$lines'"
[[ $wait_s =~ ^[0-9]+$ ]] || etcjax_die "--wait must be a number of seconds, got '$wait_s'"

pid_file=$logs/$run.pid
exit_file=$logs/$run.exit
stopped_file=$logs/$run.stopped

# True while the run's process group leader is alive.
is_running() {
  local pid
  [[ -f $pid_file ]] || return 1
  pid=$(<"$pid_file")
  [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

case $cmd in
  setup)
    uv=$HOME/.local/bin/uv
    if ! command -v uv >/dev/null && [[ ! -x $uv ]]; then
      # pip refuses --user installs on images whose Python is "externally managed"
      # (Ubuntu 24.04); uv's own installer also puts it in ~/.local/bin.
      etcjax_run python3 -m pip install --user --quiet --upgrade uv ||
        etcjax_run sh -c 'curl -LsSf https://astral.sh/uv/install.sh | sh'
    fi
    command -v uv >/dev/null && uv=$(command -v uv)
    etcjax_run "$uv" venv --allow-existing --python "$python_version" "$venv"
    etcjax_run "$uv" pip install --python "$venv/bin/python" -e "$here/.." "$jax_spec"
    etcjax_run "$venv/bin/python" -c 'import jax; print("etcjax: jax", jax.__version__, "devices:", jax.local_device_count(), jax.default_backend())'
    etcjax_run touch "$venv/.etcjax-ready"
    ;;
  start)
    [[ -f $venv/.etcjax-ready ]] || [[ $ETCJAX_DRY_RUN == 1 ]] ||
      etcjax_die "no environment in $venv: run launch/setup.sh first"
    if is_running; then
      echo "etcjax: run $run is already running on $(hostname) (pid $(<"$pid_file"))"
      exit 0
    fi
    etcjax_run mkdir -p "$logs"
    etcjax_run rm -f "$exit_file" "$stopped_file"
    # setsid: the run gets its own process group (so 'stop' signals python, not only
    # this wrapper) and session (so it outlives the ssh session).
    argv=(setsid bash "$here/worker.sh" _run "$run" --data-dir "$data_dir"
      -- ${rest[@]+"${rest[@]}"})
    if [[ $ETCJAX_DRY_RUN == 1 ]]; then
      etcjax_run "${argv[@]}"
      exit 0
    fi
    printf '+ %s >>%s 2>&1 &\n' "$(etcjax_join "${argv[@]}")" "$logs/$run.log" >&2
    "${argv[@]}" >>"$logs/$run.log" 2>&1 </dev/null &
    echo $! >"$pid_file"
    echo "etcjax: started $run on $(hostname), log $logs/$run.log"
    ;;
  _run)
    # 'stop' signals the whole group: this wrapper must outlive python to record its
    # exit code. A handler (unlike ignoring the signal) is reset for python at exec.
    trap 'echo "etcjax: SIGTERM: waiting for the run to save and exit"' TERM
    # The detached body of 'start': run training, then record how it ended. $$ is the
    # process group leader that setsid made (whether or not setsid had to fork).
    echo $$ >"$pid_file"
    cd "$here/.."
    if [[ -n $data_dir ]]; then
      export TFDS_DATA_DIR=$data_dir
    fi
    echo "etcjax: $(date -u +%FT%TZ) starting on $(hostname): $(etcjax_join python -m etcjax.main ${rest[@]+"${rest[@]}"})"
    code=0
    "$venv/bin/python" -m etcjax.main ${rest[@]+"${rest[@]}"} || code=$?
    echo "etcjax: $(date -u +%FT%TZ) exited with code $code"
    echo "$code" >"$exit_file"
    ;;
  status)
    state=NONE
    if [[ ! -f $venv/.etcjax-ready ]]; then
      state=NOSETUP
    elif is_running; then
      state=RUNNING
    elif [[ -f $exit_file ]]; then
      code=$(<"$exit_file")
      if [[ -f $stopped_file ]]; then
        state=STOPPED
      elif [[ $code == 0 ]]; then
        state=DONE
      elif [[ $code == 143 ]]; then
        state=PREEMPTED  # SIGTERM: etcjax.main saved a checkpoint and exited early
      else
        state=FAILED:$code
      fi
    elif [[ -f $pid_file ]]; then
      state=INTERRUPTED
    fi
    echo "etcjax-status $run $(hostname) $state"
    ;;
  logs)
    [[ -f $logs/$run.log ]] || etcjax_die "no log for run $run on $(hostname)"
    if [[ $follow == 1 ]]; then
      etcjax_run tail -n "$lines" -F "$logs/$run.log"
    else
      etcjax_run tail -n "$lines" "$logs/$run.log"
    fi
    ;;
  stop)
    if ! is_running; then
      echo "etcjax: run $run is not running on $(hostname)"
      exit 0
    fi
    pid=$(<"$pid_file")
    etcjax_run touch "$stopped_file"
    # The negative pid signals the whole process group created by setsid.
    etcjax_run kill -TERM -- "-$pid"
    [[ $ETCJAX_DRY_RUN == 1 ]] && exit 0
    for ((i = 0; i < wait_s; i++)); do
      is_running || { echo "etcjax: run $run stopped on $(hostname)"; exit 0; }
      sleep 1
    done
    etcjax_die "run $run still running on $(hostname) after ${wait_s}s"
    ;;
  *) etcjax_die "unknown command '$cmd' (setup, start, status, logs, stop; see --help)" ;;
esac
