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
# and frozen reward model from a reward-model checkpoint (python -m hcx_megatron.rlhf.reward), prompts
# from a JSONL file ({"prompt": messages | "text"}).
#
#   SFT_CKPT=runs/hcx-sft/checkpoints RM_CKPT=runs/hcx-rm/checkpoints PROMPT_DATA=/data/prompts.jsonl \
#       TOKENIZER_MODEL=/data/tok sbatch slurm/rlhf_hcx.sh
#   HCX_DRY_RUN=1 SFT_CKPT=x RM_CKPT=x PROMPT_DATA=x TOKENIZER_MODEL=x bash slurm/rlhf_hcx.sh   # plan only
#
# Placement: each model on its own rank partition (--placement separate, docs/rlhf.md), all with the
# preset's TP/PP (hcx-s: TP2). On the default 4 nodes: critic 8 ranks, reference 4, reward 4 (reference 8
# with RULE_REWARD), the actor the remaining 16 (DP8); with --async-rollouts in PPO_ARGS the actor's
# share is split between the actor and an equal rollout partition that samples while the actor trains.
# Other sizes and per-model layouts: PLACEMENT_ARGS (e.g. "--critic-ranks 16
# --critic-pipeline-model-parallel-size 2"); PLACEMENT=colocated puts all four on the same ranks. For
# hcx-l use MODEL_PRESET=hcx-l, sbatch --nodes=32 and PLACEMENT_ARGS sized for 256 ranks. One PPO iteration = ROLLOUT_BATCH
# prompts, then PPO_EPOCHS passes in minibatches of GLOBAL_BATCH sequences (one optimizer step each), so
# TRAIN_ITERS = PPO_ROLLOUTS x PPO_EPOCHS x ROLLOUT_BATCH / GLOBAL_BATCH. The first run initialises from
# SFT_CKPT/RM_CKPT; a requeued run resumes actor, critic and the interrupted rollout buffer from CKPT_DIR
# (the driver decides, from CKPT_DIR's tracker). Preemption, requeue and failure bounds as in
# pretrain_hcx_l.sh.
#
# Environment (default in brackets; paths, venv/container and NCCL: see slurm/common.sh):
#   SFT_CKPT [] (required)  RM_CKPT [] (required unless RULE_REWARD)  RULE_REWARD [] (synthetic reward)
#   PROMPT_DATA [] (required)  TOKENIZER_MODEL [] (required)  MODEL_PRESET [hcx-s]  DEVICE [cuda]
#   PRECISION [bf16]  TP PP VP_LAYERS CP SP DIST_OPT OVERLAP RECOMPUTE [per preset, see common.sh]
#   ROLLOUT_BATCH [512] (prompts per PPO iteration)  PPO_EPOCHS [2]  PPO_ROLLOUTS [200]
#   GLOBAL_BATCH [128] (sequences per optimizer step)  MICRO_BATCH [1]  SEQ_LENGTH [4096]
#   MAX_NEW_TOKENS [1024]  INIT_KL_COEF [0.04]  LR [1e-6]  MIN_LR [1e-7]  WARMUP_ITERS [10]
#   PLACEMENT [separate]  PLACEMENT_ARGS ["--critic-ranks 8 --reference-ranks 4 --reward-ranks 4"]
#   SAVE_INTERVAL [20]  LOG_INTERVAL [1]  PPO_ARGS [] (e.g. "--adaptive-kl --async-rollouts
#   --unlikelihood-weight 0.1")  EXTRA_ARGS []  SRUN_EXTRA_ARGS []
#   RUN_NAME [job name]  RUN_DIR [$RUNS_ROOT/$RUN_NAME]  CKPT_DIR [$RUN_DIR/checkpoints] (actor; critic in
#   CKPT_DIR/critic)  MAX_RESTARTS [50]  MAX_FAILURES [3]  HCX_DRY_RUN [0]  DRIVER [hcx_megatron.rlhf.ppo]
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
: "${ROLLOUT_BATCH:=512}" "${PPO_EPOCHS:=2}" "${PPO_ROLLOUTS:=200}" "${GLOBAL_BATCH:=128}"
: "${MICRO_BATCH:=1}" "${SEQ_LENGTH:=4096}" "${MAX_NEW_TOKENS:=1024}" "${INIT_KL_COEF:=0.04}"
: "${LR:=1e-6}" "${MIN_LR:=1e-7}" "${WARMUP_ITERS:=10}" "${SAVE_INTERVAL:=20}" "${EVAL_INTERVAL:=0}"
: "${DRIVER:=hcx_megatron.rlhf.ppo}"
HCX_PLAN_NODES=${HCX_PLAN_NODES:-$(hcx_sbatch_header_value nodes "${BASH_SOURCE[0]}")}
HCX_PLAN_TASKS_PER_NODE=${HCX_PLAN_TASKS_PER_NODE:-$(hcx_sbatch_header_value ntasks-per-node "${BASH_SOURCE[0]}")}
[[ -n "${PROMPT_DATA:-}" ]] || hcx_die "set PROMPT_DATA (prompts JSONL)"
[[ -n "${SFT_CKPT:-}" ]] || hcx_die "set SFT_CKPT (actor and reference initialisation)"
[[ -n "${RM_CKPT:-}${RULE_REWARD:-}" ]] || hcx_die "set RM_CKPT (reward model checkpoint from hcx_megatron.rlhf.reward) or RULE_REWARD"
[[ -n "${TOKENIZER_MODEL:-}" ]] || hcx_die "PPO needs TOKENIZER_MODEL (generation and chat template)"
((ROLLOUT_BATCH % GLOBAL_BATCH == 0)) || hcx_die "ROLLOUT_BATCH ($ROLLOUT_BATCH) must be a multiple of GLOBAL_BATCH ($GLOBAL_BATCH)"
# The learning-rate schedule spans every optimizer step of the run.
: "${TRAIN_ITERS:=$((PPO_ROLLOUTS * PPO_EPOCHS * ROLLOUT_BATCH / GLOBAL_BATCH))}"
HCX_OWN_DATA_FLAGS=1

