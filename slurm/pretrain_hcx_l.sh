#!/bin/bash
#SBATCH --job-name=hcx-l-pretrain
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# Pretrain HCX-L: an ASSUMED 70B-class GQA decoder (80 layers, hidden 8192, 64 heads / 8 KV groups; the
# HyperCLOVA X report publishes no sizes, see hcx_megatron/config/model.py) on 16 nodes of 8xH100.
#
#   sbatch slurm/pretrain_hcx_l.sh                           # from the repo root (or set HCX_REPO)
#   DATA_PATH="0.6 /data/ko_text_document 0.4 /data/en_text_document" TOKENIZER_MODEL=/data/tok \
#       sbatch --nodes=32 slurm/pretrain_hcx_l.sh            # any #SBATCH value can be overridden so
#   HCX_DRY_RUN=1 MOCK_DATA=1 bash slurm/pretrain_hcx_l.sh   # plan: ranks, hosts, layout; no cluster needed
#
# Layout (128 GPUs): TP8 x PP4 with 4 virtual stages of 5 layers (interleaved 1F1B cuts the pipeline
# bubble 4x) x DP4; sequence parallel; distributed optimizer (fp32 master weights and Adam moments
# sharded over DP) with grad-reduce/param-gather overlap; selective recompute. TP stays inside a node
# (NVLink), PP and DP go over IB. Per GPU about 2.2B parameters: ~20 GB of weights, grads and optimizer
# state, the rest for 4k-token activations. For the 32k long-context phase resume with
# CP=4 SEQ_LENGTH=32768 (torch_dist checkpoints reshard on load) or set LONG_CONTEXT_SEQ_LENGTH.
#
# Preemption: Slurm sends USR1 to this script 180 s before the time limit (--signal=B:USR1@180; raise
# it with `sbatch --signal=B:USR1@600` if a checkpoint takes longer); the script forwards it to the
# ranks, the driver finishes its step, saves and exits 17, and the script requeues the job
# (`scontrol requeue`). The rerun resumes from CKPT_DIR. Crashes requeue too, at most MAX_FAILURES in a
# row without a new checkpoint and never past MAX_RESTARTS. See docs/slurm.md.
#
# Environment (default in brackets; also see slurm/common.sh for paths, venv/container and NCCL):
#   RUN_NAME [job name]  RUNS_ROOT [$HCX_REPO/runs]  RUN_DIR [$RUNS_ROOT/$RUN_NAME]
#   CKPT_DIR [$RUN_DIR/checkpoints]  LOG_DIR [$RUN_DIR/logs]  METRICS_JSONL [$RUN_DIR/metrics.jsonl]
#   TB_DIR [$RUN_DIR/tensorboard]  VENV []  CONTAINER_IMAGE []  CONTAINER_MOUNTS []  PYTHON [python3]
#   DATA_PATH [] (Megatron blend "w1 prefix1 w2 prefix2 ...")  TOKENIZER_MODEL []  MOCK_DATA [0]
#   DATA_CACHE_PATH []  MODEL_PRESET [hcx-l]  DEVICE [cuda]  PRECISION [bf16] (bf16|fp8|fp32)
#   TP [8]  PP [4]  VP_LAYERS [5] (layers per virtual stage; empty = no interleaving)  CP [1]
#   SP [1]  DIST_OPT [1]  OVERLAP [1]  RECOMPUTE [selective] (none|selective|full)
#   MICRO_BATCH [1]  GLOBAL_BATCH [1024]  SEQ_LENGTH [4096]  LONG_CONTEXT_SEQ_LENGTH []
#   TRAIN_ITERS [500000] (~2.1T tokens)  LR [1.5e-4]  MIN_LR [1.5e-5]  WARMUP_ITERS [2000]
#   LR_DECAY_STYLE [cosine]  WEIGHT_DECAY [0.1]  CLIP_GRAD [1.0]  SEED [1234]
#   SAVE_INTERVAL [500]  LOG_INTERVAL [1]  EVAL_INTERVAL [2000]  EVAL_ITERS [10]  DIST_TIMEOUT_MIN [30]
#   MAX_RESTARTS [50]  MAX_FAILURES [3]  HANG_TIMEOUT_S [1200] (hang watchdog; 0 = off)
#   EXTRA_ARGS []  SRUN_EXTRA_ARGS []  HCX_DRY_RUN [0]
#   DRIVER [hcx_megatron.pretrain]
set -euo pipefail

HCX_DEFAULT_JOB_NAME=hcx-l-pretrain
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

: "${MODEL_PRESET:=hcx-l}" "${DEVICE:=cuda}" "${PRECISION:=bf16}"
: "${TP:=8}" "${PP:=4}" "${VP_LAYERS=5}" "${CP:=1}" "${SP:=1}" "${DIST_OPT:=1}" "${OVERLAP:=1}"
: "${RECOMPUTE:=selective}"
: "${MICRO_BATCH:=1}" "${GLOBAL_BATCH:=1024}" "${SEQ_LENGTH:=4096}" "${TRAIN_ITERS:=500000}"
: "${LR:=1.5e-4}" "${MIN_LR:=1.5e-5}" "${WARMUP_ITERS:=2000}"
: "${SAVE_INTERVAL:=500}" "${EVAL_INTERVAL:=2000}" "${EVAL_ITERS:=10}"
: "${DRIVER:=hcx_megatron.pretrain}"
# Planning outside Slurm uses this script's own #SBATCH allocation.
HCX_PLAN_NODES=${HCX_PLAN_NODES:-$(hcx_sbatch_header_value nodes "${BASH_SOURCE[0]}")}
HCX_PLAN_TASKS_PER_NODE=${HCX_PLAN_TASKS_PER_NODE:-$(hcx_sbatch_header_value ntasks-per-node "${BASH_SOURCE[0]}")}

hcx_init_paths
hcx_setup_python
hcx_comm_env
HCX_ARGS=()
hcx_model_args
hcx_train_args
hcx_resume_args
hcx_extra_args
hcx_launch "$DRIVER"
