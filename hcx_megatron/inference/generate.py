"""Text generation on megatron-core model chunks, under any TP x PP layout, on GPU or in CPU mode.

Shared by the SFT generation eval, the `hcx-chat` CLI and RLHF rollouts:

    out = generate(chunks, prompts_ids, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1)
    out.tokens[i]    # response ids of prompt i (the stop id included when one was generated)
    out.logprobs[i]  # log p(token) under the model's unmodified distribution (return_logprobs=True)
    out.finished[i]  # True when a stop id ended the response (False: hit max_new_tokens / max_seq_length)

Contract: every rank of one model-parallel group (all TP x PP ranks of a DP replica) calls `generate` with the
same arguments; every one of them gets the same result. Different DP replicas may pass different prompts
(split the work across DP yourself). The chunks may be DDP-wrapped or bare; their train/eval mode is restored.

Two paths, the same tokens (log-probs to float rounding, ~1e-6 in fp32; tests/test_generate.py):

- KV cache (`kv_cache=True`, the default; hcx_megatron/inference/kv_generate.py): megatron-core's
  StaticInferenceContext through GPTModel.forward. One prefill over the shortest prompt, then one token per row
  per step (rows with longer prompts are fed their own prompt tokens until they start generating), each step
  through megatron-core's forward-only pipeline schedule. Cost: P + T token-forwards per row, attention
  O((P+T)^2); per step a fixed Python/launch overhead (megatron's modules), which dominates on tiny models.
  Sequence parallelism is switched off for the call (a 1-token step cannot be split over TP); FP8 models take
  the full-prefix path (1-token steps cannot meet the FP8 token multiple).
- Full prefix (`kv_cache=False`, drivers' `--no-generation-kv-cache`): the reference. All live sequences (prompt +
  response so far) are right-padded to one length and run whole through the same schedule at every step; right
  padding needs no attention mask, since attention is causal and a real position never sees the pads after it.
  Generating T tokens after a P-token prompt runs T*P + T(T+1)/2 token-forwards and O(T*(P+T)^2) attention.

Either way the last stage gathers the vocabulary-parallel logits of each sequence's next token across TP, picks
the next tokens and broadcasts them over the pipeline group.

Sampling: temperature <= 0 is greedy (argmax). Otherwise logits / temperature, then nucleus (top-p) filtering,
then a draw from a per-prompt torch.Generator seeded by (seed, prompt index), so a prompt's sample does not
depend on which other prompts share the batch or how work is split across DP ranks. Reported logprobs are
of the raw (temperature 1, unfiltered) distribution, the quantity PPO's importance ratio needs when rollouts
sample at temperature 1 / top_p 1; with other settings they are still the policy's own logprobs of the
sampled tokens, not of the sampling distribution.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from hcx_megatron.config.sequence import pad_length, sequence_multiple_of_model
from hcx_megatron.inference.kv_generate import decode_with_kv_cache, kv_cache_unsupported_reason, sequence_parallel_off
from hcx_megatron.model.builder import unwrap
from hcx_megatron.training.schedule import forward_only_collect
from hcx_megatron.tokenizer.special_tokens import ENDOFTURN, PAD, SPECIAL_TOKEN_IDS

ENDOFTURN_ID = SPECIAL_TOKEN_IDS[ENDOFTURN]
PAD_ID = SPECIAL_TOKEN_IDS[PAD]


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    finished: list[bool]


def _as_list(model_chunks) -> list:
    return list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least the most likely one);
    the rest get -inf. logits: [b, V]."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the probability mass BEFORE it already reaches top_p.
    before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = before >= top_p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_next(logits: torch.Tensor, temperature: float, top_p: float,
                uniforms: torch.Tensor | None) -> torch.Tensor:
    """Next token per row of logits [b, V]: greedy when temperature <= 0, else temperature + top-p sampling by
    inverse CDF with row i's uniform draw uniforms[i] ([b] float64 in [0, 1), see PromptUniforms)."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    scaled = top_p_filter(logits.float() / temperature, top_p)
    cdf = torch.cumsum(torch.softmax(scaled.double(), dim=-1), dim=-1)
    u = uniforms.to(cdf.device) * cdf[:, -1]
    out = torch.searchsorted(cdf, u.unsqueeze(-1)).squeeze(-1)
    return out.clamp_(max=logits.shape[-1] - 1)


