# shellcheck shell=bash
# Shared conventions of the slurm/*.sh job scripts. Sourced, never run. A job script sets its own
# defaults (`: "${TP:=8}"`), sources this file and calls, in order:
#   hcx_init_paths      run directory layout (everything of a run under RUN_DIR)
#   hcx_setup_python    venv or container mode
#   hcx_comm_env        NCCL / InfiniBand / CUDA settings for H100 nodes (skipped when DEVICE=cpu)
#   hcx_model_args, hcx_train_args  -> the driver's Megatron-LM flags in the array HCX_ARGS
#   hcx_launch DRIVER_MODULE        one srun of `python -m launch.run -- DRIVER ...` with
#                                   preemption forwarding and the bounded requeue policy.
#
# Environment conventions (all optional; the job scripts document their own defaults at the top):
#   HCX_REPO         repo checkout (default: the sbatch submit dir, else this file's parent dir)
#   RUNS_ROOT        parent of run directories                      (default: $HCX_REPO/runs)
#   RUN_NAME         run directory name; keep it across resubmissions to auto-resume (default: job name)
#   RUN_DIR          the run directory                              (default: $RUNS_ROOT/$RUN_NAME)
#   CKPT_DIR         checkpoints (--save and --load)                (default: $RUN_DIR/checkpoints)
#   LOG_DIR          srun step logs + link to the batch log         (default: $RUN_DIR/logs)
#   METRICS_JSONL    driver metrics                                 (default: $RUN_DIR/metrics.jsonl)
#   TB_DIR           TensorBoard                                    (default: $RUN_DIR/tensorboard)
#   PYTHON           interpreter (default: python3; inside a container: python)
#   VENV             activate this virtualenv before launching (venv mode)
#   CONTAINER_IMAGE  pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.01-py3 (container mode)
#   CONTAINER_MOUNTS extra pyxis mounts, comma separated (the repo and RUN_DIR are always mounted)
#   SRUN_EXTRA_ARGS  extra srun flags, word-split (e.g. "--cpu-bind=none")
#   EXTRA_ARGS       extra driver flags, word-split, appended last (they win over the defaults)
#   DEVICE           cuda | cpu (cpu: tests and laptops; no GPU, NCCL or bf16 flags)
#   MAX_RESTARTS     never requeue once SLURM_RESTART_COUNT reaches this (default 50)
#   MAX_FAILURES     stop after this many consecutive crashes that saved no new checkpoint (default 3)
#   HCX_DRY_RUN=1    print the resolved ranks/hosts/layout and the srun line, train nothing
#   HANG_TIMEOUT_S   hang watchdog (launch/watchdog.py): end the step when a rank sent no heartbeat, or no
#                    rank finished a step, for this many seconds; 0 = off (default 1200; keep it above the
#                    longest step + checkpoint save + eval, and below DIST_TIMEOUT_MIN so it speaks first)
#   HCX_HEARTBEAT_INTERVAL_S  how often each rank's heartbeat thread writes (default 10)
#
# Exit code contract with the drivers: 17 = "preempted: finished the step, saved a checkpoint"
# (hcx_megatron.training.signals.EXIT_CODE_PREEMPTED).

HCX_EXIT_PREEMPTED=17

hcx_log() { printf '[hcx %s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

hcx_die() { hcx_log "ERROR: $*" >&2; exit 2; }

# True when 1/true/yes/on (case-insensitive).
hcx_true() { case "${1,,}" in 1 | true | yes | on) return 0 ;; *) return 1 ;; esac; }

# Value of `#SBATCH --KEY=VALUE` in FILE (the defaults a job would get), for dry runs outside Slurm.
hcx_sbatch_header_value() {
    local key=$1 file=$2
    sed -n "s/^#SBATCH[[:space:]]\{1,\}--${key}=\([^[:space:]]*\).*/\1/p" "$file" | head -n 1
}

