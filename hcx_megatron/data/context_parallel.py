"""Each context-parallel rank's share of a training micro-batch.

Under --context-parallel-size CP > 1 every rank of a CP group receives the whole micro-batch (CP ranks share a
data-parallel rank) and megatron-core's schedules slice nothing: the forward step must hand the model this rank's
share. Transformer Engine's ring attention and megatron-core's RoPE (`get_pos_emb_on_this_cp_rank`) expect the
load-balanced causal split: the sequence cut into 2*CP equal chunks, rank r holding chunks r and 2*CP-1-r (an
early, cheap chunk with a late, expensive one). Two layouts:
- [b, s] batches (pretraining, unpacked SFT): `slice_batch_for_context_parallel`, megatron-core's
  `get_batch_on_this_cp_rank`;
- packed SFT on Transformer Engine (THD: rows flattened to one sequence, documents delimited by cu_seqlens):
  `packed_batch_for_transformer_engine`, megatron-core's `get_thd_batch_on_this_cp_rank`, which cuts every document
  that way with TE's partitioned indices and so needs each document padded to a multiple of 2*CP
  (cu_seqlens_padded, hcx_megatron.data.sft_dataset.collate).

The loss needs no CP-specific scaling. Loss functions return (sum of per-token losses, token count) over the tokens
this rank holds; with calculate_per_token_loss megatron-core's forward_step_calc_loss leaves 3-tuple losses
unscaled (the `*= cp_group_size` is for 2-tuple losses only), DDP sums gradients over the data-parallel group *with*
context parallelism (gradient_scaling_factor 1.0 under per-token loss), and finalize_model_grads all-reduces
num_tokens over that same DP x CP group and divides by it. Disjoint slices therefore give exactly the per-token
mean over the global batch. The logged [sum, count] pairs (training/loop.reduce_metrics, a sum over all ranks) are
right for the same reason.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.utils import get_batch_on_this_cp_rank, get_thd_batch_on_this_cp_rank

from hcx_megatron.config.sequence import context_parallel_chunks


def _sequence_tensors(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors laid out [b, s] like the tokens (not cu_seqlens and other per-batch values)."""
    rows_and_length = batch["tokens"].shape[:2]
    return {k: v for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == rows_and_length}


def slice_batch_for_context_parallel(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This CP rank's share of a [b, s] micro-batch: every [b, s] tensor (tokens, labels, loss mask, position ids,
    ...) cut along s by megatron-core's get_batch_on_this_cp_rank; other entries unchanged. The same batch at
    CP 1. Returns a new dict: the micro-batch itself is left whole (interleaved pipeline chunks and cached
    validation steps read it again)."""
    cp_size = ps.get_context_parallel_world_size()
    if cp_size == 1:
        return batch
    length, chunks = batch["tokens"].shape[1], context_parallel_chunks(cp_size)
    if length % chunks:
        raise ValueError(f"a micro-batch of sequence length {length} cannot be split for --context-parallel-size "
                         f"{cp_size}: the length must be a multiple of {chunks} (hcx_megatron/config/sequence.py)")
    return {**batch, **get_batch_on_this_cp_rank(_sequence_tensors(batch))}


def packed_batch_for_transformer_engine(batch: dict[str, torch.Tensor]):
    """A packed micro-batch in Transformer Engine's THD layout, this CP rank's share.

    Returns (tensors, packed_seq_params): the [b, s] tensors flattened to [1, b*s] (at CP > 1 each document's
    two chunks of this rank, [1, b*s/CP]) and megatron-core's PackedSeqParams for the model call."""
    from megatron.core.packed_seq_params import PackedSeqParams

    flat = {k: v.reshape(1, -1) for k, v in _sequence_tensors(batch).items()}
    cu_seqlens = batch["cu_seqlens"].to(torch.int32)
    cp_size = ps.get_context_parallel_world_size()
    if cp_size == 1:
        longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return flat, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                     max_seqlen_q=longest, max_seqlen_kv=longest)
    from hcx_megatron.model.spec import transformer_engine_import_error

    error = transformer_engine_import_error()
    if error is not None:  # megatron-core would only assert on a missing TE version
        raise RuntimeError(f"packed sequences with --context-parallel-size {cp_size} need Transformer Engine "
                           f"(its THD partitioning), which does not import here: {error}")
    cu_seqlens_padded = batch["cu_seqlens_padded"].to(torch.int32)
    chunks = context_parallel_chunks(cp_size)
    if bool(((cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]) % chunks).any()):
        raise ValueError(f"packed documents must be padded to a multiple of {chunks} for --context-parallel-size "
                         f"{cp_size} (collate's document_multiple)")
    max_seqlen = (cu_seqlens_padded[1:] - cu_seqlens_padded[:-1]).max().reshape(1)
    return get_thd_batch_on_this_cp_rank(flat, cu_seqlens, cu_seqlens_padded, max_seqlen)


__all__ = ["slice_batch_for_context_parallel", "packed_batch_for_transformer_engine"]
