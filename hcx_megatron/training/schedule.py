"""The one call into megatron-core's pipeline schedule (no pipelining, 1F1B or interleaved: megatron picks it from
parallel_state). The training loop's steps and evaluation, generation and PPO's forward passes all go through
`run_schedule`; `forward_only_collect` is its forward-only form that returns per-micro-batch values."""

from __future__ import annotations

from typing import Callable

from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func


def run_schedule(chunks: list, microbatches: list, forward_step: Callable, seq_length: int, micro_batch_size: int,
                 forward_only: bool, collect_non_loss_data: bool = False) -> list:
    """`microbatches` through the model chunks; returns what megatron's schedule returns (the loss dicts, or with
    collect_non_loss_data the collect function's values), on the last pipeline stage; empty on the others."""
    n_chunks = len(chunks)
    # The interleaved schedule reads one iterator per model chunk; each sees the same micro-batches.
    iterators = [iter(microbatches) for _ in range(n_chunks)]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n_chunks > 1 else iterators[0],
        model=chunks if n_chunks > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_non_loss_data,
    ) or []


def forward_only_collect(chunks: list, micro: list, forward_step: Callable, seq_length: int, micro_batch_size: int):
    """Run `micro` forward only (any PP, interleaved with several chunks) and return what forward_step's collect
    function returned per micro-batch, on the last pipeline stage; None on the others."""
    collected = run_schedule(chunks, micro, forward_step, seq_length, micro_batch_size, forward_only=True,
                             collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return list(collected)


__all__ = ["run_schedule", "forward_only_collect"]