def _prompt_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))
    return g


class PromptUniforms:
    """The uniform draw behind each generated token: prompt i's k-th token uses the k-th float64 of its own
    torch.Generator seeded by (seed, seed index of prompt i), so a prompt's sample depends neither on the other
    prompts of the batch nor on the DP split, and ONE draw per token keeps the stream independent of the
    (TP-dependent) padded vocabulary width (torch.multinomial would consume one per vocabulary entry).

    A CPU generator yields the same numbers drawn a block at a time as one by one (tests/test_generate.py), so on
    CPU each prompt draws BLOCK tokens' worth ahead: one call per prompt per BLOCK tokens instead of one per
    token (2-4% of a PPO rollout on the test model, docs/benchmarks.md). Other devices draw one by one."""

    BLOCK = 64

    def __init__(self, seed: int, keys: Sequence[int], device: torch.device):
        self.generators = [_prompt_generator(seed, k, device) for k in keys]
        self.ahead = device.type == "cpu"
        self.drawn = torch.empty(len(keys), 0, dtype=torch.float64)

    def take(self, rows: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        """[len(rows)] draws: for each row its counts[j]-th (0-based), i.e. the next one after counts[j] tokens."""
        if not self.ahead:
            return torch.stack([torch.rand((), generator=self.generators[i], dtype=torch.float64,
                                           device=self.generators[i].device) for i in rows])
        if max(counts) >= self.drawn.shape[1]:  # every prompt draws the next block (a finished one's go unused)
            block = [torch.rand(self.BLOCK, generator=g, dtype=torch.float64) for g in self.generators]
            self.drawn = torch.cat([self.drawn, torch.stack(block)], dim=1)
        return self.drawn[list(rows), list(counts)]


def micro_batch_layout(rows: int, n_chunks: int) -> tuple[int, int]:
    """(micro-batches, rows per micro-batch) for one generation step of `rows` sequences; the last micro-batch is
    filled up with filler rows whose results are dropped."""
    pp = ps.get_pipeline_model_parallel_world_size()
    # Several micro-batches let pipeline stages overlap; each must have the same [s, mbs] shape.
    n_micro = max(1, min(rows, pp))
    if n_chunks > 1:
        n_micro = pp  # the interleaved (VPP) schedule wants a multiple of PP micro-batches: filler rows make them
    return n_micro, -(-rows // n_micro)


def _last_logits(chunks: list, seqs: list[list[int]], pad_id: int, pad_multiple: int,
                 device: torch.device) -> torch.Tensor | None:
    """Full-vocabulary logits at the last real position of each sequence: [b, padded_vocab] float32 on the
    last pipeline stage, None on the others."""
    b = len(seqs)
    n_micro, mbs = micro_batch_layout(b, len(chunks))
    rows = seqs + [seqs[0]] * (n_micro * mbs - b)  # filler rows, results dropped
    length = pad_length(max(len(s) for s in rows), pad_multiple)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, s in enumerate(rows):
        tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    last = torch.as_tensor([len(s) - 1 for s in rows], dtype=torch.long)
    positions = torch.arange(length, dtype=torch.long).unsqueeze(0).expand(len(rows), -1).contiguous()
    tokens, last, positions = tokens.to(device), last.to(device), positions.to(device)
    micro = [
        {"tokens": tokens[k * mbs:(k + 1) * mbs], "position_ids": positions[k * mbs:(k + 1) * mbs],
         "last": last[k * mbs:(k + 1) * mbs]}
        for k in range(n_micro)
    ]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None)

        def collect(output_tensor, non_loss_data=False):
            rows_idx = torch.arange(output_tensor.shape[0], device=output_tensor.device)
            picked = output_tensor[rows_idx, batch["last"]]  # [mbs, V / TP]
            return gather_from_tensor_model_parallel_region(picked.contiguous()).float()

        return output, collect

    collected = forward_only_collect(chunks, micro, forward_step, length, mbs)
    if collected is None:
        return None
    return torch.cat(collected, dim=0)[:b]


@torch.no_grad()
def generate(
    model_chunks,
    prompts_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (ENDOFTURN_ID,),
    seed: int = 0,
    return_logprobs: bool = False,
    vocab_size: int | None = None,
    pad_id: int = PAD_ID,
    max_seq_length: int | None = None,
    seed_indices: Sequence[int] | None = None,
    kv_cache: bool = True,
    compile_decode: bool = True,
) -> GenerationOutput:
    """Generate a response for each prompt (see the module docstring for the contract and the cost).

    vocab_size: the tokenizer's size; logits of Megatron's padding rows above it are never chosen.
    max_seq_length: stop a sequence when prompt + response reaches it (default: the model's
    max_sequence_length).
    seed_indices: the index each prompt's sampling generator is keyed by (default 0..n-1); callers that split
    a prompt list give the global indices so samples do not depend on the split.
    kv_cache: decode with megatron-core's static KV cache (hcx_megatron/inference/kv_generate.py); False runs
    the full-prefix path, the reference the KV path is tested against. FP8 models always take the full-prefix
    path (a notice says so once).
    compile_decode: the KV path's one-token steps run as one dynamo-captured graph of the same ops (torch.compile,
    backend "eager": no kernel changes, bitwise the same logits; traced once per model and process, 2.5-4 s CPU on
    the demo model) where the layout allows, after enough eager steps to pay for the trace
    (hcx_megatron/inference/compiled.py), else eagerly.
    """
    chunks = _as_list(model_chunks)
    if not prompts_ids:
        return GenerationOutput([], [] if return_logprobs else None, [])
    if any(len(p) == 0 for p in prompts_ids):
        raise ValueError("generate: every prompt needs at least one token")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    core = unwrap(chunks[0])
    config = core.config
    device = next(core.parameters()).device
    limit = max_seq_length or getattr(core, "max_sequence_length", None) or 10**9
    too_long = [i for i, p in enumerate(prompts_ids) if len(p) >= limit]
    if too_long:
        raise ValueError(f"generate: prompts {too_long[:5]} already have >= {limit} tokens (max_seq_length)")
    # The full-prefix path right-pads to the layout's sequence multiple (SP/CP splits, FP8 GEMMs); causal
    # attention keeps the pads from reaching the real last position.
    if config.context_parallel_size > 1:
        # Sequences are not split over CP ranks here: every rank would run the whole prompt.
        raise ValueError(f"generate: context_parallel_size {config.context_parallel_size} is not supported; "
                         "load the checkpoint at --context-parallel-size 1 to generate")
    pad_multiple = sequence_multiple_of_model(config)
    stop = set(int(s) for s in stop_ids)
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    pp_group = ps.get_pipeline_model_parallel_group()
    pp_src = ps.get_pipeline_model_parallel_last_rank()
    pp = ps.get_pipeline_model_parallel_world_size()

    n = len(prompts_ids)
    prompts = [list(map(int, p)) for p in prompts_ids]
    responses: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    keys = list(seed_indices) if seed_indices is not None else list(range(n))
    if len(keys) != n:
        raise ValueError(f"generate: {len(keys)} seed_indices for {n} prompts")
    uniforms = PromptUniforms(seed, keys, device) if temperature > 0 else None

    def pick(logits: torch.Tensor | None, rows: list[int]) -> tuple[list[int], list[float]]:
        """Next token (and its raw log-prob) of each of `rows` from their logits [len(rows), V], which only the
        last pipeline stage has (None elsewhere); every rank returns the same lists."""
        picked = torch.empty(len(rows), dtype=torch.long, device=device)
        lp = torch.zeros(len(rows), dtype=torch.float32, device=device)
        if last_stage:
            if vocab_size is not None and vocab_size < logits.shape[-1]:
                logits = logits[:, :vocab_size]  # Megatron's padding rows are not tokens
            draws = None if uniforms is None else uniforms.take(rows, [len(responses[i]) for i in rows])
            picked = choose_next(logits, temperature, top_p, draws)
            if return_logprobs:
                lp = torch.log_softmax(logits, dim=-1).gather(-1, picked.unsqueeze(-1)).squeeze(-1)
        if pp > 1:
            # Only the last stage has logits; every stage must agree on the tokens to continue in step.
            dist.broadcast(picked, src=pp_src, group=pp_group)
            if return_logprobs:
                dist.broadcast(lp, src=pp_src, group=pp_group)
        return picked.tolist(), lp.tolist()

    def record(i: int, token: int, lp: float) -> bool:
        """Append a generated token to response i; whether the response goes on."""
        responses[i].append(token)
        logprobs[i].append(lp)
        if token in stop:
            finished[i] = True
            return False
        return len(prompts[i]) + len(responses[i]) < limit and len(responses[i]) < max_new_tokens

    unsupported = kv_cache_unsupported_reason(config) if kv_cache else None
    if unsupported:
        _say_no_kv_cache(unsupported)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        if max_new_tokens <= 0:
            pass  # nothing to generate: empty responses, as the loop below would leave them
        elif kv_cache and not unsupported:
            with sequence_parallel_off(chunks):
                decode_with_kv_cache(chunks, prompts, max_new_tokens, limit, pad_id, device,
                                     micro_batch_layout(n, len(chunks)), pick, record, compile_decode)
        else:
            active = list(range(n))
            for _ in range(max_new_tokens):
                seqs = [prompts[i] + responses[i] for i in active]
                logits = _last_logits(chunks, seqs, pad_id, pad_multiple, device)
                tokens, lps = pick(logits, active)
                active = [i for i, token, lp in zip(active, tokens, lps) if record(i, token, lp)]
                if not active:
                    break
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)
    return GenerationOutput(responses, logprobs if return_logprobs else None, finished)


