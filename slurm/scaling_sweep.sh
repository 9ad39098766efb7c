#!/bin/bash
#SBATCH --job-name=hcx-scaling
#SBATCH --exclusive
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
#
# One task of a scaling sweep (Slurm job array). Generated sweeps submit it through their submit.sh,
# one `sbatch --nodes=N --ntasks-per-node=G --gpus-per-node=G --array=i,j,...` per node count:
#
#   tools/scaling_study.py generate --out sweeps/s --model-preset hcx-s --seq-length 4096 \
#       --gpu-counts 8 16 32 64 --scaling both --global-batch-size 256
#   bash sweeps/s/submit.sh                              # then, when the array is done:
#   tools/scaling_study.py report sweeps/s --calibrate   # results.md, results.csv, PNG plots
#
#   HCX_DRY_RUN=1 SLURM_ARRAY_TASK_ID=0 bash slurm/scaling_sweep.sh sweeps/s   # plan one task, no cluster
#
# Array task i runs line i of SWEEP_DIR/tasks.tsv (index, label, nodes, tasks per node, driver flags)
# with the conventions of slurm/common.sh (venv/container, NCCL env, launch.run): RUN_DIR is
# SWEEP_DIR/runs/<label>, where the driver writes metrics.jsonl. Sweep runs keep no checkpoints.
# Environment: as slurm/common.sh (VENV, CONTAINER_IMAGE, PYTHON, SRUN_EXTRA_ARGS, EXTRA_ARGS, ...).
set -euo pipefail

SWEEP_DIR=${1:-${SWEEP_DIR:-}}
[[ -n "$SWEEP_DIR" ]] || { echo "usage: sbatch --array=... slurm/scaling_sweep.sh SWEEP_DIR" >&2; exit 2; }
SWEEP_DIR=$(cd "$SWEEP_DIR" && pwd)
[[ -f "$SWEEP_DIR/tasks.tsv" ]] || { echo "$SWEEP_DIR/tasks.tsv missing: run tools/scaling_study.py generate" >&2; exit 2; }
TASK=${SLURM_ARRAY_TASK_ID:?run as a job array (sbatch --array=...) or set SLURM_ARRAY_TASK_ID}

if [[ -z "${HCX_REPO:-}" ]]; then
    if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/slurm/common.sh" ]]; then
        HCX_REPO=$SLURM_SUBMIT_DIR
    else
        HCX_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi
[[ -f "$HCX_REPO/slurm/common.sh" ]] || { echo "no slurm/common.sh under HCX_REPO=$HCX_REPO" >&2; exit 2; }
export HCX_REPO
# shellcheck source=slurm/common.sh
source "$HCX_REPO/slurm/common.sh"

line=$(awk -F'\t' -v i="$TASK" '$1 == i { print; exit }' "$SWEEP_DIR/tasks.tsv")
[[ -n "$line" ]] || hcx_die "no task $TASK in $SWEEP_DIR/tasks.tsv"
IFS=$'\t' read -r _idx LABEL NODES TASKS_PER_NODE FLAGS <<<"$line"
if [[ -n "${SLURM_JOB_NUM_NODES:-}" && "$SLURM_JOB_NUM_NODES" != "$NODES" ]]; then
    hcx_die "task $TASK ($LABEL) needs $NODES node(s) but the job has $SLURM_JOB_NUM_NODES: submit with submit.sh"
fi

export RUN_NAME=$LABEL RUN_DIR="$SWEEP_DIR/runs/$LABEL"
export METRICS_JSONL="$RUN_DIR/metrics.jsonl"
HCX_PLAN_NODES=$NODES
HCX_PLAN_TASKS_PER_NODE=$TASKS_PER_NODE
hcx_init_paths
hcx_setup_python
hcx_comm_env
# The flags were written with Python's shlex.join, i.e. POSIX shell quoting.
eval "HCX_ARGS=($FLAGS)"
hcx_extra_args
hcx_log "sweep $SWEEP_DIR task $TASK: $LABEL on $NODES node(s) x $TASKS_PER_NODE"
hcx_launch "${DRIVER:-hcx_megatron.pretrain}"