hcx_init_paths
hcx_setup_python
hcx_comm_env
HCX_ARGS=()
hcx_model_args
hcx_train_args
# The driver resumes from CKPT_DIR when it holds a checkpoint, else initialises from the checkpoints below.
hcx_resume_args
HCX_ARGS+=(--prompt-data "$PROMPT_DATA" --sft-checkpoint "$SFT_CKPT")
if [[ -n "${RM_CKPT:-}" ]]; then HCX_ARGS+=(--rm-checkpoint "$RM_CKPT"); else HCX_ARGS+=(--rule-reward "$RULE_REWARD"); fi
HCX_ARGS+=(--rollout-batch-size "$ROLLOUT_BATCH" --ppo-epochs "$PPO_EPOCHS" --max-new-tokens "$MAX_NEW_TOKENS")
HCX_ARGS+=(--init-kl-coef "$INIT_KL_COEF")
: "${PLACEMENT:=separate}"
if [[ -z "${PLACEMENT_ARGS+set}" ]]; then
    if [[ -n "${RM_CKPT:-}" ]]; then PLACEMENT_ARGS="--critic-ranks 8 --reference-ranks 4 --reward-ranks 4"
    else PLACEMENT_ARGS="--critic-ranks 8 --reference-ranks 8"; fi
fi
HCX_ARGS+=(--placement "$PLACEMENT")
if [[ "$PLACEMENT" != colocated ]]; then
    read -r -a placement_args <<<"$PLACEMENT_ARGS"
    HCX_ARGS+=("${placement_args[@]}")
fi
read -r -a ppo_args <<<"${PPO_ARGS:-}"
HCX_ARGS+=("${ppo_args[@]}")
hcx_extra_args
hcx_launch "$DRIVER"
