#!/usr/bin/env bash
# Shows (and follows) the log of an etcjax run on one or all workers of a TPU VM.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF2
Usage: launch/logs.sh --name NAME --zone ZONE --run RUN [--worker W] [--lines N]
                      [--no-follow] [options]

Tail ~/etcjax-logs/RUN.log on a worker (Ctrl-C to stop following; the run goes on).

Options:
  --run RUN      the run name given to launch/train.sh
  --worker W     worker index, or 'all' (default: 0, the one that writes metrics)
  --lines N      lines of history to show first (default: 100)
  --no-follow    print and exit instead of following the log
$ETCJAX_COMMON_HELP
EOF2
}

run=''
worker=0
lines=100
follow=1
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --run) etcjax_need_value "$@"; run=$2; shift 2 ;;
    --worker) etcjax_need_value "$@"; worker=$2; shift 2 ;;
    --lines) etcjax_need_value "$@"; lines=$2; shift 2 ;;
    --no-follow) follow=0; shift ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common
etcjax_check_run "$run"
[[ $worker =~ ^([0-9]+|all)$ ]] || etcjax_die "--worker must be a worker index or 'all'"
[[ $lines =~ ^[0-9]+$ ]] || etcjax_die "--lines must be a number, got '$lines'"

args=(logs "$run" --lines "$lines")
if [[ $follow == 1 ]]; then
  args+=(--follow)
fi
etcjax_ssh "$worker" "$ETCJAX_REMOTE_WORKER $(etcjax_join "${args[@]}")"
