"""PPO's four models, each defined once for both placements (placement.py): where their weights start, where the
critic's checkpoints live, and the frozen models' outputs. The actor starts from --sft-checkpoint (the loop's
start-of-run rule), the critic from --rm-checkpoint or the SFT backbone with a new value head, the reference is
the frozen SFT weights, the reward the frozen reward model (normalised, clipped) or a --rule-reward.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import CheckpointConfig, Config
from hcx_megatron.config.sequence import sequence_multiple_for
from hcx_megatron.data.chat import generation_stop_and_pad_ids, prompt_ids
from hcx_megatron.rlhf.rollout import (Rollout, RolloutProducer, RolloutSettings, forward_collect, scaled_logits,
                                       split_micro, token_logprobs)
from hcx_megatron.training.checkpoint import checkpoint_dir, load_model_weights, read_latest_iteration


def with_run_vocabulary(cfg: Config) -> tuple[Config, object]:
    """(cfg with the run's vocabulary size, the run's tokenizer); every PPO model is built with the actor's
    vocabulary (hcx_megatron.pretrain.run_vocab_size on the actor's flags)."""
    from hcx_megatron.pretrain import load_run_tokenizer, run_vocab_size

    tokenizer = load_run_tokenizer(cfg)
    vocab = run_vocab_size(cfg, tokenizer)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab)), tokenizer


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    from hcx_megatron.data.jsonl import iter_lines

    out = []
    for lineno, raw in iter_lines(path):
        try:
            obj = json.loads(raw)
            if "prompt_ids" in obj:
                ids = [int(t) for t in obj["prompt_ids"]]
            else:
                p = obj["prompt"]
                ids = prompt_ids(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: expected {{\"prompt\": ...}} or {{\"prompt_ids\": [...]}} "
                             f"({exc})") from None
        if not ids:
            raise ValueError(f"{path}:{lineno}: empty prompt")
        out.append(ids)
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def stop_and_pad_ids(opts, tokenizer) -> tuple[tuple[int, ...], int]:
    """--stop-ids, else the tokenizer's <|endofturn|> (its eod when it has no chat tokens); its pad id."""
    if opts.stop_ids is None and hasattr(tokenizer, "endofturn_id"):
        return generation_stop_and_pad_ids(tokenizer)
    stop = (tokenizer.eod,) if opts.stop_ids is None else tuple(opts.stop_ids)
    return stop, (tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod)


def rollout_settings(cfg: Config, opts, tokenizer) -> RolloutSettings:
    """Sampling and scoring settings of one model's layout (rows pad to its sequence multiple: SP/CP/FP8)."""
    stop, pad = stop_and_pad_ids(opts, tokenizer)
    return RolloutSettings(
        rollout_batch=opts.rollout_batch_size, max_new_tokens=opts.max_new_tokens,
        temperature=opts.rollout_temperature, top_p=opts.rollout_top_p, stop_ids=stop,
        vocab_size=cfg.model.vocab_size, pad_id=pad, micro_batch=cfg.training.micro_batch_size,
        seq_multiple=sequence_multiple_for(cfg),
        kl_kind=opts.kl_estimator, gamma=opts.gamma, lam=opts.lam, repetition_ngram=opts.repetition_ngram,
        seed=cfg.training.seed, kv_cache=opts.generation_kv_cache)


def critic_config(cfg: Config, opts) -> Config:
    """The critic's config in both placements (cfg: the actor's, or its partition's), with the one critic-path
    rule: saves go to `<--save>/critic`; a run that resumes its actor from `--load` resumes the critic from
    `<--load>/critic` at the actor's iteration (the actor commits only after its critic's save, so that one
    exists even when a later critic save completed without its actor). --critic-lr; no metrics files."""
    from hcx_megatron.training.loop import start_of_run

    c = cfg.checkpoint
    save, load = (os.path.join(c.save, "critic") if c.save else None), None
    if start_of_run(cfg).kind == "resume":
        iteration = read_latest_iteration(c.load)
        if iteration is None:
            raise FileNotFoundError(f"--load {c.load}: PPO resumes from a --save root (its critic sits beside the "
                                    "actor's checkpoints), not from one iter_ directory")
        load = checkpoint_dir(os.path.join(c.load, "critic"), iteration)
    lr = opts.critic_lr or cfg.training.lr
    return dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, lr=lr, min_lr=min(cfg.training.min_lr, lr)),
        checkpoint=CheckpointConfig(save=save, load=load, save_interval=c.save_interval, no_load_rng=True),
        logging=dataclasses.replace(cfg.logging, metrics_jsonl=None, tensorboard_dir=None))


def critic_init(opts, sft_checkpoint: str | None):
    """Where a new critic's weights come from: the reward model, or the SFT backbone (its value head is new,
    CriticTask.new_parameters)."""
    from hcx_megatron.training.loop import InitFrom

    if opts.rm_checkpoint:
        return InitFrom(opts.rm_checkpoint, "--rm-checkpoint")
    return InitFrom(sft_checkpoint, "--sft-checkpoint") if sft_checkpoint else None


def build_reference(cfg: Config, device: str, sft_checkpoint: str | None):
    from hcx_megatron.model.builder import build_model
    from hcx_megatron.rlhf.common import freeze

    chunks = build_model(cfg, device, wrap_ddp=False).chunks
    if sft_checkpoint:  # without one: the actor's own seeded initialisation (same seed, any layout)
        load_model_weights(sft_checkpoint, chunks)
    freeze(chunks)
    return chunks


def sequences_micro(ro: Rollout, micro_batch: int) -> list[dict]:
    """A rollout's sequences as the frozen models read them, in micro-batches."""
    return split_micro({"tokens": ro.tokens, "position_ids": ro.position_ids, "labels": ro.labels, "mask": ro.mask,
                        "lengths": ro.lengths}, micro_batch)


def reference_logprobs(chunks, micro: list[dict], s: RolloutSettings) -> torch.Tensor | None:
    """Masked log-probs of the sampled tokens under the reference at the sampling temperature (last stage)."""
    out = forward_collect(chunks, micro, lambda o, b: token_logprobs(
        scaled_logits(o, s.temperature, s.vocab_size), b["labels"]))
    return None if out is None else out * torch.cat([b["mask"] for b in micro])


def reward_scores(scorer, micro: list[dict]) -> torch.Tensor | None:
    """Normalised, clipped reward-model scores of the sequences (last pipeline stage)."""
    from hcx_megatron.model.heads import sequence_scores

    raw = forward_collect(scorer.chunks, micro, lambda o, b: sequence_scores(o.float(), b["lengths"]))
    return None if raw is None else scorer.calibration.normalise(raw, scorer.clip)


def rollout_producer(settings: RolloutSettings, prompts: list[list[int]], opts, device: str) -> RolloutProducer:
    """The sampler of this rank's rows; a --rule-reward scores where the sampled token ids are."""
    score_fn = None
    if opts.rule_reward:
        from hcx_megatron.rlhf.synthetic import parse_rule_reward

        rule = parse_rule_reward(opts.rule_reward)
        score_fn = lambda batch, responses, micro: torch.tensor(rule(responses), dtype=torch.float32,  # noqa: E731
                                                                device=device)
    return RolloutProducer(settings, prompts, score_fn, device, ps.get_data_parallel_rank(),
                           ps.get_data_parallel_world_size())


__all__ = ["with_run_vocabulary", "read_prompts", "stop_and_pad_ids", "rollout_settings", "critic_config",
           "critic_init", "build_reference", "sequences_micro", "reference_logprobs", "reward_scores",
           "rollout_producer"]
