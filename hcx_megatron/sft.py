"""Supervised fine-tuning driver: `python -m hcx_megatron.sft` (console script `hcx-sft`).

A Task for the shared training loop (hcx_megatron/training/loop.py): chat JSONL in the HCX format
(hcx_megatron/data/chat.py), loss on assistant tokens only, length-grouped token-budget micro-batches,
optional packing, a validation split, and an optional greedy-generation exact-match eval after training.

    torchrun --nproc-per-node 2 -m hcx_megatron.sft --device cpu --tensor-model-parallel-size 2 \
        --tokenizer-model TOK --data-path train.jsonl --valid-data-path valid.jsonl \
        --pretrained-checkpoint runs/pretrain/ckpt --load runs/sft/ckpt --save runs/sft/ckpt --seq-length 512 \
        --sft-tokens-per-microbatch 4096 --micro-batch-size 1 --global-batch-size 8 --train-iters 1000 --lr 1e-5

Steps and batches: each optimizer step takes GBS / (MBS x DP) micro-batches on every DP rank (Megatron's
count, so every pipeline stage of a replica runs the same number). Without --sft-tokens-per-microbatch a
micro-batch holds --micro-batch-size conversations; with it, as many length-grouped conversations (or packed
rows) as fit the padded-token budget. Loss is a per-token average over all assistant tokens of the step,
across micro-batches and DP ranks (megatron-core calculate_per_token_loss with (sum, count) losses).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config, parse_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.config.options import add_options, option, options_from_args
from hcx_megatron.config.sequence import context_parallel_chunks, sequence_multiple_for
from hcx_megatron.data.context_parallel import packed_batch_for_transformer_engine, slice_batch_for_context_parallel
from hcx_megatron.inference.generate import add_generation_args
from hcx_megatron.data.sft_dataset import (
    TRUNCATION_RULES, BatchingConfig, Conversation, DataReport, MicroBatchPlan, SFTDataError, block_causal_mask,
    collate, read_conversations, real_tokens, split_fractions, split_train_valid,
)
from hcx_megatron.distributed.env import world_size_from_env
from hcx_megatron.training.loop import StepBatches, TaskBase, TaskSetup, TrainContext, main_wrapper, run


@dataclass(frozen=True)
class SFTOptions:
    """SFT's own flags, defined once (config/options.py makes the argparse group and this typed value)."""

    tokens_per_microbatch: int | None = option(
        None, "padded-token budget of a micro-batch (length-grouped batching); default: --micro-batch-size "
              "conversations per micro-batch", flag="--sft-tokens-per-microbatch")
    packing: bool = option(False, "pack conversations into rows of --seq-length with per-document positions and "
                                  "attention", flag="--sft-packing")
    truncation: str = option("drop_oldest_turns", "what to do with a conversation longer than --seq-length tokens",
                             flag="--sft-truncation", choices=TRUNCATION_RULES)
    strict: bool = option(False, "fail on the first bad conversation instead of counting and skipping it",
                          flag="--sft-strict", aliases=("--strict",))
    pad_to_multiple_of: int = option(8, flag="--sft-pad-to-multiple-of")
    data_report: str | None = option(None, "write the data report (counts, file:line of rejects) as JSON",
                                     flag="--sft-data-report")
    gen_eval_data: str | None = option(None, "chat JSONL; after training, greedy-generate the last assistant turn "
                                             "of each line and report exact match")
    gen_eval_output: str | None = option(None, "JSON file for the generation eval (rank 0)")
    gen_max_new_tokens: int = option(64)
    generation_kv_cache: bool = option(True, elsewhere=True)  # add_generation_args


def add_sft_args(parser) -> None:
    g = parser.add_argument_group("sft")
    add_options(g, SFTOptions)
    add_generation_args(g)