@functools.lru_cache(maxsize=None)
def _say_no_kv_cache(reason: str) -> None:
    """Say once per process (and reason) why generation runs without the KV cache."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[hcx] generate: no KV cache for this model ({reason}); using the full-prefix path", flush=True)


def add_generation_args(group) -> None:
    """The generation flags every driver that generates (PPO, SFT --gen-eval-data, hcx-chat) takes."""
    group.add_argument("--no-generation-kv-cache", dest="generation_kv_cache", action="store_false", default=True,
                       help="generate by re-running the whole prefix for every token (the reference path) instead "
                            "of decoding with megatron-core's KV cache")


def generate_data_parallel(model_chunks, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int,
                           **kwargs) -> GenerationOutput:
    """`generate` with the prompts split across DP replicas (round robin) and the results gathered back on
    every rank, in prompt order. Samples do not depend on the split: each prompt is seeded by its index here."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = list(range(rank, len(prompts_ids), dp))
    local: dict[int, tuple] = {}
    if mine:
        out = generate(model_chunks, [prompts_ids[i] for i in mine], max_new_tokens, seed_indices=mine, **kwargs)
        lps = out.logprobs or [None] * len(mine)
        local = {i: (t, lp, f) for i, t, lp, f in zip(mine, out.tokens, lps, out.finished)}
    gathered: list = [local]
    if dp > 1:
        gathered = [None] * dp
        dist.all_gather_object(gathered, local, group=ps.get_data_parallel_group())
    n = len(prompts_ids)
    tokens, lps, fin = [[] for _ in range(n)], [[] for _ in range(n)], [False] * n
    for part in gathered:
        for i, (t, lp, f) in part.items():
            tokens[i], lps[i], fin[i] = t, lp, f
    return GenerationOutput(tokens, lps if kwargs.get("return_logprobs") else None, fin)


__all__ = ["generate", "generate_data_parallel", "GenerationOutput", "choose_next", "PromptUniforms", "top_p_filter",
           "micro_batch_layout", "add_generation_args", "ENDOFTURN_ID", "PAD_ID"]