hcx_init_paths() {
    : "${RUNS_ROOT:=$HCX_REPO/runs}"
    : "${RUN_NAME:=${SLURM_JOB_NAME:-${HCX_DEFAULT_JOB_NAME:-hcx-run}}}"
    : "${RUN_DIR:=$RUNS_ROOT/$RUN_NAME}"
    : "${CKPT_DIR:=$RUN_DIR/checkpoints}"
    : "${LOG_DIR:=$RUN_DIR/logs}"
    : "${METRICS_JSONL:=$RUN_DIR/metrics.jsonl}"
    : "${TB_DIR:=$RUN_DIR/tensorboard}"
    export RUNS_ROOT RUN_NAME RUN_DIR CKPT_DIR LOG_DIR METRICS_JSONL TB_DIR
    if hcx_true "${HCX_DRY_RUN:-0}"; then
        return 0
    fi
    mkdir -p "$RUN_DIR" "$CKPT_DIR" "$LOG_DIR" "$TB_DIR"
    # Slurm writes the batch log where #SBATCH --output says (it must exist before the job starts, so it
    # cannot be inside a run dir created here); link it in so the run dir holds every log.
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        local out
        out=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^[[:space:]]*StdOut=//p' | head -n 1)
        if [[ -n "$out" && -e "$out" ]]; then
            ln -sfn "$out" "$LOG_DIR/batch-${SLURM_JOB_ID}.out"
        fi
    fi
}

hcx_setup_python() {
    export PYTHONUNBUFFERED=1
    # The package is importable from the checkout even where it was not pip-installed (containers).
    export PYTHONPATH="$HCX_REPO${PYTHONPATH:+:$PYTHONPATH}"
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        : "${PYTHON:=python}"
        if [[ -n "${VENV:-}" ]]; then
            hcx_die "set CONTAINER_IMAGE or VENV, not both (the container brings its own Python)"
        fi
        return 0
    fi
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || hcx_die "VENV=$VENV has no bin/activate"
        # shellcheck source=/dev/null
        source "$VENV/bin/activate"
    fi
    : "${PYTHON:=python3}"
    command -v "$PYTHON" >/dev/null 2>&1 || hcx_die "PYTHON=$PYTHON not found on PATH"
}

# NCCL/IB/CUDA settings for 8xH100 SXM nodes with 400G NDR InfiniBand (one HCA per GPU). Every value
# only fills in what the environment does not already set, so a site profile or the user wins.
hcx_comm_env() {
    if [[ "${DEVICE:-cuda}" == cpu ]]; then
        return 0
    fi
    # Megatron's TP/SP communication overlap relies on kernels being issued in order on one HW queue.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # Fail a hung collective (dead peer) with an error instead of hanging until the time limit; the
    # crash then goes through the requeue policy and the rerun resumes from the last checkpoint.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Lower caching-allocator fragmentation with the long-lived buffers of the distributed optimizer.
    export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
    # WARN keeps logs readable; set NCCL_DEBUG=INFO once per cluster to confirm IB/NVLS/SHARP use.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # The HCAs to use, e.g. "mlx5_0,mlx5_3,..." (rail-optimised: one per GPU). Unset = NCCL autodetects.
    if [[ -n "${NCCL_IB_HCA:-}" ]]; then export NCCL_IB_HCA; fi
    # Interface for NCCL's bootstrap/out-of-band TCP traffic (not the data path), e.g. "bond0" or "eth0".
    if [[ -n "${NCCL_SOCKET_IFNAME:-}" ]]; then export NCCL_SOCKET_IFNAME; fi
    # RoCE fabrics need the GID index of the RoCEv2 address (often 3); plain IB ignores it.
    if [[ -n "${NCCL_IB_GID_INDEX:-}" ]]; then export NCCL_IB_GID_INDEX; fi
    # IB retry timeout exponent (4.096us * 2^N); 22 rides out link flaps on large fabrics.
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
    # H100 NVSwitch multicast (NVLS) speeds intra-node all-reduce; set 0 if a driver/fabric lacks it.
    export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-1}"
    # Bigger chunks for point-to-point sends over the network (pipeline-parallel activations between
    # nodes) than NCCL's 128 KiB default; fewer, larger IB messages per microbatch.
    export NCCL_P2P_NET_CHUNKSIZE="${NCCL_P2P_NET_CHUNKSIZE:-524288}"
    # The rendezvous TCPStore uses MASTER_ADDR:MASTER_PORT, resolved by launch.run from the node list.
}

