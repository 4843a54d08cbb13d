# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts sourcing this
# Shared helpers for the Cloud TPU VM scripts in launch/. Sourced, not run.
#
# Every script prints each command as one shell-quoted line: under --dry-run on stdout
# instead of running it (so the output can be pasted into a shell as is), otherwise on
# stderr prefixed with "+ " just before running it. Works with bash >= 3.2 (macOS).

ETCJAX_DRY_RUN=0
ETCJAX_NAME=${ETCJAX_TPU:-}
ETCJAX_ZONE=${ETCJAX_ZONE:-}
ETCJAX_PROJECT=${ETCJAX_PROJECT:-}
# Where things live on every TPU worker, relative to the login directory ($HOME).
ETCJAX_REMOTE_DIR=etcjax
ETCJAX_REMOTE_WORKER="bash $ETCJAX_REMOTE_DIR/launch/worker.sh"

etcjax_die() {
  printf '%s: error: %s\n' "${0##*/}" "$*" >&2
  exit 2
}

# Prints one word so that a POSIX shell reads it back unchanged: bare when it is made of
# safe characters only, otherwise in quotes. "--flag=value" keeps the flag bare.
etcjax_quote() {
  local s=$1 flag=
  if [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    flag=${BASH_REMATCH[1]}
    s=${BASH_REMATCH[2]}
  fi
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s%s' "$flag" "$s"
  elif [[ $s == *\'* && ! $s =~ [\"\$\`\\!] ]]; then
    # Double quotes read better than '\'' when nothing inside them would expand.
    printf '%s"%s"' "$flag" "$s"
  else
    printf "%s'%s'" "$flag" "${s//\'/\'\\\'\'}"
  fi
}

# Prints its arguments as one shell command line.
etcjax_join() {
  local out='' w
  for w in "$@"; do
    out+="${out:+ }$(etcjax_quote "$w")"
  done
  printf '%s' "$out"
}

# Runs a command, or only prints it under --dry-run.
etcjax_run() {
  if [[ $ETCJAX_DRY_RUN == 1 ]]; then
    printf '%s\n' "$(etcjax_join "$@")"
    return 0
  fi
  printf '+ %s\n' "$(etcjax_join "$@")" >&2
  "$@"
}

# Prints a comment line in the dry-run plan (stdout) or a progress note (stderr).
etcjax_note() {
  if [[ $ETCJAX_DRY_RUN == 1 ]]; then
    printf '# %s\n' "$*"
  else
    printf '%s: %s\n' "${0##*/}" "$*" >&2
  fi
}

# etcjax_need_value OPTION [VALUE...]: fails unless the option is followed by a value.
etcjax_need_value() {
  if (($# < 2)) || [[ $2 == --* ]]; then
    etcjax_die "option $1 needs a value"
  fi
}

# etcjax_split_eq ARGS...: sets ETCJAX_ARGS to ARGS with every "--opt=value" before a
# bare "--" split into "--opt" "value", so that scripts parse one form only.
etcjax_split_eq() {
  ETCJAX_ARGS=()
  while (($#)); do
    case $1 in
      --) ETCJAX_ARGS+=("$@"); return 0 ;;
      --*=*) ETCJAX_ARGS+=("${1%%=*}" "${1#*=}") ;;
      *) ETCJAX_ARGS+=("$1") ;;
    esac
    shift
  done
}

# Handles the options every script shares (each takes a value: the caller shifts 2);
# returns 1 for any other option.
etcjax_common_option() {
  case $1 in
    --name) etcjax_need_value "$@"; ETCJAX_NAME=$2 ;;
    --zone) etcjax_need_value "$@"; ETCJAX_ZONE=$2 ;;
    --project) etcjax_need_value "$@"; ETCJAX_PROJECT=$2 ;;
    *) return 1 ;;
  esac
}

# shellcheck disable=SC2016  # the help text names variables, it does not expand them
ETCJAX_COMMON_HELP='Common options:
  --name NAME        TPU VM name (default: $ETCJAX_TPU)
  --zone ZONE        zone, e.g. us-central2-b (default: $ETCJAX_ZONE)
  --project PROJECT  Google Cloud project (default: $ETCJAX_PROJECT, else gcloud'"'"'s
                     configured project)
  --dry-run          print the exact commands, one per line, without running them
  -h, --help         show this help'

# Checks the shared options and sets ETCJAX_GCLOUD_FLAGS (zone, project).
etcjax_check_common() {
  [[ -n $ETCJAX_NAME ]] || etcjax_die "--name is required (or set ETCJAX_TPU)"
  [[ $ETCJAX_NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    etcjax_die "--name '$ETCJAX_NAME' is not a valid TPU name (lowercase letters, digits, '-')"
  [[ -n $ETCJAX_ZONE ]] || etcjax_die "--zone is required (or set ETCJAX_ZONE)"
  [[ $ETCJAX_ZONE =~ ^[a-z0-9-]+$ ]] || etcjax_die "--zone '$ETCJAX_ZONE' is not a zone name"
  ETCJAX_GCLOUD_FLAGS=(--zone="$ETCJAX_ZONE")
  if [[ -n $ETCJAX_PROJECT ]]; then
    ETCJAX_GCLOUD_FLAGS+=(--project="$ETCJAX_PROJECT")
  fi
}

# Checks a run name: it names log files on the workers and the workdir on the bucket.
etcjax_check_run() {
  [[ -n $1 ]] || etcjax_die "--run is required"
  [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    etcjax_die "--run '$1' may only contain letters, digits, '.', '_' and '-'"
}

# etcjax_ssh WORKER COMMAND: runs a shell command line on one worker or on all of them.
etcjax_ssh() {
  etcjax_run gcloud compute tpus tpu-vm ssh "$ETCJAX_NAME" "${ETCJAX_GCLOUD_FLAGS[@]}" \
    --worker="$1" --command="$2"
}
