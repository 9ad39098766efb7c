"""The one set of layout rules: which (TP, PP, VPP, CP, DP, batch, sequence) layouts megatron-core 0.16.1 can run a
model in, and how it splits the transformer layers over pipeline stages.

Used by config validation (config/args.py `validate_config`, before any process group exists), the performance
model (perf/layout.py `Layout.check`, so the planner never proposes a layout the driver rejects) and PPO placement
(rlhf/placement.py, per rank partition). Messages name the Megatron-LM flags; callers that expose a rule under other
flags (PPO's --critic-tensor-model-parallel-size, ...) pass `flags` to rename them.

Pure arithmetic: no torch, no megatron import. `pipeline_layer_split` / `pipeline_layer_ranges` reproduce
megatron-core's `get_num_layers_to_build` / `get_transformer_layer_offset` and raise where megatron would assert
or fail (checked against megatron's own functions over a grid in tests/test_config_validation.py).
"""

from __future__ import annotations

from typing import Mapping

from hcx_megatron.config.errors import ConfigError
from hcx_megatron.config.sequence import sequence_multiple

TP = "--tensor-model-parallel-size"
PP = "--pipeline-model-parallel-size"
CP = "--context-parallel-size"
VPP = "--virtual-pipeline-model-parallel-size"
LAYERS_PER_VPP = "--num-layers-per-virtual-pipeline-stage"
FIRST = "--decoder-first-pipeline-num-layers"
LAST = "--decoder-last-pipeline-num-layers"
EMBEDDING = "--account-for-embedding-in-pipeline-split"
LOSS = "--account-for-loss-in-pipeline-split"
NUM_LAYERS = "--num-layers"
GBS = "--global-batch-size"
MBS = "--micro-batch-size"
WORLD = "world size"


def pipeline_layer_split(num_layers: int, pp: int, vpp: int | None = None,
                         first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                         account_for_embedding: bool = False, account_for_loss: bool = False) -> list[list[int]]:
    """Transformer layers built on each [pp_rank][virtual_stage], exactly as megatron-core 0.16.1's
    get_num_layers_to_build / get_transformer_layer_offset do; raises a ConfigError naming the Megatron-LM flags
    (--decoder-first-pipeline-num-layers, --decoder-last-pipeline-num-layers,
    --account-for-embedding-in-pipeline-split, --account-for-loss-in-pipeline-split,
    --virtual-pipeline-model-parallel-size (Megatron-LM: --num-virtual-stages-per-pipeline-rank)) when megatron
    would assert. Without VPP each rank has one entry."""
    return [[len(r) for r in rank] for rank in pipeline_layer_ranges(
        num_layers, pp, vpp, first_stage_layers, last_stage_layers, account_for_embedding, account_for_loss)]


def pipeline_layer_ranges(num_layers: int, pp: int, vpp: int | None = None,
                          first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                          account_for_embedding: bool = False, account_for_loss: bool = False) -> list[list[range]]:
    """The GLOBAL (0-based) transformer layer indices each [pp_rank][virtual_stage] builds: megatron's layer offset
    (get_transformer_layer_offset) and count (get_num_layers_to_build). With interleaving, virtual stage v of every
    rank comes before virtual stage v+1 of any rank. Checkpoints and weight init key layers by these indices."""
    counts = _layer_counts(num_layers, pp, vpp, first_stage_layers, last_stage_layers, account_for_embedding,
                           account_for_loss)
    chunks = vpp or 1
    ranges = [[range(0)] * chunks for _ in range(pp)]
    start = 0
    for v in range(chunks):  # megatron's order: chunk-major, then pipeline rank
        for r in range(pp):
            ranges[r][v] = range(start, start + counts[r][v])
            start += counts[r][v]
    assert start == num_layers, (start, num_layers)
    return ranges


