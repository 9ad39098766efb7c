"""PPO with every model on the actor's ranks, in its layout (`--placement colocated`): `LocalPeers` keeps the
critic (its own optimizer, stepped right after each actor step; built by loop.setup_model, which neither reseeds
nor draws from the process RNG, so set-up order does not matter), the frozen reference and reward model here.
--async-rollouts: a thread samples the next rollouts on a weight snapshot while the learner trains
(rollout.AsyncRollouts bounds the staleness); it runs no collectives, hence TP = PP = 1, and on resume its queue
refills from the resumed weights (correct, not bit-identical).
"""

from __future__ import annotations

import time

from hcx_megatron.rlhf.ppo_actor import CriticTask, Peers, Schedule
from hcx_megatron.rlhf.ppo_models import (build_reference, critic_config, critic_init, reference_logprobs,
                                          reward_scores, rollout_producer, rollout_settings, sequences_micro)
from hcx_megatron.rlhf.rollout import AsyncRollouts, Rollout, finalize
from hcx_megatron.training.checkpoint import save_checkpoint
from hcx_megatron.training.loop import TrainContext, setup_model, start_of_run, train_step


class LocalPeers(Peers):
    """Critic, reference and reward model in the actor's process."""

    def __init__(self, opts, schedule: Schedule, sft_checkpoint: str | None):
        self.opts, self.schedule, self.sft = opts, schedule, sft_checkpoint
        self.critic_task = self.critic = self.actor = None  # start() builds them
        self.reference = self.scorer = self.producer = self.settings = None
        self.async_rollouts: AsyncRollouts | None = None

    def start(self, ctx: TrainContext, tokenizer, prompts, first_rollout: int) -> None:
        from hcx_megatron.rlhf.reward import RewardScorer

        o, cfg, device = self.opts, ctx.cfg, ctx.device
        self.actor = ctx
        self.critic_task = CriticTask(o.value_clip_range, cfg)
        critic_cfg = critic_config(cfg, o)
        self.critic = setup_model(critic_cfg, self.critic_task, device,
                                  start_of_run(critic_cfg, critic_init(o, self.sft)))
        self.reference = build_reference(cfg, device, self.sft)
        self.scorer = RewardScorer.load(o.rm_checkpoint, cfg, device, o.reward_clip) if o.rm_checkpoint else None
        self.settings = rollout_settings(cfg, o, tokenizer)
        self.producer = rollout_producer(self.settings, prompts, o, device)
        if o.async_rollouts:  # the thread samples with a frozen copy of the actor, loaded at each publish
            self.async_rollouts = AsyncRollouts(self._sample, build_reference(cfg, device, None), first_rollout,
                                                self.schedule.total_rollouts, o.max_staleness)
            self.async_rollouts.publish(ctx.chunks, first_rollout)
            self.async_rollouts.start()

    def _sample(self, r: int, policy_chunks, version: int) -> Rollout:
        """Generate rollout r with `policy_chunks` and score it with the frozen models (the producer thread's
        work in async mode)."""
        ro = self.producer.produce(r, policy_chunks, version)
        micro = sequences_micro(ro, self.settings.micro_batch)
        ref = reference_logprobs(self.reference, micro, self.settings)
        score = reward_scores(self.scorer, micro) if self.scorer is not None else None
        # None off the last pipeline stage, whose fields stay zero
        ro.ref_logp = ro.ref_logp if ref is None else ref
        ro.score = ro.score if score is None else score
        return ro

    def rollout(self, r: int, kl_coef: float) -> Rollout:
        raw = self.async_rollouts.get(r) if self.async_rollouts is not None else self._sample(r, self.actor.chunks, r)
        start, s = time.time(), self.settings
        ro = finalize(raw, self.critic.chunks, s.micro_batch, kl_coef, s.gamma, s.lam, s.kl_kind)
        ro.exchange_seconds = time.time() - start
        return ro

    def critic_step(self, k: int, ro: Rollout) -> dict[str, float]:
        stats, _, _ = train_step(self.critic, self.critic_task, self.schedule.batches(ro, k, CriticTask.fields))
        return {key: stats[key] for key in ("value_loss", "value_clip_frac")}

    def rollout_done(self, ctx: TrainContext, r: int) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.publish(ctx.chunks, r + 1)

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        c = self.critic
        save_checkpoint(c.cfg.checkpoint.save, iteration, c.chunks, c.optimizer, c.scheduler, c.cfg.to_dict())

    def close(self) -> None:
        if self.async_rollouts is not None:
            self.async_rollouts.stop()


__all__ = ["LocalPeers"]
