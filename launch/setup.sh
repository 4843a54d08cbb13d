#!/usr/bin/env bash
# Puts the etcjax code on every worker of a TPU VM and installs its environment there.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$here/lib.sh"

usage() {
  cat <<EOF
Usage: launch/setup.sh --name NAME --zone ZONE [--ref REF | --repo URL [--ref REF]]
                       [--python VERSION] [--jax SPEC] [options]

On every worker (--worker=all): replace ~/$ETCJAX_REMOTE_DIR with the code, then create
~/etcjax-venv with uv and install etcjax and JAX for TPU into it. Safe to run again
(e.g. after changing the code); not while a run is going on that VM.

Options:
  --ref REF          the git commit, branch or tag to ship (default: HEAD). Without
                     --repo, \`git archive\` packs REF of this checkout locally and
                     \`gcloud ... scp\` copies it: uncommitted changes are NOT shipped.
  --repo URL         clone URL on the workers instead of copying this checkout
  --python VERSION   Python for the venv (default: 3.11; uv downloads it if needed)
  --jax SPEC         JAX requirement installed next to etcjax (default: 'jax[tpu]')
$ETCJAX_COMMON_HELP
EOF
}

ref=HEAD
repo=''
python_version=3.11
jax_spec='jax[tpu]'
etcjax_split_eq "$@"
set -- ${ETCJAX_ARGS[@]+"${ETCJAX_ARGS[@]}"}
while (($#)); do
  if etcjax_common_option "$@"; then
    shift 2
    continue
  fi
  case $1 in
    --ref) etcjax_need_value "$@"; ref=$2; shift 2 ;;
    --repo) etcjax_need_value "$@"; repo=$2; shift 2 ;;
    --python) etcjax_need_value "$@"; python_version=$2; shift 2 ;;
    --jax) etcjax_need_value "$@"; jax_spec=$2; shift 2 ;;
    --dry-run) ETCJAX_DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) etcjax_die "unknown option: $1 (see --help)" ;;
  esac
done
etcjax_check_common

dir=$ETCJAX_REMOTE_DIR
if [[ -z $repo ]]; then
  root=$(cd "$here/.." && pwd)
  git -C "$root" rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
    etcjax_die "--ref '$ref' is not a commit of $root"
  if [[ -n $(git -C "$root" status --porcelain --untracked-files=no) ]]; then
    etcjax_note "warning: uncommitted changes in $root are not shipped (only $ref)"
  fi
  tarball=${TMPDIR:-/tmp}/etcjax-src-$ETCJAX_NAME.tar.gz
  etcjax_note "copy $ref of this checkout to every worker"
  etcjax_run git -C "$root" archive --format=tar.gz --output="$tarball" "$ref"
  etcjax_run gcloud compute tpus tpu-vm scp "$tarball" "$ETCJAX_NAME:etcjax-src.tar.gz" \
    "${ETCJAX_GCLOUD_FLAGS[@]}" --worker=all
  etcjax_run rm -f "$tarball"
  etcjax_ssh all "rm -rf $dir && mkdir -p $dir && tar -xzf etcjax-src.tar.gz -C $dir && rm etcjax-src.tar.gz"
else
  etcjax_note "clone $repo at $ref on every worker"
  etcjax_ssh all "rm -rf $dir && git clone --quiet $(etcjax_quote "$repo") $dir && git -C $dir checkout --quiet $(etcjax_quote "$ref")"
fi
etcjax_note "install the environment on every worker"
etcjax_ssh all "$ETCJAX_REMOTE_WORKER setup $(etcjax_join --python "$python_version" --jax "$jax_spec")"
