"""KV-cached decoding for `generate` (hcx_megatron/inference/generate.py), on megatron-core's own inference
machinery: `GPTModel.forward(..., inference_context=StaticInferenceContext)`, whose attention layers keep the
keys/values of every position already run and attend a new token to all of them.

Prompts of different lengths share ONE cache offset, as in megatron-core's static text generation
(TextGenerationController.generate_all_output_tokens_static_batch): the prefill is one forward over the first
`min(prompt lengths)` tokens of every prompt; each later step feeds one token per row at the same position. A row
whose prompt is longer than that position is fed its own next prompt token ("teacher forcing") and samples
nothing; once its prompt is consumed it feeds the tokens it generates. So the cache holds no padding, attention is
exactly causal, and a row draws from its sampling generator only for tokens it really generates: the tokens equal
the full-prefix path's for the same seeds (log-probs to float rounding: the matmuls have other shapes).

Steps run through megatron-core's forward-only pipeline schedule (one step = `seq_length` tokens, the prompt
prefix or 1), so PP stages exchange activations as in training, VPP included; every stage advances the context by
the same amount after each step, and each micro-batch sets the context's `batch_size_offset` to its rows before
its forward, whatever order the (interleaved) schedule runs chunks in.

Memory: one K and one V buffer per layer of [min(longest prompt + max_new_tokens, max_seq_length), prompts
(rounded up to the micro-batch layout), KV heads per TP rank, head_dim], allocated by megatron on the first step
and freed when the call returns. With the local spec the cached keys already carry RoPE
(hcx_megatron/model/spec.py RotatedKeyCacheSelfAttention: megatron-core would re-rotate the whole cache every step).

Speed (CPU, tiny models, docs/benchmarks.md): a step is dominated by megatron-core's per-module Python. The one-token
steps run under torch.inference_mode (~20% less); the local spec's linears skip megatron's autograd Functions without
autograd (hcx_megatron/model/spec.py NoGradColumnParallelLinear, ~30% less) and rotate queries and keys in one RoPE
call. At TP1 x PP1 on CPU the one-token forward runs as ONE dynamo-captured graph of the same torch ops
(hcx_megatron/inference/compiled.py: torch.compile with the "eager" backend, no kernel changes, bitwise the same
logits; traced once per model and process, 2.5-4 s CPU, after enough eager steps to pay for it; the step loses
megatron's module Python; at TP1 x PP1 the forward-only schedule around it is skipped), and once fewer than half
the rows run are still generating only those are run (`DROP_FINISHED_BELOW`, where a row's logits do not depend on
the batch size).

Layout rules:
- sequence parallelism: a 1-token step cannot be split over TP ranks. megatron-core's static generation refuses
  SP for dense models and switches it off module by module for MoE (`set_model_to_sequence_parallel`); here SP is
  switched off on the model (config and every module attribute megatron uses for it) for the duration of the call
  and restored exactly afterwards: TP layers then all-reduce instead of reduce-scatter + all-gather, same math.
- FP8 (Transformer Engine): 1-token steps cannot meet the FP8 GEMMs' token multiple (hcx_megatron/config/
  sequence.py), so FP8 models generate on the full-prefix path (`kv_cache_unsupported_reason`).
- Attention: prefill steps are causal with as many queries as keys; later steps get megatron's `no_mask` (offset
  > 0), i.e. the one query sees every cached key. The local spec's SDPAAttention handles both (and aligns a
  causal mask bottom-right should a step ever have fewer queries than keys); the TE spec's attention takes the
  same mask types from megatron (correct by construction, not run here: no TE on CPU).

Not wired: megatron-core's CUDA-graph decode (it requires flash-decode with static batching) and its dynamic
engine (dynamic batching; its own request/engine interface, not a drop-in for this function); see docs/sft.md.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from hcx_megatron.inference.compiled import compiled_forward_unsupported_reason, run_forward
from hcx_megatron.model.builder import unwrap
from hcx_megatron.training.schedule import forward_only_collect

# Module attributes megatron-core reads at forward time to run sequence parallelism (the same set its
# `megatron.core.transformer.utils.set_model_to_sequence_parallel` toggles for inference).
SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def kv_cache_unsupported_reason(config) -> str | None:
    """Why a model cannot decode with the KV cache (it then uses the full-prefix path), or None."""
    if getattr(config, "fp8", None):
        return ("FP8: one-token decode steps cannot meet the FP8 GEMMs' token multiple "
                "(hcx_megatron/config/sequence.py)")
    return None


@contextlib.contextmanager
def sequence_parallel_off(chunks: Sequence[torch.nn.Module]):
    """Run with sequence parallelism off on these chunks; every attribute is restored to its own value after.
    Touches nothing on models without SP (async rollouts run next to the learner's steps)."""
    saved = []
    for chunk in chunks:
        core = unwrap(chunk)
        if not core.config.sequence_parallel:
            continue
        for module in core.modules():
            for attr in SEQUENCE_PARALLEL_ATTRS:
                if getattr(module, attr, None) is True:
                    saved.append((module, attr))
        saved.append((core.config, "sequence_parallel"))  # shared by all chunks and the schedules
    try:
        for owner, attr in saved:
            setattr(owner, attr, False)
        yield
    finally:
        for owner, attr in saved:
            setattr(owner, attr, True)


def decode_forward(model, tokens, position_ids, context):
    """One KV-cached step (run eagerly or as its captured graph: hcx_megatron/inference/compiled.py)."""
    return model(tokens, position_ids, None, inference_context=context, runtime_gather_output=True)


def _forward(model, tokens, position_ids, context, compiled: bool):
    return run_forward(decode_forward, model, tokens, position_ids, context, compiled=compiled)


def _step_logits(chunks: list, context: StaticInferenceContext, tokens: torch.Tensor, n_micro: int,
                 mbs: int, compiled: bool = False) -> torch.Tensor | None:
    """One inference step: `tokens` [rows, s] at positions context.sequence_len_offset .. + s - 1 through the
    pipeline; returns the full-vocabulary logits after the last of them, [rows, padded_vocab] float32, on the last
    pipeline stage (None on the others). Advances the context by s on every stage. compiled: the layout allows
    the forward as a dynamo-captured graph (hcx_megatron/inference/compiled.py run_forward)."""
    rows, length = tokens.shape
    start = context.sequence_len_offset
    positions = torch.arange(start, start + length, dtype=torch.long, device=tokens.device)
    positions = positions.unsqueeze(0).expand(rows, -1)
    if compiled and len(chunks) == 1 and n_micro == 1:
        # One stage, one micro-batch: the forward-only schedule around it would only call it (its per-step Python
        # is a tenth of a compiled step on the demo model).
        context.batch_size_offset = 0
        logits = _forward(chunks[0], tokens, positions, context, compiled)[:, -1].float()
        context.increment_sequence_len_offset(length)
        context.reset_batch_size_offset()
        return logits
    micro = [{"tokens": tokens[k * mbs:(k + 1) * mbs], "position_ids": positions[k * mbs:(k + 1) * mbs],
              "first_row": k * mbs} for k in range(n_micro)]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        context.batch_size_offset = batch["first_row"]  # the cache rows this micro-batch reads and writes
        # runtime_gather_output: inference logits are gathered over TP (megatron asserts it); the context keeps
        # only the last position's logits (materialize_only_last_token_logits).
        output = _forward(model, batch["tokens"], batch["position_ids"], context, compiled)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor[:, -1].float()

        return output, collect

    collected = forward_only_collect(chunks, micro, forward_step, length, mbs)
    context.increment_sequence_len_offset(length)
    context.reset_batch_size_offset()
    if collected is None:
        return None
    return torch.cat(collected, dim=0)


# Rows whose response ended stay in the static cache batch and are run with the others at every step, unless fewer
# than this fraction of the rows run are still active: then the active rows' caches move to the front (megatron's
# StaticInferenceContext.swap_key_value_dict) and only they are run. Pays at long, uneven responses (PPO's 256-token
# rollouts: one row of 32 runs 241 steps, the mean is 69); at short ones the copy and a re-trace of the compiled
# step for the new batch size do not (session 4: no gain at 12-64 tokens). Only where a row's logits do not depend
# on how many rows run, so they stay bitwise those of the full batch (tests/test_generate.py): on CPU with one
# intra-op thread (with more, SDPA's CPU decode kernel splits the keys over threads by batch x heads: last-bit
# differences; GPU kernels are chosen by shape too), keeping at least MIN_ROWS_RUN rows (finished ones fill up:
# the CPU GEMMs compute a row bitwise the same at any M >= 4, not at M = 1-3). Properties of the kernels,
# checked on this machine's CPU.
DROP_FINISHED_BELOW = 0.5
MIN_ROWS_RUN = 4


def _drop_finished_rows(context: StaticInferenceContext, order: list[int], row_of: list[int],
                        active: list[int]) -> int:
    """Reorder the cache rows so that the `active` table rows come first (updating order / row_of in place);
    returns how many rows to run from now on (at least MIN_ROWS_RUN). Attention reads cache rows [0, rows run)
    only."""
    running = set(active)
    rest = [r for r in order if r not in running]
    new_order = list(active) + rest
    with torch.inference_mode(False):  # normal tensors, as the prefill made them (else the compiled step re-traces)
        context.swap_key_value_dict([row_of[r] for r in new_order])  # new cache row j <- old row of new_order[j]
    order[:] = new_order
    for j, r in enumerate(new_order):
        row_of[r] = j
    return max(len(active), MIN_ROWS_RUN)


def decode_with_kv_cache(
    chunks: list,
    prompts: list[list[int]],
    max_new_tokens: int,
    limit: int,
    pad_id: int,
    device: torch.device,
    micro_layout: tuple[int, int],
    pick: Callable[[torch.Tensor | None, list[int]], tuple[list[int], list[float]]],
    record: Callable[[int, int, float], bool],
    compile_decode: bool = True,
) -> None:
    """Generate for `prompts` with a static KV cache (see the module docstring).

    micro_layout: (micro-batches, rows per micro-batch) for the pipeline schedule; rows beyond len(prompts) are
    filler (pads), their logits dropped. pick(logits of the generating rows or None off the last stage, their
    indices) -> (tokens, logprobs), identical on every rank. record(row, token, logprob) -> whether the row goes on.
    compile_decode: run the one-token steps as one dynamo-captured graph where the layout allows
    (compiled_forward_unsupported_reason, after COMPILE_AFTER_CALLS eager steps: hcx_megatron/inference/
    compiled.py), else eagerly; bitwise the same logits either way.
    """
    compiled = compile_decode and compiled_forward_unsupported_reason(chunks) is None
    n = len(prompts)
    n_micro, mbs = micro_layout
    rows = n_micro * mbs
    lengths = [len(p) for p in prompts]
    # A row never holds more than prompt + max_new_tokens tokens, nor more than the length limit.
    cache_length = max(min(length + max_new_tokens, limit) for length in lengths)
    context = StaticInferenceContext(max_batch_size=rows, max_sequence_length=cache_length)
    # Every row's tokens so far (prompt, then response), in the positions the model sees them.
    table = torch.full((rows, cache_length), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        table[i, : len(p)] = torch.as_tensor(p, dtype=torch.long)
    active = list(range(n))
    position = min(lengths)  # index of the token the next logits predict
    logits = _step_logits(chunks, context, table[:, :position].to(device), n_micro, mbs)
    # Cache row r holds row order[r] of the table; the first `fed` cache rows are run each step (_drop_finished_rows).
    order, fed = list(range(rows)), rows
    row_of = list(range(rows))  # the inverse of order
    # One micro-batch (its size may shrink between steps), where rows are batch-invariant (DROP_FINISHED_BELOW).
    can_drop = n_micro == 1 and len(chunks) == 1 and device.type == "cpu" and torch.get_num_threads() == 1
    # The one-token steps run in inference mode (no autograd version counters / view tracking: ~20% of a tiny
    # model's step, same values). Not the prefill: what megatron caches across calls is created there, under the
    # caller's no_grad (the RoPE embedding of this cache length in RotaryEmbedding.forward's lru_cache, which a
    # later training step of that length would otherwise reuse as an inference tensor that autograd cannot save).
    with torch.inference_mode():
        while True:
            generating = [i for i in active if lengths[i] <= position]
            if generating:
                at = [row_of[i] for i in generating] if fed < rows else generating
                tokens, logprobs = pick(None if logits is None else logits[at], generating)
                table[generating, position] = torch.as_tensor(tokens, dtype=torch.long)
                stopped = {i for i, token, lp in zip(generating, tokens, logprobs) if not record(i, token, lp)}
                active = [i for i in active if i not in stopped]
            if not active:
                return
            if all(length <= position + 1 for length in lengths):
                context.enable_decode_mode()  # every prompt consumed: from here on only generated tokens are fed
            if can_drop and len(active) < DROP_FINISHED_BELOW * fed and max(len(active), MIN_ROWS_RUN) < fed:
                fed = _drop_finished_rows(context, order, row_of, active)
            # Always a new (inference) tensor: a view of `table` would differ from it in dispatch keys, a second
            # trace of the compiled step.
            if fed < rows:
                step_tokens = table[order[:fed], position:position + 1]
            else:
                step_tokens = table[:, position:position + 1].clone()
            logits = _step_logits(chunks, context, step_tokens.to(device), 1 if fed < rows else n_micro,
                                  fed if fed < rows else mbs, compiled=compiled)
            position += 1


__all__ = ["decode_with_kv_cache", "kv_cache_unsupported_reason", "decode_forward",
           "sequence_parallel_off"]