# Flags shared by every driver: model, layout, precision, logging. Appends to the array HCX_ARGS.
hcx_model_args() {
    HCX_ARGS+=(--model-preset "${MODEL_PRESET:?MODEL_PRESET is required}")
    HCX_ARGS+=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}")
    HCX_ARGS+=(--context-parallel-size "${CP:-1}")
    if [[ -n "${VP_LAYERS:-}" ]]; then
        HCX_ARGS+=(--num-layers-per-virtual-pipeline-stage "$VP_LAYERS")
    fi
    if hcx_true "${SP:-0}"; then HCX_ARGS+=(--sequence-parallel); fi
    if hcx_true "${DIST_OPT:-0}"; then
        HCX_ARGS+=(--use-distributed-optimizer)
        # Overlap DP reduce-scatter/all-gather with compute; only meaningful with the distributed optimizer.
        if hcx_true "${OVERLAP:-0}"; then HCX_ARGS+=(--overlap-grad-reduce --overlap-param-gather); fi
    fi
    case "${RECOMPUTE:-none}" in
        none | "") ;;
        selective) HCX_ARGS+=(--recompute-granularity selective) ;;
        full) HCX_ARGS+=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1) ;;
        *) hcx_die "RECOMPUTE=$RECOMPUTE: expected none, selective or full" ;;
    esac
    if [[ "${DEVICE:-cuda}" == cpu ]]; then
        HCX_ARGS+=(--device cpu)
    else
        HCX_ARGS+=(--device cuda)
        case "${PRECISION:-bf16}" in
            bf16) HCX_ARGS+=(--bf16) ;;
            fp8) HCX_ARGS+=(--bf16 --fp8-format hybrid --fp8-recipe "${FP8_RECIPE:-delayed}") ;;
            fp32) ;;
            *) hcx_die "PRECISION=$PRECISION: expected bf16, fp8 or fp32" ;;
        esac
    fi
}

# Batch, schedule, data, checkpoint and logging flags. Appends to HCX_ARGS.
hcx_train_args() {
    HCX_ARGS+=(--micro-batch-size "${MICRO_BATCH:-1}" --global-batch-size "${GLOBAL_BATCH:?GLOBAL_BATCH is required}")
    HCX_ARGS+=(--seq-length "${SEQ_LENGTH:?SEQ_LENGTH is required}" --train-iters "${TRAIN_ITERS:?TRAIN_ITERS is required}")
    if [[ -n "${LONG_CONTEXT_SEQ_LENGTH:-}" ]]; then
        HCX_ARGS+=(--long-context-seq-length "$LONG_CONTEXT_SEQ_LENGTH")
    fi
    HCX_ARGS+=(--lr "${LR:?LR is required}" --min-lr "${MIN_LR:-0}" --lr-warmup-iters "${WARMUP_ITERS:-0}")
    HCX_ARGS+=(--lr-decay-style "${LR_DECAY_STYLE:-cosine}" --weight-decay "${WEIGHT_DECAY:-0.1}")
    HCX_ARGS+=(--clip-grad "${CLIP_GRAD:-1.0}" --seed "${SEED:-1234}")
    if hcx_true "${HCX_OWN_DATA_FLAGS:-0}"; then
        : # the driver reads its own data flags (PPO: --prompt-data), added by the job script
    elif hcx_true "${MOCK_DATA:-0}"; then
        HCX_ARGS+=(--mock-data)
    else
        [[ -n "${DATA_PATH:-}" ]] || hcx_die "set DATA_PATH (a Megatron blend: 'w1 prefix1 w2 prefix2 ...') or MOCK_DATA=1"
        local blend
        read -r -a blend <<<"$DATA_PATH"
        HCX_ARGS+=(--data-path "${blend[@]}")
        [[ -n "${TOKENIZER_MODEL:-}" ]] || hcx_die "DATA_PATH needs TOKENIZER_MODEL (the tokenizer dir used to preprocess it)"
    fi
    if [[ -n "${VALID_DATA_PATH:-}" ]]; then
        local valid
        read -r -a valid <<<"$VALID_DATA_PATH"
        HCX_ARGS+=(--valid-data-path "${valid[@]}")
    fi
    if [[ -n "${TOKENIZER_MODEL:-}" ]]; then HCX_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL"); fi
    if [[ -n "${DATA_CACHE_PATH:-}" ]]; then HCX_ARGS+=(--data-cache-path "$DATA_CACHE_PATH"); fi
    HCX_ARGS+=(--save "$CKPT_DIR" --save-interval "${SAVE_INTERVAL:-500}")
    HCX_ARGS+=(--log-interval "${LOG_INTERVAL:-1}" --metrics-jsonl "$METRICS_JSONL" --tensorboard-dir "$TB_DIR")
    if [[ "${EVAL_INTERVAL:-0}" != 0 ]]; then
        HCX_ARGS+=(--eval-interval "$EVAL_INTERVAL" --eval-iters "${EVAL_ITERS:-10}")
    fi
    HCX_ARGS+=(--distributed-timeout-minutes "${DIST_TIMEOUT_MIN:-30}")
}

