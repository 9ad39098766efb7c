"""A parallel layout (TP, PP, VPP, CP, DP, micro-batch, recompute) and the workload it runs.

`Layout.check(workload)` applies the driver's own layout rules (hcx_megatron/config/layout_rules.py, which
validate_config uses too) so that the planner never proposes a layout the driver rejects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hcx_megatron.config.layout_rules import layout_errors
from hcx_megatron.config.model import ModelConfig
from hcx_megatron.perf.params import FSDP_SHARDING_STRATEGIES


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, sequence length, global batch and numeric format."""

    model: ModelConfig
    seq_length: int
    global_batch_size: int
    # "bf16" (mixed precision, fp32 main params) | "fp32" | "fp8" (bf16 mixed precision with Transformer
    # Engine FP8 linear layers, Megatron-LM --fp8-format hybrid; see fp8_recipe)
    precision: str = "bf16"
    flash_attention: bool = True  # fused attention: no s x s score matrix is kept for backward
    hidden_dropout: float = 0.0  # HCX-style pretraining runs without dropout; >0 adds 1-byte masks
    attention_dropout: float = 0.0
    # Megatron-LM --fp8-recipe: "delayed" (amax history, scale from earlier steps) or "tensorwise"
    # (current scaling: an extra amax pass over every FP8 GEMM input before its cast)
    fp8_recipe: str = "delayed"
    # Megatron-LM --transformer-impl: "transformer_engine" (fused norm+linear, fused SwiGLU/RoPE, flash
    # attention) or "local" (megatron-core local spec: unfused torch ops that keep their intermediates)
    transformer_impl: str = "transformer_engine"

    def __post_init__(self):
        for name, allowed in (("precision", ("bf16", "fp32", "fp8")), ("fp8_recipe", ("delayed", "tensorwise")),
                              ("transformer_impl", ("transformer_engine", "local"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_length * self.global_batch_size


RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    vpp: int | None = None  # virtual pipeline chunks per stage (interleaved 1F1B); None = plain 1F1B
    micro_batch_size: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None  # "uniform" | "block" (full only)
    recompute_num_layers: int | None = None
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    # Megatron-FSDP (--use-megatron-fsdp, optim_grads_params): weights, gradients and optimizer state all
    # sharded over DP x CP; each layer's weights all-gathered before its forward and backward
    use_megatron_fsdp: bool = False
    # Megatron-LM --data-parallel-sharding-strategy under Megatron-FSDP: optim_grads_params (ZeRO-3), optim_grads
    # (weights replicated), optim (weights and gradients replicated) or no_shard (perf/params.megatron_fsdp_shards)
    data_parallel_sharding_strategy: str = "optim_grads_params"
    grad_reduce_in_fp32: bool = True  # Megatron-LM bf16 default; NVIDIA's benchmark recipes reduce in bf16
    ddp_bucket_size: int | None = None  # --ddp-bucket-size (params); None: max(40M, 1M x DP)
    tp_comm_overlap: bool = False  # --tp-comm-overlap (TE userbuffers: TP collectives overlapped with GEMMs)
    # fp32 main weights kept as their 16 low bits beside the bf16 weights (10 optimizer bytes per parameter,
    # not 12): megatron-core OptimizerConfig use_precision_aware_optimizer + store_param_remainders, and Apex
    # DistributedFusedAdam's store_param_remainders, which NeMo 1.x turns on for bf16 O2 training. Modelled for
    # published runs; the trainer does not expose it, so megatron_flags() refuses it.
    optimizer_param_remainders: bool = False
    # Megatron-LM --fp8-param-gather (FP8 workloads; NeMo's fp8_params): weights kept as FP8 tensors, so the
    # distributed optimizer all-gathers them in 1 byte; in memory 1 byte plus TE's 1-byte transpose, as many
    # bytes as the bf16 weight. Modelled for published runs; megatron_flags() refuses it like the one above.
    fp8_param_gather: bool = False
    overlap_p2p_comm: bool = True  # Megatron-LM default; only the interleaved schedule overlaps its p2p
    # uneven pipeline stages (megatron-core TransformerConfig names; Megatron-LM
    # --decoder-first/last-pipeline-num-layers, --account-for-embedding/loss-in-pipeline-split)
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def num_microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.micro_batch_size * self.dp)

    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        parts += [f"dp{self.dp}", f"mb{self.micro_batch_size}"]
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute_granularity:
            parts.append("rc-" + self.recompute_granularity[:3])
        return "_".join(parts)

    def megatron_flags(self) -> list[str]:
        """The Megatron-LM flags that select this layout in `python -m hcx_megatron.pretrain`."""
        f = ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
             "--micro-batch-size", str(self.micro_batch_size)]
        if self.vpp:
            f += ["--virtual-pipeline-model-parallel-size", str(self.vpp)]
        if self.cp > 1:
            f += ["--context-parallel-size", str(self.cp)]
        if self.sequence_parallel:
            f.append("--sequence-parallel")
        if self.recompute_granularity:
            f += ["--recompute-granularity", self.recompute_granularity]
            if self.recompute_granularity == "full":
                f += ["--recompute-method", self.recompute_method or "uniform"]
                if self.recompute_num_layers:
                    f += ["--recompute-num-layers", str(self.recompute_num_layers)]
        if self.use_distributed_optimizer:
            f.append("--use-distributed-optimizer")
        if self.overlap_grad_reduce:
            f.append("--overlap-grad-reduce")
        if self.overlap_param_gather:
            f.append("--overlap-param-gather")
        if self.use_megatron_fsdp:
            f += ["--use-megatron-fsdp", "--data-parallel-sharding-strategy", self.data_parallel_sharding_strategy]
        if self.ddp_bucket_size:
            f += ["--ddp-bucket-size", str(self.ddp_bucket_size)]
        if self.tp_comm_overlap:
            f.append("--tp-comm-overlap")
        unexposed = [n for n in ("optimizer_param_remainders", "fp8_param_gather") if getattr(self, n)]
        if unexposed:
            raise ValueError(f"{', '.join(unexposed)}: modelled for published runs but not exposed by the trainer")
        if self.num_layers_in_first_pipeline_stage is not None:
            f += ["--decoder-first-pipeline-num-layers", str(self.num_layers_in_first_pipeline_stage)]
        if self.num_layers_in_last_pipeline_stage is not None:
            f += ["--decoder-last-pipeline-num-layers", str(self.num_layers_in_last_pipeline_stage)]
        if self.account_for_embedding_in_pipeline_split:
            f.append("--account-for-embedding-in-pipeline-split")
        if self.account_for_loss_in_pipeline_split:
            f.append("--account-for-loss-in-pipeline-split")
        return f

    def stage_layers(self, num_layers: int) -> list[list[int]]:
        """Transformer layers on each [pp_rank][virtual chunk], as megatron-core builds them (uneven
        first/last stages included; the one rule lives in config/layout_rules.py)."""
        from hcx_megatron.config.layout_rules import pipeline_layer_split

        return pipeline_layer_split(num_layers, self.pp, self.vpp,
                                    first_stage_layers=self.num_layers_in_first_pipeline_stage,
                                    last_stage_layers=self.num_layers_in_last_pipeline_stage,
                                    account_for_embedding=self.account_for_embedding_in_pipeline_split,
                                    account_for_loss=self.account_for_loss_in_pipeline_split)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "<layout>") -> "Layout":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown layout field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def check(self, w: Workload) -> list[str]:
        """Reasons this layout cannot run the workload (empty when it can)."""
        m = w.model
        if self.dp < 1:
            return [f"dp must be >= 1, got {self.dp}"]
        # The driver's own rules (config/layout_rules.py), so the planner never proposes a layout it rejects.
        bad = layout_errors(
            m, world_size=self.world_size, tp=self.tp, pp=self.pp, cp=self.cp, vpp=self.vpp,
            first_stage_layers=self.num_layers_in_first_pipeline_stage,
            last_stage_layers=self.num_layers_in_last_pipeline_stage,
            account_for_embedding=self.account_for_embedding_in_pipeline_split,
            account_for_loss=self.account_for_loss_in_pipeline_split,
            micro_batch_size=self.micro_batch_size, global_batch_size=w.global_batch_size,
            seq_lengths={"--seq-length": w.seq_length}, sequence_parallel=self.sequence_parallel,
            fp8=w.precision == "fp8", use_megatron_fsdp=self.use_megatron_fsdp,
            fsdp_sharding_strategy=self.data_parallel_sharding_strategy, overlap_param_gather=self.overlap_param_gather)
        if self.use_megatron_fsdp and self.data_parallel_sharding_strategy not in FSDP_SHARDING_STRATEGIES:
            bad.append(f"data_parallel_sharding_strategy must be one of {FSDP_SHARDING_STRATEGIES}, "
                       f"got {self.data_parallel_sharding_strategy!r}")
        if self.recompute_granularity not in RECOMPUTE:
            bad.append(f"recompute_granularity must be one of {RECOMPUTE}")
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            bad.append("full recompute needs recompute_method uniform|block")
        return bad


