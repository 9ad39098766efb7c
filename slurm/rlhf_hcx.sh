#!/bin/bash
#SBATCH --job-name=hcx-ppo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# RLHF with PPO (python -m hcx_megatron.rlhf.ppo): actor and reference from an SFT checkpoint, critic
# and reward model from a reward-model checkpoint (python -m hcx_megatron.rlhf.reward), prompts JSONL.
#
#   SFT_CKPT=runs/hcx-sft/checkpoints RM_CKPT=runs/hcx-rm/checkpoints DATA_PATH=/data/prompts.jsonl \
#       TOKENIZER_MODEL=/data/tok sbatch slurm/rlhf_hcx.sh
#   HCX_DRY_RUN=1 SFT_CKPT=x RM_CKPT=x DATA_PATH=x TOKENIZER_MODEL=x bash slurm/rlhf_hcx.sh   # plan only
#
# Layout: the four models share the ranks in the preset's layout (hcx-s: TP2 x DP16 on 4 nodes, i.e.
# twice the SFT job: actor + critic train, reference + reward only run forward). For hcx-l use
# MODEL_PRESET=hcx-l and sbatch --nodes=32. The first run initialises from SFT_CKPT/RM_CKPT; requeued runs
# resume actor and critic from this run's CKPT_DIR. Preemption, requeue and failure bounds as in
# pretrain_hcx_l.sh.
#
# Environment (default in brackets; paths, venv/container and NCCL: see slurm/common.sh):
#   SFT_CKPT [] (required for the first run)  RM_CKPT [] (required)  DATA_PATH [] (prompts JSONL, required)
#   TOKENIZER_MODEL [] (required)  MODEL_PRESET [hcx-s]  DEVICE [cuda]  PRECISION [bf16]
#   TP PP VP_LAYERS CP SP DIST_OPT OVERLAP RECOMPUTE [per preset, see hcx_layout_defaults in common.sh]
#   MICRO_BATCH [1]  GLOBAL_BATCH [256] (prompts per rollout batch)  SEQ_LENGTH [4096]  TRAIN_ITERS [2000]
#   LR [1e-6]  MIN_LR [1e-7]  WARMUP_ITERS [10]  SAVE_INTERVAL [50]  LOG_INTERVAL [1]  EVAL_INTERVAL [0]
#   PPO_MODEL_ARGS ["--reward-model-load $RM_CKPT --critic-load $RM_CKPT --ref-load $SFT_CKPT"] (how the
#       driver is told where the other three models start; override if its flag names differ)
#   PPO_ARGS [] (e.g. "--init-kl-coef 0.04 --async-rollouts")  EXTRA_ARGS []  SRUN_EXTRA_ARGS []
#   RUN_NAME [job name]  RUN_DIR [$RUNS_ROOT/$RUN_NAME]  CKPT_DIR [$RUN_DIR/checkpoints]
#   MAX_RESTARTS [50]  MAX_FAILURES [3]  HCX_DRY_RUN [0]  DRIVER [hcx_megatron.rlhf.ppo]
set -euo pipefail

HCX_DEFAULT_JOB_NAME=hcx-ppo
if [[ -z "${HCX_REPO:-}" ]]; then
    # Slurm runs a copy of this script from its spool dir, so find the repo through the submit dir.
    if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "$SLURM_SUBMIT_DIR/slurm/common.sh" ]]; then
        HCX_REPO=$SLURM_SUBMIT_DIR
    else
        HCX_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi
[[ -f "$HCX_REPO/slurm/common.sh" ]] || { echo "no slurm/common.sh under HCX_REPO=$HCX_REPO: submit from the repo root or set HCX_REPO" >&2; exit 2; }
export HCX_REPO
# shellcheck source=slurm/common.sh
source "$HCX_REPO/slurm/common.sh"

: "${MODEL_PRESET:=hcx-s}" "${DEVICE:=cuda}" "${PRECISION:=bf16}"
hcx_layout_defaults "$MODEL_PRESET"
: "${MICRO_BATCH:=1}" "${GLOBAL_BATCH:=256}" "${SEQ_LENGTH:=4096}" "${TRAIN_ITERS:=2000}"
: "${LR:=1e-6}" "${MIN_LR:=1e-7}" "${WARMUP_ITERS:=10}"
: "${SAVE_INTERVAL:=50}" "${EVAL_INTERVAL:=0}"
: "${DRIVER:=hcx_megatron.rlhf.ppo}"
HCX_PLAN_NODES=${HCX_PLAN_NODES:-$(hcx_sbatch_header_value nodes "${BASH_SOURCE[0]}")}
HCX_PLAN_TASKS_PER_NODE=${HCX_PLAN_TASKS_PER_NODE:-$(hcx_sbatch_header_value ntasks-per-node "${BASH_SOURCE[0]}")}
[[ -n "${RM_CKPT:-}" ]] || hcx_die "set RM_CKPT (reward model checkpoint from hcx_megatron.rlhf.reward)"
[[ -n "${TOKENIZER_MODEL:-}" ]] || hcx_die "PPO needs TOKENIZER_MODEL (generation and chat template)"
: "${PPO_MODEL_ARGS=--reward-model-load $RM_CKPT --critic-load $RM_CKPT --ref-load ${SFT_CKPT:-}}"

hcx_init_paths
hcx_setup_python
hcx_comm_env
HCX_ARGS=()
hcx_model_args
hcx_train_args
hcx_finetune_load_args "${SFT_CKPT:-}" SFT_CKPT
read -r -a ppo_model_args <<<"$PPO_MODEL_ARGS"
read -r -a ppo_args <<<"${PPO_ARGS:-}"
HCX_ARGS+=("${ppo_model_args[@]}" "${ppo_args[@]}")
hcx_extra_args
hcx_launch "$DRIVER"