def _layer_counts(num_layers, pp, vpp, first, last, embedding, loss) -> list[list[int]]:
    if num_layers < 1 or pp < 1:
        raise ConfigError(f"{NUM_LAYERS} ({num_layers}) and {PP} ({pp}) must be >= 1")
    if vpp is not None:
        if vpp < 1:
            raise ConfigError(f"{VPP} must be >= 1, got {vpp}")
        if pp < 2:
            raise ConfigError(f"{VPP} needs {PP} >= 2")
    chunks = vpp or 1
    uneven = first is not None or last is not None
    if uneven:
        if embedding or loss:  # TransformerConfig.__post_init__ raises
            raise ConfigError(f"{FIRST} / {LAST} cannot be combined with {EMBEDDING} / {LOSS} (megatron-core "
                              "supports one or the other)")
        if pp < 2:
            raise ConfigError(f"{FIRST} / {LAST} need {PP} >= 2")
        for flag, n in ((FIRST, first), (LAST, last)):
            if n is not None and n < 1:
                raise ConfigError(f"{flag} must be >= 1, got {n}")
            if n is not None and n % chunks:
                raise ConfigError(f"{flag} ({n}) must be divisible by {VPP} ({vpp})")
        middle_layers = num_layers - (first or 0) - (last or 0)
        middle_stages = pp - (first is not None) - (last is not None)
        given = " + ".join(f"{f} ({n})" for f, n in ((FIRST, first), (LAST, last)) if n is not None)
        if bool(middle_layers) != bool(middle_stages) or middle_layers < 0:
            raise ConfigError(f"{given} leave {middle_layers} of {NUM_LAYERS} ({num_layers}) for the "
                              f"{middle_stages} other stage(s) of {PP} ({pp})")
        if middle_stages and middle_layers % middle_stages:
            raise ConfigError(f"{given} leave {middle_layers} of {NUM_LAYERS} ({num_layers}), not divisible by "
                              f"the {middle_stages} other stage(s) of {PP} ({pp})")
        per_middle = middle_layers // middle_stages if middle_stages else 0
        if middle_stages and per_middle % chunks:
            raise ConfigError(f"{given} leave {per_middle} layers on each other pipeline stage, not divisible by "
                              f"{VPP} ({vpp})")
        if vpp is not None and not middle_stages:
            # megatron-core 0.16.1's interleaved uneven offset divides by the number of middle stages
            # (get_transformer_layer_offset: ZeroDivisionError on the last stage when there are none).
            raise ConfigError(f"with {VPP}, {FIRST} and {LAST} together need {PP} >= 3 (megatron-core 0.16.1 "
                              "computes interleaved uneven offsets through the middle stages)")
        per_rank = [per_middle] * pp
        if first is not None:
            per_rank[0] = first
        if last is not None:
            per_rank[-1] = last
        return [[n // chunks] * chunks for n in per_rank]
    padded = num_layers + int(embedding) + int(loss)
    accounted = "".join(f" + 1 ({f})" for f, on in ((EMBEDDING, embedding), (LOSS, loss)) if on)
    if padded % pp:
        raise ConfigError(f"{NUM_LAYERS} ({num_layers}){accounted} must be divisible by {PP} ({pp})"
                          + ("" if accounted else f"; for an uneven split use {FIRST} / {LAST}"))
    per_rank = padded // pp
    if per_rank % chunks:
        raise ConfigError(f"{NUM_LAYERS} ({num_layers}){accounted} must be divisible by {PP} ({pp}) x "
                          f"{VPP} ({vpp}) = {pp * chunks}")
    counts = [[per_rank // chunks] * chunks for _ in range(pp)]
    if embedding:
        counts[0][0] -= 1
    if loss:
        counts[-1][-1] -= 1
    if min(min(c) for c in counts) < 0:  # get_num_layers_to_build asserts
        raise ConfigError(f"{NUM_LAYERS} ({num_layers}){accounted}: a virtual stage would hold fewer than 0 layers "
                          f"at {PP} ({pp}) x {VPP} ({vpp})")
    return counts


def virtual_stages_from_layers_per_stage(num_layers: int, pp: int, layers_per_virtual_stage: int,
                                         uneven: bool = False, account_for_embedding: bool = False,
                                         account_for_loss: bool = False) -> int | None:
    """--num-layers-per-virtual-pipeline-stage -> virtual stages per pipeline rank, as Megatron-LM derives it
    (None when that is 1: plain 1F1B)."""
    if uneven:
        raise ConfigError(f"{LAYERS_PER_VPP} cannot be used with {FIRST} / {LAST}; give the virtual stages per "
                          f"pipeline rank with {VPP} (Megatron-LM: --num-virtual-stages-per-pipeline-rank)")
    padded = num_layers + int(account_for_embedding) + int(account_for_loss)
    if layers_per_virtual_stage < 1 or padded % pp or (padded // pp) % layers_per_virtual_stage:
        raise ConfigError(f"{LAYERS_PER_VPP} ({layers_per_virtual_stage}) must divide the layers of each pipeline "
                          f"stage ({NUM_LAYERS} {num_layers} over {PP} {pp})")
    vpp = padded // pp // layers_per_virtual_stage
    return None if vpp == 1 else vpp


def layout_errors(model, *, world_size: int, tp: int = 1, pp: int = 1, cp: int = 1, vpp: int | None = None,
                  first_stage_layers: int | None = None, last_stage_layers: int | None = None,
                  account_for_embedding: bool = False, account_for_loss: bool = False,
                  micro_batch_size: int = 1, global_batch_size: int = 1,
                  seq_lengths: Mapping[str, int | None] | None = None, sequence_parallel: bool = False,
                  fp8: bool = False, use_megatron_fsdp: bool = False, fsdp_sharding_strategy: str | None = None,
                  overlap_param_gather: bool = False, flags: Mapping[str, str] | None = None) -> list[str]:
    """Every reason `model` (a config.model.ModelConfig) cannot run in this layout; empty when it can.

    Rules (each where megatron-core would assert, fail or silently mis-train):
    - sizes >= 1; world size divisible by TP x PP x CP (DP = the quotient);
    - attention heads and query groups divisible by TP, heads by query groups, hidden size by heads (unless
      kv_channels is set), ffn_hidden_size by TP (RowParallelLinear splits it);
    - the pipeline layer split (`pipeline_layer_split`);
    - global batch divisible by micro-batch x DP;
    - interleaved schedule (VPP): micro-batches per step divisible by PP (megatron's
      microbatch_group_size_per_vp_stage defaults to PP and the schedule raises on a partial group);
    - every sequence length <= max_position_embeddings and a multiple of config/sequence.py's multiple
      (SP: TP; CP: 2 x CP; FP8: 16 tokens per rank);
    - Megatron-FSDP: no pipeline parallelism (megatron-core 0.16.1's adapter lays its device mesh over the whole
      world as DP x CP x TP: mcore_fsdp_adapter.py `_get_dp_tp_mesh` fails in einops.rearrange when PP > 1), and
      DP x CP >= 2: nothing to shard otherwise, and at DP 1 its gradients come out wrong (measured here, hcx-tiny
      on CPU: grad norm 154.9 where DDP and FSDP at DP 2 give 1.559), which gradient clipping would then use;
      sharding strategy `no_shard` only with --overlap-param-gather (without it, megatron_fsdp's synchronous
      `start_param_sync` all-gathers groups that have no sharded weight buffer: AttributeError 'NoneType' object
      has no attribute 'fetch_bucket' in the first step, seen here on gloo).
    `seq_lengths`: {flag: length} (None values are skipped). `flags`: display names for the flag constants above."""
    name = dict(flags or {})

    def f(flag: str) -> str:
        return name.get(flag, flag)

    bad = []
    for flag, v in ((TP, tp), (PP, pp), (CP, cp), (MBS, micro_batch_size), (GBS, global_batch_size),
                    (WORLD, world_size)):
        if v < 1:
            bad.append(f"{f(flag)} must be >= 1, got {v}")
    if bad:
        return bad
    if world_size % (tp * pp * cp):
        bad.append(f"{f(WORLD)} {world_size} is not divisible by {f(TP)} ({tp}) x {f(PP)} ({pp}) x {f(CP)} ({cp}) "
                   f"= {tp * pp * cp}")
    m = model
    if m.num_attention_heads % tp:
        bad.append(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by {f(TP)} ({tp})")
    if m.num_query_groups % tp:
        bad.append(f"--num-query-groups ({m.num_query_groups}) must be divisible by {f(TP)} ({tp})")
    if m.num_attention_heads % m.num_query_groups:
        bad.append(f"--num-attention-heads ({m.num_attention_heads}) must be divisible by --num-query-groups "
                   f"({m.num_query_groups})")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        bad.append(f"--hidden-size ({m.hidden_size}) must be divisible by --num-attention-heads "
                   f"({m.num_attention_heads}) unless --kv-channels is given")
    if m.ffn_hidden_size % tp:
        bad.append(f"--ffn-hidden-size ({m.ffn_hidden_size}) must be divisible by {f(TP)} ({tp})")
    try:
        pipeline_layer_split(m.num_layers, pp, vpp, first_stage_layers, last_stage_layers, account_for_embedding,
                             account_for_loss)
    except ConfigError as exc:
        text = str(exc)
        for flag in (TP, PP, VPP):
            text = text.replace(flag, f(flag))
        bad.append(text)
    dp = world_size // (tp * pp * cp)
    if dp and global_batch_size % (micro_batch_size * dp):
        bad.append(f"{f(GBS)} ({global_batch_size}) must be divisible by {f(MBS)} ({micro_batch_size}) x "
                   f"data-parallel size ({dp}) = {micro_batch_size * dp}")
    elif dp and vpp is not None and (global_batch_size // (micro_batch_size * dp)) % pp:
        microbatches = global_batch_size // (micro_batch_size * dp)
        bad.append(f"the interleaved schedule ({f(VPP)} {vpp}) runs micro-batches in groups of {f(PP)} ({pp}): "
                   f"{f(GBS)} ({global_batch_size}) / ({f(MBS)} ({micro_batch_size}) x data-parallel size ({dp})) "
                   f"= {microbatches} micro-batches is not a multiple of {pp}")
    if use_megatron_fsdp and pp > 1:
        bad.append(f"--use-megatron-fsdp needs {f(PP)} 1, got {pp} (megatron-core 0.16.1's Megatron-FSDP lays its "
                   "device mesh over all ranks as DP x CP x TP)")
    elif use_megatron_fsdp and dp and dp * cp < 2:
        bad.append(f"--use-megatron-fsdp needs data-parallel x {f(CP)} >= 2 to shard over, got {dp} x {cp} "
                   "(and megatron-core 0.16.1's Megatron-FSDP computes wrong gradients at DP 1)")
    if use_megatron_fsdp and fsdp_sharding_strategy == "no_shard" and not overlap_param_gather:
        bad.append("--use-megatron-fsdp with --data-parallel-sharding-strategy no_shard needs --overlap-param-gather "
                   "(megatron-core 0.16.1's synchronous parameter sync fails for unsharded weights); or shard "
                   "(optim, optim_grads, optim_grads_params)")
    multiple = sequence_multiple(tp, sequence_parallel, cp, fp8)
    for flag, seq in (seq_lengths or {}).items():
        if seq is None:
            continue
        if seq > m.max_position_embeddings:
            bad.append(f"{f(flag)} ({seq}) exceeds --max-position-embeddings ({m.max_position_embeddings})")
        if seq % multiple:
            sp = "on" if sequence_parallel else "off"
            bad.append(f"{f(flag)} ({seq}) must be a multiple of {multiple}, the sequence multiple of this layout: "
                       f"{f(TP)} ({tp}) with --sequence-parallel ({sp}), {f(CP)} ({cp}), "
                       f"--fp8-format ({'on' if fp8 else 'off'})")
    return bad


__all__ = ["pipeline_layer_split", "pipeline_layer_ranges", "virtual_stages_from_layers_per_stage", "layout_errors",
           "ConfigError"]
