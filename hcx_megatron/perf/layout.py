"""A parallel layout (TP, PP, VPP, CP, DP, micro-batch, recompute) and the workload it runs.

`Layout.check(workload)` applies the same divisibility rules as the driver's validate_config
(hcx_megatron/config/args.py) so that the planner never proposes a layout the driver rejects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hcx_megatron.config.model import ModelConfig


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, sequence length, global batch and numeric format."""

    model: ModelConfig
    seq_length: int
    global_batch_size: int
    precision: str = "bf16"  # "bf16" (mixed precision, fp32 main params/grads) | "fp32"
    flash_attention: bool = True  # fused attention: no s x s score matrix is kept for backward
    hidden_dropout: float = 0.0  # HCX-style pretraining runs without dropout; >0 adds 1-byte masks
    attention_dropout: float = 0.0

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
        return f

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
        bad = []
        for name in ("tp", "pp", "dp", "cp", "micro_batch_size"):
            if getattr(self, name) < 1:
                bad.append(f"{name} must be >= 1")
        if bad:
            return bad
        if m.num_attention_heads % self.tp:
            bad.append(f"num_attention_heads {m.num_attention_heads} not divisible by TP {self.tp}")
        if m.num_query_groups % self.tp:
            bad.append(f"num_query_groups {m.num_query_groups} not divisible by TP {self.tp}")
        if m.ffn_hidden_size % self.tp:
            bad.append(f"ffn_hidden_size {m.ffn_hidden_size} not divisible by TP {self.tp}")
        if self.vpp is not None:
            if self.pp < 2:
                bad.append("VPP needs PP >= 2")
            elif m.num_layers % (self.pp * self.vpp):
                bad.append(f"num_layers {m.num_layers} not divisible by PP x VPP {self.pp * self.vpp}")
            elif self.num_microbatches(w.global_batch_size) % self.pp:
                # Megatron's interleaved schedule runs micro-batches in groups of PP.
                bad.append("interleaved schedule needs the number of micro-batches divisible by PP")
        elif m.num_layers % self.pp:
            bad.append(f"num_layers {m.num_layers} not divisible by PP {self.pp}")
        if w.global_batch_size % (self.micro_batch_size * self.dp):
            bad.append(f"global batch {w.global_batch_size} not divisible by micro-batch x DP "
                       f"{self.micro_batch_size * self.dp}")
        if self.sequence_parallel and (self.tp < 2 or w.seq_length % self.tp):
            bad.append("sequence parallel needs TP >= 2 dividing seq_length")
        if self.cp > 1 and w.seq_length % (2 * self.cp):
            bad.append(f"seq_length {w.seq_length} not divisible by 2 x CP {2 * self.cp}")
        if self.recompute_granularity not in RECOMPUTE:
            bad.append(f"recompute_granularity must be one of {RECOMPUTE}")
        if self.recompute_granularity == "full" and self.recompute_method not in ("uniform", "block"):
            bad.append("full recompute needs recompute_method uniform|block")
        if w.seq_length > m.max_position_embeddings:
            bad.append(f"seq_length {w.seq_length} exceeds max_position_embeddings {m.max_position_embeddings}")
        return bad


def parse_layout(text: str) -> Layout:
    """'tp=2,pp=2,dp=2,mb=1,vpp=2,cp=1,sp,rc=full' -> Layout (the CLI/sweep short form)."""
    alias = {"mb": "micro_batch_size", "rc": "recompute_granularity", "rcm": "recompute_method",
             "rcn": "recompute_num_layers", "sp": "sequence_parallel", "distopt": "use_distributed_optimizer"}
    kw: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, val = item.partition("=")
        key = alias.get(key.strip(), key.strip())
        if key not in {f.name for f in dataclasses.fields(Layout)}:
            raise ValueError(f"layout {text!r}: unknown key {item!r} (use tp, pp, dp, cp, vpp, mb, sp, rc, rcm, rcn)")
        field_type = {f.name: f.type for f in dataclasses.fields(Layout)}[key]
        if "bool" in str(field_type):
            kw[key] = val.strip().lower() not in ("0", "false", "no") if val else True
        elif key in ("recompute_granularity", "recompute_method"):
            kw[key] = None if val in ("", "none") else val
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