# Layout defaults for a preset on 8xH100 nodes (only variables still unset): the same layouts as
# pretrain_hcx_l.sh / pretrain_hcx_s.sh, so fine-tuning jobs load pretraining checkpoints without resharding.
hcx_layout_defaults() {
    case "$1" in
        hcx-l) : "${TP:=8}" "${PP:=4}" "${VP_LAYERS=5}" "${SP:=1}" "${DIST_OPT:=1}" "${OVERLAP:=1}" "${RECOMPUTE:=selective}" ;;
        hcx-s) : "${TP:=2}" "${PP:=1}" "${VP_LAYERS=}" "${SP:=1}" "${DIST_OPT:=1}" "${OVERLAP:=1}" "${RECOMPUTE:=none}" ;;
        *) : "${TP:=1}" "${PP:=1}" "${VP_LAYERS=}" "${SP:=0}" "${DIST_OPT:=0}" "${OVERLAP:=0}" "${RECOMPUTE:=none}" ;;
    esac
    : "${CP:=1}"
}

# --load for auto-resume: our own checkpoint dir. The driver starts fresh when it holds no checkpoint
# yet and otherwise resumes from latest_checkpointed_iteration.txt (written last, so always complete).
hcx_resume_args() {
    HCX_ARGS+=(--load "$CKPT_DIR")
}

hcx_extra_args() {
    if [[ -n "${EXTRA_ARGS:-}" ]]; then
        local extra
        read -r -a extra <<<"$EXTRA_ARGS"
        HCX_ARGS+=("${extra[@]}")
    fi
}

# Latest complete checkpoint iteration in CKPT_DIR (0 when none).
hcx_ckpt_iteration() {
    local f="$CKPT_DIR/latest_checkpointed_iteration.txt"
    if [[ -s "$f" ]]; then
        tr -dc '0-9' <"$f"
    else
        echo 0
    fi
}

# The requeue policy, a pure function so tests can call it:
#   hcx_requeue_decision RC SIGNALLED RESTARTS MAX_RESTARTS FAILURES MAX_FAILURES  -> done|requeue|stop
# RC: the step's exit code; SIGNALLED: 1 when the batch shell got USR1/TERM; RESTARTS: SLURM_RESTART_COUNT;
# FAILURES: consecutive crashes without a new checkpoint, including this run's.
hcx_requeue_decision() {
    local rc=$1 signalled=$2 restarts=$3 max_restarts=$4 failures=$5 max_failures=$6
    if ((rc == 0)); then
        echo "done"
    elif ((restarts >= max_restarts)); then
        echo stop
    elif ((rc == HCX_EXIT_PREEMPTED || signalled)); then
        echo requeue
    elif ((failures >= max_failures)); then
        echo stop
    else
        echo requeue
    fi
}

# Consecutive crashes without progress, kept in the run dir across requeues (SLURM_RESTART_COUNT counts
# preemptions too, which are not failures).
hcx_failure_count() {
    local f="$RUN_DIR/.consecutive_failures"
    if [[ -s "$f" ]]; then tr -dc '0-9' <"$f"; else echo 0; fi
}

hcx_set_failure_count() { echo "$1" >"$RUN_DIR/.consecutive_failures"; }

HCX_SIGNALLED=0
HCX_TRAPPED=0
HCX_STEP_PID=

_hcx_on_usr1() {
    HCX_SIGNALLED=1
    HCX_TRAPPED=1
    hcx_log "SIGUSR1 (time limit near or preemption): asking the step to save and exit ($HCX_EXIT_PREEMPTED)"
    if [[ -n "$HCX_STEP_PID" ]]; then
        # srun forwards SIGUSR1 to every task of the step.
        kill -USR1 "$HCX_STEP_PID" 2>/dev/null || true
    fi
}