def parse_layout(text: str) -> Layout:
    """'tp=2,pp=2,dp=2,mb=1,vpp=2,cp=1,sp,rc=full' -> Layout (the CLI/sweep short form)."""
    alias = {"mb": "micro_batch_size", "rc": "recompute_granularity", "rcm": "recompute_method",
             "rcn": "recompute_num_layers", "sp": "sequence_parallel", "distopt": "use_distributed_optimizer",
             "fsdp": "use_megatron_fsdp", "tpo": "tp_comm_overlap", "first": "num_layers_in_first_pipeline_stage",
             "last": "num_layers_in_last_pipeline_stage", "emb": "account_for_embedding_in_pipeline_split",
             "loss": "account_for_loss_in_pipeline_split", "fsdp_shard": "data_parallel_sharding_strategy"}
    kw: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        key = alias.get(key.strip(), key.strip())
        if key not in {f.name for f in dataclasses.fields(Layout)}:
            raise ValueError(f"layout {text!r}: unknown key {item!r} (use tp, pp, dp, cp, vpp, mb, sp, rc, rcm, rcn, "
                             f"fsdp, fsdp_shard, tpo, first, last, emb, loss or a Layout field name)")
        field_type = {f.name: f.type for f in dataclasses.fields(Layout)}[key]
        if "bool" in str(field_type):
            kw[key] = val.strip().lower() not in ("0", "false", "no") if val else True
        elif key in ("recompute_granularity", "recompute_method"):
            kw[key] = None if val in ("", "none") else val
        elif key == "data_parallel_sharding_strategy":
            kw[key] = val.strip()
        else:
            try:
                kw[key] = int(val)
            except ValueError:
                raise ValueError(f"layout {text!r}: {key} needs an integer, got {val!r}") from None
    if kw.get("recompute_granularity") == "full" and "recompute_method" not in kw:
        kw["recompute_method"] = "uniform"
    if kw.get("tp", 1) > 1 and "sequence_parallel" not in kw:
        kw["sequence_parallel"] = True
    return Layout(**kw)


__all__ = ["Workload", "Layout", "parse_layout", "RECOMPUTE"]
