#!/usr/bin/env bash
# One task of scripts/slurm_train.sbatch: srun starts one copy per process; it runs cleaq_jax.main.
#
# Usage (inside an allocation, from the repository root):
#   srun scripts/slurm_task.sh --config=configs/stage1.py --workdir=DIR [--config.key=value ...]
#
# No coordinator flags: jax.distributed.initialize() reads SLURM's variables (SLURM_JOB_ID,
# SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID): the coordinator is the step's first
# node, its port 61440 + SLURM_JOB_ID mod 4096 (JAX_COORDINATOR_PORT overrides), the process id the rank.
# GPUs: jax alone would give every task the one GPU numbered SLURM_LOCALID. This script sets
# JAX_LOCAL_DEVICE_IDS (unless already set) so that each task drives its share of the GPUs it sees:
#   one task per node, or tasks bound to their own GPUs -> every GPU the task sees;
#   T tasks sharing a node's G GPUs (G a multiple of T)  -> G/T GPUs from SLURM_LOCALID * G/T on.
# Environment: PYTHON (default: python).
set -euo pipefail

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
if [[ -z "${SLURM_JOB_ID:-}" || -z "${SLURM_PROCID:-}" ]]; then
  echo "slurm_task.sh: SLURM_JOB_ID/SLURM_PROCID are not set: start it with srun inside a job" \
       "(scripts/slurm_train.sbatch), or run python -m cleaq_jax.main directly" >&2
  exit 2
fi

# Tasks on this node: the first entry of e.g. "8(x2)" or "2,1".
tasks_here=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
tasks_here=${tasks_here%%[(,]*}
if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" && -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  seen=$(awk -F, '{ print NF }' <<< "$CUDA_VISIBLE_DEVICES")
  if [[ "$tasks_here" -le 1 || "$seen" -lt "$tasks_here" ]]; then
    JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((seen - 1)))
  elif [[ $((seen % tasks_here)) -eq 0 ]]; then
    per=$((seen / tasks_here))
    JAX_LOCAL_DEVICE_IDS=$(seq -s, $((SLURM_LOCALID * per)) $((SLURM_LOCALID * per + per - 1)))
  else
    echo "slurm_task.sh: $tasks_here tasks cannot share the $seen GPUs of this node evenly;" \
         "change --ntasks-per-node or set JAX_LOCAL_DEVICE_IDS" >&2
    exit 2
  fi
  export JAX_LOCAL_DEVICE_IDS
fi
exec "${PYTHON:-python}" -m cleaq_jax.main "$@"