_hcx_on_term() {
    HCX_SIGNALLED=1
    HCX_TRAPPED=1
    # Slurm signals the step's tasks itself on cancel/time limit; we only stay alive to decide on requeue.
    hcx_log "SIGTERM: the step is being terminated by Slurm"
}

# Append one JSON line per attempt to $RUN_DIR/attempts.jsonl (what happened and what we decided).
hcx_record_attempt() {
    printf '{"job_id":"%s","restart_count":%s,"start":"%s","end":"%s","rc":%s,"signalled":%s,"ckpt_before":%s,"ckpt_after":%s,"consecutive_failures":%s,"decision":"%s"}\n' \
        "${SLURM_JOB_ID:-none}" "${SLURM_RESTART_COUNT:-0}" "$1" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$2" "$3" "$4" "$5" "$6" "$7" \
        >>"$RUN_DIR/attempts.jsonl"
}

# hcx_launch MODULE: run `python -m launch.run -- MODULE "${HCX_ARGS[@]}"` as one srun step, forward
# preemption, then requeue / stop / finish by the policy above. Exits the script.
hcx_launch() {
    local module=$1
    local -a srun_args=(--kill-on-bad-exit=1)
    local -a launcher=("$PYTHON" -m launch.run)
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        local mounts="$HCX_REPO:$HCX_REPO,$RUN_DIR:$RUN_DIR${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
        srun_args+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
            --container-workdir="$HCX_REPO" --no-container-mount-home)
    fi
    if [[ -n "${SRUN_EXTRA_ARGS:-}" ]]; then
        local extra
        read -r -a extra <<<"$SRUN_EXTRA_ARGS"
        srun_args+=("${extra[@]}")
    fi

    if hcx_true "${HCX_DRY_RUN:-0}"; then
        hcx_log "dry run; would start: srun ${srun_args[*]} ${launcher[*]} -- $module ${HCX_ARGS[*]}"
        if [[ -n "${SLURM_JOB_ID:-}" ]]; then
            # Inside an allocation: every rank reports what it resolved; rank 0 prints the layout.
            srun "${srun_args[@]}" "${launcher[@]}" --dry-run -- "$module" "${HCX_ARGS[@]}"
        else
            "${launcher[@]}" --dry-run --nodes "${HCX_PLAN_NODES:-1}" --tasks-per-node "${HCX_PLAN_TASKS_PER_NODE:-1}" \
                -- "$module" "${HCX_ARGS[@]}"
        fi
        exit $?
    fi
    [[ -n "${SLURM_JOB_ID:-}" ]] || hcx_die "not inside a Slurm job: submit with sbatch (or set HCX_DRY_RUN=1)"

    srun_args+=(--output="$LOG_DIR/train-%j.log" --open-mode=append)
    local restarts=${SLURM_RESTART_COUNT:-0}
    local start ckpt_before
    start=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    ckpt_before=$(hcx_ckpt_iteration)
    hcx_log "job $SLURM_JOB_ID restart $restarts on ${SLURM_JOB_NODELIST:-?}: $module, run dir $RUN_DIR, checkpoint iteration $ckpt_before"
    hcx_log "step log: $LOG_DIR/train-$SLURM_JOB_ID.log"

    # launch.run appends its rank here when the driver exits 17, and then exits 0 (see below).
    export HCX_PREEMPT_MARKER="$RUN_DIR/.preempted-${SLURM_JOB_ID}-${restarts}"
    rm -f "$HCX_PREEMPT_MARKER"
    # Heartbeats of this attempt only (a previous attempt's files would look like stalled ranks).
    local hang_timeout=${HANG_TIMEOUT_S:-1200} hang_report="" watchdog_pid=""
    if ((hang_timeout > 0)); then
        export HCX_HEARTBEAT_DIR="$RUN_DIR/heartbeats/${SLURM_JOB_ID}-${restarts}"
        hang_report="$RUN_DIR/.hang-${SLURM_JOB_ID}-${restarts}"
        rm -rf "$HCX_HEARTBEAT_DIR" "$hang_report"
        mkdir -p "$HCX_HEARTBEAT_DIR"
    fi
    trap _hcx_on_usr1 USR1
    trap _hcx_on_term TERM
    cd "$HCX_REPO" || hcx_die "cannot cd to HCX_REPO=$HCX_REPO"
    srun "${srun_args[@]}" "${launcher[@]}" -- "$module" "${HCX_ARGS[@]}" &
    HCX_STEP_PID=$!
    if ((hang_timeout > 0)); then
        # Stdlib only, on the batch host: in container mode the host's python3, not the container's.
        local watchdog_python=$PYTHON
        if [[ -n "${CONTAINER_IMAGE:-}" ]]; then watchdog_python=python3; fi
        "$watchdog_python" -m launch.watchdog --dir "$HCX_HEARTBEAT_DIR" --ranks "${SLURM_NTASKS:-1}" \
            --timeout "$hang_timeout" --step-pid "$HCX_STEP_PID" --report "$hang_report" &
        watchdog_pid=$!
    fi
    # `wait` returns early (128+signal) when a trapped signal arrives; wait again for the real status. If
    # the first wait already returned the real status, the second finds no such job (127): keep the first.
    local rc prev=""
    while :; do
        HCX_TRAPPED=0
        rc=0
        # `|| rc=$?`: job scripts run with `set -e`, which must not end the script on a failed step.
        wait "$HCX_STEP_PID" || rc=$?
        if ((rc == 127)) && [[ -n "$prev" ]]; then
            rc=$prev
            break
        fi
        ((HCX_TRAPPED)) || break
        prev=$rc
    done
    trap - USR1 TERM
    if [[ -n "$watchdog_pid" ]]; then
        kill "$watchdog_pid" 2>/dev/null || true
        wait "$watchdog_pid" 2>/dev/null || true
        rm -rf "$HCX_HEARTBEAT_DIR"
    fi
    if [[ -s "$hang_report" ]]; then
        hcx_log "step killed by the hang watchdog (HANG_TIMEOUT_S=$hang_timeout): $(cat "$hang_report")"
        rm -f "$hang_report"
    fi
    if ((rc != HCX_EXIT_PREEMPTED)) && [[ -s "$HCX_PREEMPT_MARKER" ]]; then
        # launch.run turns the driver's 17 into task exit 0 plus this marker (so srun's --kill-on-bad-exit
        # does not kill ranks still exiting); a non-zero rc here is a rank that failed after the save.
        hcx_log "step exited $rc; ranks $(tr '\n' ' ' <"$HCX_PREEMPT_MARKER")saved and exited $HCX_EXIT_PREEMPTED (preempted)"
        rc=$HCX_EXIT_PREEMPTED
    fi
    rm -f "$HCX_PREEMPT_MARKER"

    local ckpt_after failures
    ckpt_after=$(hcx_ckpt_iteration)
    failures=$(hcx_failure_count)
    if ((rc == 0 || rc == HCX_EXIT_PREEMPTED)); then
        failures=0
    elif ((ckpt_after > ckpt_before)); then
        failures=1 # crashed, but after saving progress: count it, yet the streak starts anew
    else
        failures=$((failures + 1))
    fi
    hcx_set_failure_count "$failures"
    local decision
    decision=$(hcx_requeue_decision "$rc" "$HCX_SIGNALLED" "$restarts" "${MAX_RESTARTS:-50}" "$failures" "${MAX_FAILURES:-3}")
    hcx_record_attempt "$start" "$rc" "$HCX_SIGNALLED" "$ckpt_before" "$ckpt_after" "$failures" "$decision"
    hcx_log "step exited $rc (signalled=$HCX_SIGNALLED, checkpoint $ckpt_before -> $ckpt_after, consecutive failures $failures): $decision"
    case "$decision" in
        done) exit 0 ;;
        requeue)
            if scontrol requeue "$SLURM_JOB_ID"; then
                hcx_log "requeued job $SLURM_JOB_ID; the rerun resumes from $CKPT_DIR"
                exit 0
            fi
            hcx_log "scontrol requeue failed (job cancelled, or not requeueable: submit with --requeue)"
            exit "$rc"
            ;;
        *)
            hcx_log "not requeueing: restarts $restarts/${MAX_RESTARTS:-50}, consecutive failures $failures/${MAX_FAILURES:-3}"
            exit "$rc"
            ;;
    esac
}
