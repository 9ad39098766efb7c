#!/bin/bash
#SBATCH --job-name=hcx-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Supervised fine-tuning (python -m hcx_megatron.sft) of a pretrained HCX checkpoint on 8xH100 nodes:
# HCX chat-format JSONL ({"messages": [...]}), loss on assistant turns only.
#
#   PRETRAINED_CKPT=runs/hcx-s-pretrain/checkpoints DATA_PATH=/data/sft_train.jsonl \
#       VALID_DATA_PATH=/data/sft_valid.jsonl TOKENIZER_MODEL=/data/tok sbatch slurm/sft_hcx.sh
#   MODEL_PRESET=hcx-l ... sbatch --nodes=16 slurm/sft_hcx.sh      # HCX-L on its pretraining layout
#   HCX_DRY_RUN=1 PRETRAINED_CKPT=x DATA_PATH=x TOKENIZER_MODEL=x bash slurm/sft_hcx.sh   # plan only
#
# Layout: the preset's pretraining layout (hcx-s: TP2 x DP8 on 2 nodes; hcx-l: TP8 x PP4 x VPP4 x DP4
# on 16 nodes), so the pretrained torch_dist checkpoint loads without resharding work. Always
# --load CKPT_DIR --pretrained-checkpoint PRETRAINED_CKPT: the driver (hcx_megatron.training.loop.start_of_run)
# starts from PRETRAINED_CKPT's weights while CKPT_DIR holds no checkpoint (fresh optimizer/scheduler/
# iteration) and resumes CKPT_DIR on every requeue. Preemption, requeue and failure bounds as in pretrain_hcx_l.sh.
#
# Environment (default in brackets; paths, venv/container and NCCL: see slurm/common.sh):
#   PRETRAINED_CKPT [] (required)  DATA_PATH [] (SFT JSONL, required)
#   VALID_DATA_PATH []  TOKENIZER_MODEL [] (required)  MODEL_PRESET [hcx-s]  DEVICE [cuda]  PRECISION [bf16]
#   TP PP VP_LAYERS CP SP DIST_OPT OVERLAP RECOMPUTE [per preset, see hcx_layout_defaults in common.sh]
#   MICRO_BATCH [1]  GLOBAL_BATCH [128]  SEQ_LENGTH [4096]  TRAIN_ITERS [3000]  LR [1e-5]  MIN_LR [1e-6]
#   WARMUP_ITERS [50]  LR_DECAY_STYLE [cosine]  WEIGHT_DECAY [0.1]  CLIP_GRAD [1.0]  SEED [1234]
#   SAVE_INTERVAL [250]  LOG_INTERVAL [1]  EVAL_INTERVAL [250]  EVAL_ITERS [20]
#   RUN_NAME [job name]  RUN_DIR [$RUNS_ROOT/$RUN_NAME]  CKPT_DIR [$RUN_DIR/checkpoints]
#   SFT_TOKENS_PER_MICROBATCH [] (length-grouped micro-batches up to this many padded tokens; the HCX recipe)
#   SFT_PACKING [0] (pack conversations per row, attention not crossing them; needs GPUs/TE)
#   MAX_RESTARTS [50]  MAX_FAILURES [3]  EXTRA_ARGS [] (e.g. "--strict")  SRUN_EXTRA_ARGS []  HCX_DRY_RUN [0]
#   DRIVER [hcx_megatron.sft]
set -euo pipefail

HCX_DEFAULT_JOB_NAME=hcx-sft
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
: "${MICRO_BATCH:=1}" "${GLOBAL_BATCH:=128}" "${SEQ_LENGTH:=4096}" "${TRAIN_ITERS:=3000}"
: "${LR:=1e-5}" "${MIN_LR:=1e-6}" "${WARMUP_ITERS:=50}"
: "${SAVE_INTERVAL:=250}" "${EVAL_INTERVAL:=250}" "${EVAL_ITERS:=20}"
: "${DRIVER:=hcx_megatron.sft}"
HCX_PLAN_NODES=${HCX_PLAN_NODES:-$(hcx_sbatch_header_value nodes "${BASH_SOURCE[0]}")}
HCX_PLAN_TASKS_PER_NODE=${HCX_PLAN_TASKS_PER_NODE:-$(hcx_sbatch_header_value ntasks-per-node "${BASH_SOURCE[0]}")}
[[ -n "${TOKENIZER_MODEL:-}" ]] || hcx_die "SFT needs TOKENIZER_MODEL (its chat template uses the HCX special tokens)"

hcx_init_paths
hcx_setup_python
hcx_comm_env
HCX_ARGS=()
hcx_model_args
hcx_train_args
[[ -n "${PRETRAINED_CKPT:-}" ]] || hcx_die "set PRETRAINED_CKPT (the checkpoint SFT starts from)"
hcx_resume_args
HCX_ARGS+=(--pretrained-checkpoint "$PRETRAINED_CKPT")
if [[ -n "${SFT_TOKENS_PER_MICROBATCH:-}" ]]; then HCX_ARGS+=(--sft-tokens-per-microbatch "$SFT_TOKENS_PER_MICROBATCH"); fi
if hcx_true "${SFT_PACKING:-0}"; then HCX_ARGS+=(--sft-packing); fi
hcx_extra_args
hcx_launch "$DRIVER"
