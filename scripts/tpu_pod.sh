#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM or pod slice at once (gcloud ... ssh --worker=all).
#
# Usage:
#   scripts/tpu_pod.sh [--name TPU] [--zone ZONE] [--project PROJECT] ACTION [ARGS...]
#
# Actions:
#   setup REPO_URL [REF]  clone REPO_URL (at REF) into ~/cleaq_jax on every worker (a fetch if it is
#                         there) and install it with jax[tpu] into ~/cleaq_jax/.venv
#   train MAIN_ARGS...    start `python -m cleaq_jax.main MAIN_ARGS` on every worker in the background
#                         (nohup: it outlives the ssh session); output in ~/cleaq_jax/train.log
#   log [N]               the last N (default 50) lines of train.log from every worker
#   stop                  SIGTERM to the training processes: each saves a checkpoint and exits
#   run 'COMMAND'         any shell command on every worker, in the foreground
#
# Defaults from the environment: TPU_NAME, ZONE, PROJECT (else gcloud's configured project).
# DRY_RUN=1 prints the gcloud command instead of running it.
# Every worker runs the same command; jax.distributed.initialize() finds the other workers itself.
# The TPU VM's service account needs read access to the data and write access to a gs:// workdir.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
name=${TPU_NAME:-} zone=${ZONE:-} project=${PROJECT:-}
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done
action=${1:-}
[[ $# -gt 0 ]] && shift
[[ -n "$name" ]] || { echo "tpu_pod.sh: no TPU name: pass --name TPU or set TPU_NAME" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "tpu_pod.sh: no zone: pass --zone ZONE or set ZONE (e.g. us-central2-b)" >&2; exit 2; }

quote() { printf '%q ' "$@"; }
case "$action" in
  setup)
    [[ $# -ge 1 ]] || { echo "tpu_pod.sh setup: pass the repository URL (and optionally a ref)" >&2; exit 2; }
    repo=$(quote "$1") ref=$(quote "${2:-HEAD}")
    remote="set -e; [ -d ~/cleaq_jax/.git ] || git clone $repo ~/cleaq_jax; cd ~/cleaq_jax;"
    remote+=" git fetch -q origin; git checkout -q $ref; $(quote "${REMOTE_PYTHON:-python3.13}")-m venv .venv;"
    remote+=" .venv/bin/pip install -q -c constraints-py313.txt -e . 'jax[tpu]'" ;;
  train)
    [[ $# -ge 1 ]] || { echo "tpu_pod.sh train: pass cleaq_jax.main's arguments (--config=... --workdir=...)" >&2; exit 2; }
    remote="cd ~/cleaq_jax && nohup .venv/bin/python -m cleaq_jax.main $(quote "$@")> train.log 2>&1 < /dev/null &" ;;
  log)
    remote="tail -n ${1:-50} ~/cleaq_jax/train.log" ;;
  stop)
    remote="pkill -TERM -f '^[^ ]*python -m cleaq_jax.main' || true" ;;
  run)
    [[ $# -ge 1 ]] || { echo "tpu_pod.sh run: pass the command to run, quoted" >&2; exit 2; }
    remote="$*" ;;
  *)
    echo "tpu_pod.sh: unknown action '${action}' (setup, train, log, stop or run; --help)" >&2; exit 2 ;;
esac

gcloud_args=(compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote")
[[ -n "$project" ]] && gcloud_args+=(--project="$project")
if [[ -n "${DRY_RUN:-}" ]]; then
  quote gcloud "${gcloud_args[@]}"; echo
  exit 0
fi
exec gcloud "${gcloud_args[@]}"
