"""PPO's own flags as one typed, frozen value (like SFT's `SFTOptions` and the reward model's `RMOptions`).

The flags themselves are declared by `add_ppo_args` (hcx_megatron/rlhf/ppo.py) and the placement flags by
hcx_megatron/rlhf/placement.py; this module only turns the parsed namespace into `PPOOptions`. Where the actor
and reference start from is not here: `--sft-checkpoint` is an alias of the shared `--pretrained-checkpoint`
(cfg.checkpoint.pretrained_checkpoint, used by the loop's one start-of-run rule, hcx_megatron/training/loop.py).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class PPOOptions:
    prompt_data: str
    rm_checkpoint: str | None = None  # frozen reward model; also the critic's initialisation
    rule_reward: str | None = None  # synthetic rule reward instead of a reward model, e.g. "share:7-7"
    reward_clip: float | None = None  # None: the reward model's stored clip
    rollout_batch_size: int = 16
    ppo_epochs: int = 2
    ppo_rollouts: int | None = None  # sets --train-iters when given
    max_new_tokens: int = 64
    generation_kv_cache: bool = True
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    stop_ids: tuple[int, ...] | None = None
    init_kl_coef: float = 0.04
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    kl_estimator: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    critic_lr: float | None = None  # None: --lr
    unlikelihood_weight: float = 0.0
    repetition_ngram: int = 2
    async_rollouts: bool = False
    max_staleness: int = 1


def ppo_options_from_args(ns: argparse.Namespace) -> PPOOptions:
    stop_ids = getattr(ns, "stop_ids", None)
    return PPOOptions(
        prompt_data=ns.prompt_data, rm_checkpoint=ns.rm_checkpoint, rule_reward=ns.rule_reward,
        reward_clip=ns.reward_clip, rollout_batch_size=ns.rollout_batch_size, ppo_epochs=ns.ppo_epochs,
        ppo_rollouts=ns.ppo_rollouts, max_new_tokens=ns.max_new_tokens, generation_kv_cache=ns.generation_kv_cache,
        rollout_temperature=ns.rollout_temperature, rollout_top_p=ns.rollout_top_p,
        stop_ids=tuple(stop_ids) if stop_ids is not None else None, init_kl_coef=ns.init_kl_coef,
        adaptive_kl=ns.adaptive_kl, kl_target=ns.kl_target, kl_horizon=ns.kl_horizon, kl_estimator=ns.kl_estimator,
        gamma=ns.gamma, lam=ns.lam, clip_range=ns.clip_range, value_clip_range=ns.value_clip_range,
        critic_lr=ns.critic_lr, unlikelihood_weight=ns.unlikelihood_weight, repetition_ngram=ns.repetition_ngram,
        async_rollouts=ns.async_rollouts, max_staleness=ns.max_staleness,
    )


__all__ = ["PPOOptions", "ppo_options_from_args"]