def check_sft_config(cfg: Config, opts: SFTOptions) -> None:
    """SFT-specific flag checks; raise ValueError naming the flags (before any process starts)."""
    d, t = cfg.data, cfg.training
    if d.mock_data:
        raise ValueError("SFT reads chat JSONL: give --data-path FILE.jsonl [...] instead of --mock-data")
    if not d.data_path:
        raise ValueError("SFT needs --data-path FILE.jsonl [...] (chat JSONL)")
    if not d.tokenizer_model:
        raise ValueError("SFT needs --tokenizer-model (the chat format uses its special tokens)")
    for flag, paths in (("--data-path", d.data_path), ("--valid-data-path", d.valid_data_path)):
        for p in paths:
            try:
                float(p)
            except ValueError:
                continue
            raise ValueError(f"{flag}: {p!r} looks like a blend weight; SFT takes a plain list of JSONL files")
    if d.dataloader != "torch" or d.num_workers:
        # The loaders of hcx_megatron/data/loaders.py serve fixed-shape pretraining samples; SFT micro-batches are
        # planned per step (token budget, length grouping, packing) and built in the training process.
        raise ValueError(f"--dataloader {d.dataloader} --num-workers {d.num_workers}: SFT builds its micro-batches "
                         "in the training process; these flags apply to pretraining only (use --dataloader torch "
                         "--num-workers 0)")
    if opts.pad_to_multiple_of < 1:
        raise ValueError("--sft-pad-to-multiple-of must be >= 1")
    if opts.tokens_per_microbatch is not None and opts.tokens_per_microbatch < t.seq_length:
        raise ValueError(f"--sft-tokens-per-microbatch ({opts.tokens_per_microbatch}) must be >= --seq-length "
                         f"({t.seq_length}) so that the longest allowed conversation fits a micro-batch")
    if opts.gen_max_new_tokens < 1:
        raise ValueError("--gen-max-new-tokens must be >= 1")
    cp = cfg.parallel.context_parallel_size
    if opts.gen_eval_data and cp > 1:
        raise ValueError(f"--gen-eval-data with --context-parallel-size {cp}: generation runs the whole sequence "
                         "on each rank (CP 1); evaluate the saved checkpoint at CP 1 instead")
    if opts.packing and cp > 1:
        from hcx_megatron.model.spec import transformer_engine_import_error

        error = transformer_engine_import_error()
        if error is not None or cfg.runtime.transformer_impl == "local":
            raise ValueError(f"--sft-packing with --context-parallel-size {cp} needs Transformer Engine attention "
                             "(THD ring attention over cu_seqlens_padded); "
                             + (f"Transformer Engine does not import here ({error})" if error is not None
                                else "drop --transformer-impl local"))


def sft_pad_multiple(cfg: Config, opts: SFTOptions) -> int:
    """What every SFT row is padded to a multiple of: --sft-pad-to-multiple-of (kernel-friendly widths) and the
    layout's sequence rule (SP/CP splits, FP8 GEMMs; hcx_megatron/config/sequence.py)."""
    return math.lcm(opts.pad_to_multiple_of, sequence_multiple_for(cfg))


