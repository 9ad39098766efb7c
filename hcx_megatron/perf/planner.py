"""Layout planner: enumerate (TP, PP, VPP, CP, DP, micro-batch, recompute) layouts for a model,
global batch, sequence length and GPU count; drop those that do not fit in memory; rank the rest
by predicted tokens/s per GPU.

Enumeration rules: TP divides the attention heads, KV groups and FFN width and stays within a
node (TP across nodes is never competitive); PP divides the layers; CP is a power of two
dividing seq_length/2 (and only offered from 8k tokens up, where ring attention pays); VPP
divides the layers per stage; SP is on whenever TP > 1; the distributed optimizer and
gradient/parameter overlap are always on (the Megatron-LM defaults we ship).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from hcx_megatron.perf.cluster import ClusterConfig
from hcx_megatron.perf.layout import Layout, Workload
from hcx_megatron.perf.memory import MemoryBreakdown, fits, peak_memory
from hcx_megatron.perf.timing import StepTime, step_time


@dataclass(frozen=True)
class PlanEntry:
    layout: Layout
    memory: MemoryBreakdown
    time: StepTime
    fits: bool


@dataclass(frozen=True)
class SearchSpace:
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    recompute: tuple[str | None, ...] = (None, "selective", "full")
    max_vpp: int = 8
    max_cp: int = 8
    min_seq_for_cp: int = 8192
    max_tp: int | None = None  # default: GPUs per node
    layout_switches: tuple[tuple[str, object], ...] = ()  # Layout fields set on every candidate
    megatron_fsdp: tuple[bool, ...] = (False,)  # (False, True): also Megatron-FSDP (PP = 1) candidates


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(w: Workload, num_gpus: int, cluster: ClusterConfig,
                      space: SearchSpace = SearchSpace()) -> Iterator[Layout]:
    m = w.model
    max_tp = space.max_tp or cluster.gpus_per_node
    for tp in _divisors(num_gpus):
        if tp > max_tp or m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp:
            continue
        for pp in _divisors(num_gpus // tp):
            # layers that do not divide over PP: megatron-core's embedding/loss accounting (one slot each on
            # the first and last stage), when that makes them divide (Llama-3.1-405B: 126 + 2 over PP 8)
            uneven = m.num_layers % pp != 0
            if uneven and (pp < 2 or (m.num_layers + 2) % pp):
                continue
            slots = m.num_layers + (2 if uneven else 0)
            rest = num_gpus // (tp * pp)
            cps = [c for c in _divisors(rest) if c & (c - 1) == 0 and c <= space.max_cp
                   and (c == 1 or (w.seq_length >= space.min_seq_for_cp and w.seq_length % (2 * c) == 0))]
            for cp in cps:
                dp = rest // cp
                vpps: list[int | None] = [None]
                if pp > 1:
                    vpps += [v for v in _divisors(slots // pp) if 1 < v <= space.max_vpp]
                for vpp in vpps:
                    for mb in space.micro_batch_sizes:
                        if w.global_batch_size % (mb * dp):
                            continue
                        for fsdp in space.megatron_fsdp:
                            if fsdp and (pp > 1 or dp * cp == 1):
                                continue
                            for rc in space.recompute:
                                switches = {k: v for k, v in space.layout_switches
                                            if not (k == "tp_comm_overlap" and tp == 1)}
                                lay = Layout(tp=tp, pp=pp, dp=dp, cp=cp, vpp=vpp, micro_batch_size=mb,
                                             sequence_parallel=tp > 1, recompute_granularity=rc,
                                             recompute_method="uniform" if rc == "full" else None,
                                             use_megatron_fsdp=fsdp, use_distributed_optimizer=not fsdp,
                                             overlap_param_gather=not fsdp, overlap_grad_reduce=not fsdp,
                                             account_for_embedding_in_pipeline_split=uneven,
                                             account_for_loss_in_pipeline_split=uneven, **switches)
                                if not lay.check(w):
                                    yield lay


def evaluate(w: Workload, lay: Layout, cluster: ClusterConfig) -> PlanEntry:
    mem = peak_memory(w, lay, cluster)
    return PlanEntry(layout=lay, memory=mem, time=step_time(w, lay, cluster), fits=fits(mem, cluster))


def plan(w: Workload, num_gpus: int, cluster: ClusterConfig, space: SearchSpace = SearchSpace(),
         include_unfit: bool = False) -> tuple[list[PlanEntry], int]:
    """(entries ranked by predicted tokens/s/GPU, number of layouts considered)."""
    entries = []
    n = 0
    for lay in enumerate_layouts(w, num_gpus, cluster, space):
        n += 1
        e = evaluate(w, lay, cluster)
        if e.fits or include_unfit:
            entries.append(e)
    entries.sort(key=lambda e: (not e.fits, -e.time.tokens_per_sec_per_gpu))
    return entries, n


COLUMNS = ("#", "TP", "PP", "VPP", "CP", "DP", "MB", "recompute", "mem GiB", "step s", "tok/s/GPU", "MFU %",
           "bubble %", "fits")


def entry_row(i: int, e: PlanEntry) -> list[str]:
    lay, t = e.layout, e.time
    return [str(i), str(lay.tp), str(lay.pp), str(lay.vpp or "-"), str(lay.cp), str(lay.dp),
            str(lay.micro_batch_size), lay.recompute_granularity or "none", f"{e.memory.total_gib:.1f}",
            f"{t.total_s:.3f}", f"{t.tokens_per_sec_per_gpu:,.0f}", f"{100 * t.mfu:.1f}",
            f"{100 * t.bubble_fraction:.1f}", "yes" if e.fits else "NO"]


def format_table(entries: Sequence[PlanEntry], top: int | None = None, markdown: bool = False) -> str:
    rows = [entry_row(i + 1, e) for i, e in enumerate(entries[:top] if top else entries)]
    if markdown:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    fmt = lambda r: "  ".join(x.rjust(wd) for x, wd in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(list(COLUMNS)), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows])


__all__ = ["PlanEntry", "SearchSpace", "enumerate_layouts", "evaluate", "plan", "format_table", "COLUMNS"]