def sft_loss_func(loss_mask: torch.Tensor, user_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses on assistant targets and their count (megatron-core divides by the global
    count). The user-token loss is reported from detached values: it never reaches the gradient."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    count = mask.sum()
    umask = user_mask.float().view(-1)
    user_sum = torch.sum(losses.detach() * umask)
    return loss_sum, count.to(torch.int), {
        "lm loss": torch.stack([loss_sum.detach(), count]),
        "user loss": torch.stack([user_sum, umask.sum()]),
    }


class SFTTask(TaskBase):
    metric_keys = ["lm loss", "user loss"]

    def __init__(self, opts: SFTOptions):
        self.opts = opts
        self.cfg: Config | None = None
        self.device = "cpu"
        self.impl = "local"
        self.tokenizer = None
        self.train: list[Conversation] = []
        self.valid: list[Conversation] = []
        self.report: DataReport | None = None
        self._valid_steps: list[StepBatches] | None = None

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, cfg: Config, device: str) -> TaskSetup:
        from hcx_megatron.model.spec import select_layer_spec
        from hcx_megatron.pretrain import load_run_tokenizer, run_vocab_size

        self.cfg, self.device = cfg, device
        _, self.impl = select_layer_spec(cfg.runtime.transformer_impl, device)
        self.tokenizer = load_run_tokenizer(cfg)
        t, o = cfg.training, self.opts
        rank0 = dist.get_rank() == 0
        # Every rank reads and renders the data (deterministic), so no broadcast is needed.
        convs, report = read_conversations(cfg.data.data_path, self.tokenizer, t.seq_length, o.truncation, o.strict)
        if cfg.data.valid_data_path:
            valid, vreport = read_conversations(cfg.data.valid_data_path, self.tokenizer, t.seq_length, o.truncation,
                                                o.strict, flag="--valid-data-path")
            self.train, self.valid = convs, valid
        else:
            valid_fraction, _ = split_fractions(cfg.data.split)
            tr, va = split_train_valid(len(convs), valid_fraction, t.seed)
            self.train, self.valid = [convs[i] for i in tr], [convs[i] for i in va]
            vreport = None
        self.report = report
        if rank0:
            print("[sft] train data: " + report.summary(), flush=True)
            if vreport is not None:
                print("[sft] valid data: " + vreport.summary(), flush=True)
            print(f"[sft] {len(self.train)} train / {len(self.valid)} valid conversations", flush=True)
            if o.data_report:
                os.makedirs(os.path.dirname(os.path.abspath(o.data_report)), exist_ok=True)
                with open(o.data_report, "w", encoding="utf-8") as f:
                    json.dump({"train": report.to_dict(), "valid": vreport.to_dict() if vreport else None,
                               "num_train": len(self.train), "num_valid": len(self.valid)}, f, indent=2)
        if not self.train:
            raise SFTDataError(f"--data-path {cfg.data.data_path}: no usable training conversation\n{report.summary()}")
        self.pad_multiple = pad = sft_pad_multiple(cfg, o)
        batching = BatchingConfig(seq_length=t.seq_length, max_tokens=o.tokens_per_microbatch,
                                  rows_per_batch=t.micro_batch_size, pad_multiple=pad, packing=o.packing, seed=t.seed,
                                  document_multiple=context_parallel_chunks(cfg.parallel.context_parallel_size))
        self.train_plan = MicroBatchPlan([c.input_length for c in self.train], batching)
        self.valid_plan = MicroBatchPlan([c.input_length for c in self.valid], batching, shuffle=False) \
            if self.valid else None
        if rank0:
            print(f"[sft] {self.train_plan.num_batches} train micro-batches per epoch, "
                  f"{cfg.num_microbatches} per step per DP rank", flush=True)
        return TaskSetup(vocab_size=run_vocab_size(cfg, self.tokenizer))

    # -- batches --------------------------------------------------------------------------------------
    def _microbatch(self, convs: list[Conversation], batch) -> dict[str, torch.Tensor]:
        out = collate(convs, batch, self.pad_multiple, packed=self.opts.packing,
                      document_multiple=self.train_plan.config.document_multiple)
        if self.device == "cuda":
            out = {k: v.cuda(non_blocking=True) for k, v in out.items()}
        return out

    def _step(self, convs, plan: MicroBatchPlan, first_global: int, limit: int | None = None) -> StepBatches:
        """Micro-batches [first_global + r*nmb, +nmb) for this DP rank r; `limit` marks the end of a single
        pass (validation): positions past it are filled with a fully masked copy so every rank runs the same
        count."""
        nmb = self.cfg.num_microbatches
        dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        micro, total_tokens = [], 0
        for k in range(dp * nmb):
            g = first_global + k
            if limit is not None and g >= limit:
                continue
            total_tokens += real_tokens(convs, plan.batch(g))
        for m in range(nmb):
            g = first_global + r * nmb + m
            if limit is not None and g >= limit:
                mb = self._microbatch(convs, plan.batch(0))
                mb["loss_mask"].zero_()
                mb["user_mask"].zero_()
            else:
                mb = self._microbatch(convs, plan.batch(g))
            micro.append(mb)
        seq = max(mb["tokens"].shape[1] for mb in micro)
        rows = max(mb["tokens"].shape[0] for mb in micro)
        return StepBatches(micro, seq, rows, total_tokens)

    def train_batches(self, iteration: int) -> StepBatches:
        per_step = ps.get_data_parallel_world_size() * self.cfg.num_microbatches
        return self._step(self.train, self.train_plan, iteration * per_step)

    def eval_batches(self, eval_index: int) -> list[StepBatches]:
        """The whole validation split, at most --eval-iters steps of it, the same at every eval."""
        if self.valid_plan is None:
            return []
        if self._valid_steps is None:
            per_step = ps.get_data_parallel_world_size() * self.cfg.num_microbatches
            n = self.valid_plan.num_batches
            steps = min(self.cfg.training.eval_iters, -(-n // per_step))
            self._valid_steps = [self._step(self.valid, self.valid_plan, k * per_step, limit=n) for k in range(steps)]
        return self._valid_steps

    # -- model ----------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        if "cu_seqlens" in batch and self.impl == "transformer_engine":
            # Packed rows as one THD sequence, documents delimited by cu_seqlens; this CP rank's share.
            batch, params = packed_batch_for_transformer_engine(batch)
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                           packed_seq_params=params)
        else:
            batch = slice_batch_for_context_parallel(batch)
            # Packed rows on the local spec (CP 1 there): the block-causal mask of this micro-batch only, built
            # where the batch lives; [b, 1, s, s] is too large to keep for every micro-batch of a step.
            mask = block_causal_mask(batch["document_ids"]) if "document_ids" in batch else None
            output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, partial(sft_loss_func, batch["loss_mask"], batch["user_mask"])

    # -- checkpoint extra state -----------------------------------------------------------------------
    def state_dict(self):
        return {"sft": {"num_train": len(self.train), "num_valid": len(self.valid)}}

    def load_state_dict(self, state):
        saved = (state or {}).get("sft") or {}
        if saved and saved.get("num_train") != len(self.train) and dist.get_rank() == 0:
            print(f"[sft] warning: resuming with {len(self.train)} training conversations; the checkpoint was "
                  f"written with {saved.get('num_train')}: the data order after resume differs", flush=True)

    # -- generation eval ------------------------------------------------------------------------------
    def after_train(self, ctx: TrainContext, code: int) -> None:
        if code == 0:  # not when preempted: the requeued run evaluates at its end
            self.generation_eval(ctx)

    def generation_eval(self, ctx: TrainContext) -> dict | None:
        o = self.opts
        if not o.gen_eval_data:
            return None
        result = run_generation_eval(ctx.chunks, self.tokenizer, o.gen_eval_data, o.gen_max_new_tokens,
                                     self.cfg.training.seq_length, kv_cache=o.generation_kv_cache)
        record = {"kind": "gen_eval", "iteration": ctx.iteration, "exact_match": result["exact_match"],
                  "num_prompts": result["num_prompts"]}
        ctx.writer.write(record)
        if dist.get_rank() == 0:
            print(f"[sft] generation eval: exact match {result['exact_match']:.3f} on {result['num_prompts']} prompts",
                  flush=True)
            if o.gen_eval_output:
                os.makedirs(os.path.dirname(os.path.abspath(o.gen_eval_output)), exist_ok=True)
                with open(o.gen_eval_output, "w", encoding="utf-8") as f:
                    json.dump({"iteration": ctx.iteration, **result}, f, indent=2, ensure_ascii=False)
        return result


def run_generation_eval(chunks, tokenizer, path: str, max_new_tokens: int, max_length: int,
                        kv_cache: bool = True) -> dict:
    """Greedy-generate the last assistant turn of every conversation in `path`; exact match of the stripped
    text. Prompts are split across DP replicas. kv_cache: see `generate`."""
    from hcx_megatron.data.chat import (generation_stop_and_pad_ids, prompt_ids, response_text,
                                        split_prompt_and_reference)
    from hcx_megatron.data.sft_dataset import parse_conversation_line
    from hcx_megatron.data.jsonl import iter_lines
    from hcx_megatron.inference.generate import generate_data_parallel
    from hcx_megatron.model.builder import sync_params_before_read

    prompts, refs, texts = [], [], []
    for lineno, raw in iter_lines(path):
        try:
            messages = parse_conversation_line(raw)
            context, ref = split_prompt_and_reference(messages)
        except ValueError as e:
            raise SFTDataError(f"--gen-eval-data {path}:{lineno}: {e}") from None
        prompts.append(prompt_ids(tokenizer, context))
        refs.append(ref)
        texts.append(context[-1]["content"] if context else "")
    # Gather the last step's shards here, on every DP rank: a DP rank left without prompts runs no forward,
    # so the pre-hooks' gather in the others' forward would wait for it forever.
    sync_params_before_read(chunks)
    stop_ids, pad_id = generation_stop_and_pad_ids(tokenizer)
    out = generate_data_parallel(chunks, prompts, max_new_tokens, temperature=0.0, vocab_size=tokenizer.vocab_size,
                                 max_seq_length=max_length, kv_cache=kv_cache, stop_ids=stop_ids, pad_id=pad_id)
    answers = [response_text(tokenizer, t) for t in out.tokens]
    hits = [a.strip() == r.strip() for a, r in zip(answers, refs)]
    samples = [{"prompt": p, "reference": r, "answer": a, "match": h}
               for p, r, a, h in list(zip(texts, refs, answers, hits))[:50]]
    return {"exact_match": sum(hits) / max(1, len(hits)), "num_prompts": len(hits), "num_correct": sum(hits),
            "samples": samples}


def main(argv=None) -> int:
    cfg, ns = parse_config(argv, extra_args=add_sft_args, description="HCX supervised fine-tuning on megatron-core",
                           world_size=world_size_from_env())
    opts = options_from_args(ns, SFTOptions)
    try:
        check_sft_config(cfg, opts)
    except ValueError as e:
        raise SystemExit(f"hcx-sft: error: {e}") from None
    # Micro-batches differ in length: pipeline p2p must exchange shapes first.
    cfg.training.variable_seq_lengths = True
    return run(freeze(cfg), SFTTask(opts))


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["SFTTask", "SFTOptions", "sft_loss_func", "add_sft_args", "check_sft_config", "run_generation_eval",
           "main"]
