"""PPO's learner, written once for every placement: the actor's Task (trained by the shared loop) and the
critic's loss, against `Peers` — where the critic, the reference, the reward model and (async) the sampler
live. hcx_megatron/rlhf/ppo_colocated.py keeps them in this process, hcx_megatron/rlhf/ppo_separate.py on
their own rank partitions; the actor cannot tell which.

One PPO iteration = one rollout batch followed by --ppo-epochs passes over it in minibatches of
--global-batch-size sequences; every minibatch is one optimizer step of the actor (a loop iteration) and of the
critic (`Schedule`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config
from hcx_megatron.model.heads import scalar_head_factory
from hcx_megatron.rlhf import ppo_math as pm
from hcx_megatron.rlhf.common import rank0
from hcx_megatron.rlhf.ppo_models import read_prompts, with_run_vocabulary
from hcx_megatron.rlhf.rollout import Rollout, scaled_logits, split_micro, token_logprobs
from hcx_megatron.training.loop import StepBatches, TaskBase, TaskSetup, TrainContext, reduce_metrics


@dataclass(frozen=True)
class Schedule:
    """The step schedule actor and critic share."""

    steps_per_rollout: int  # --ppo-epochs x minibatches per epoch
    minibatches_per_epoch: int  # --rollout-batch-size / --global-batch-size
    total_rollouts: int
    seed: int
    micro_batch: int

    def first_rollout(self, iteration: int) -> int:
        """The first rollout a run resumed at `iteration` samples (a half-trained one comes from its buffer)."""
        return -(-iteration // self.steps_per_rollout)

    def batches(self, ro: Rollout, k: int, fields: tuple[str, ...]) -> StepBatches:
        """Optimizer step k's share of this rank's rollout rows: PPO epoch (k mod spr) // mpe visits the rows in a
        permutation seeded by (seed, rollout, epoch), minibatch m takes its m-th slice."""
        epoch, m = divmod(k % self.steps_per_rollout, self.minibatches_per_epoch)
        n = ro.tokens.shape[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ro.index * 101 + epoch)
        per = n // self.minibatches_per_epoch
        rows = torch.randperm(n, generator=g)[m * per: (m + 1) * per].to(ro.tokens.device)
        batch = {name: getattr(ro, name).index_select(0, rows) for name in fields}
        length = batch["tokens"].shape[1]
        return StepBatches(split_micro(batch, self.micro_batch), length, self.micro_batch,
                           rows.numel() * length * ps.get_data_parallel_world_size())


class RolloutTask(TaskBase):
    """What a model that the loop trains on rollouts keeps (the actor; the critic on its own partition): the
    rollout being trained on, fetched once per PPO iteration, and its step statistics. It is its own
    checkpointable, the rollout buffer: a checkpoint in the middle of a PPO iteration holds this rank's rows and
    the iteration's statistics, written into the checkpoint directory before its commit."""

    name = "rollout_buffer"
    fields: tuple[str, ...]  # the rollout fields it trains on

    def __init__(self, schedule: Schedule):
        self.schedule = schedule
        self.rollout: Rollout | None = None
        self.acc: dict[str, list[float]] = {}  # per-step statistics of the current rollout
        self.device = "cpu"
        self.ctx: TrainContext | None = None
        self.start_iteration = 0  # where this run started (a resumed one: the checkpoint's iteration)

    def fetch(self, r: int) -> Rollout:
        """Rollout r, ready to train on."""
        raise NotImplementedError

    def train_batches(self, iteration: int) -> StepBatches:
        r = iteration // self.schedule.steps_per_rollout
        if self.rollout is None or self.rollout.index != r:
            self.rollout, self.acc = self.fetch(r), {}
        return self.schedule.batches(self.rollout, iteration, self.fields)

    def accumulate(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.acc.setdefault(key, []).append(value)

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in self.acc.items()}

    def checkpointables(self) -> list:
        return [self]

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        if iteration % self.schedule.steps_per_rollout and self.rollout is not None:
            torch.save({"rollout": self.rollout.to_state(), "acc": self.acc}, _buffer_path(ckpt_tmp_dir))

    def load(self, ckpt_dir: str, iteration: int) -> None:
        if iteration % self.schedule.steps_per_rollout == 0:
            return  # saved at the end of a PPO iteration: nothing half-trained
        path = _buffer_path(ckpt_dir)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the checkpoint was saved in the middle of a PPO iteration but this "
                                    "rank's rollout buffer is missing (resume needs the same world size and "
                                    "placement)")
        state = torch.load(path, weights_only=False)
        self.rollout, self.acc = Rollout.from_state(state["rollout"], self.device), state["acc"]

    def before_train(self, ctx: TrainContext) -> None:
        self.ctx, self.start_iteration = ctx, ctx.iteration


def _buffer_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, f"ppo_rollout_rank_{dist.get_rank():05d}.pt")


def _stat_pairs(sums: dict[str, torch.Tensor], n: torch.Tensor) -> dict[str, torch.Tensor]:
    """A loss function's {key: [sum, count]}, every key counted over the same `n` tokens."""
    return {key: torch.stack([s.detach(), n]) for key, s in sums.items()}


class CriticTask(TaskBase):
    """The critic's loss: per-token value head, clipped value loss. Built with the actor's vocabulary
    (`vocab_source`: the actor's config, or its partition's); starts from the reward model or the SFT backbone
    (ppo_models.critic_init), whose value head is new."""

    metric_keys = ["lm loss", "value loss", "value clip frac"]
    new_parameters = ("value_head.",)
    fields = ("tokens", "position_ids", "mask", "values", "returns")  # the rollout fields it trains on

    def __init__(self, clip: float, vocab_source: Config):
        self.clip, self.vocab_source = clip, vocab_source

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        return TaskSetup(vocab_size=with_run_vocabulary(self.vocab_source)[0].model.vocab_size)

    def model_factory(self, cfg, impl):
        return scalar_head_factory(cfg, impl)

    def forward_step(self, data_iterator, model):
        b = next(data_iterator)
        values = model(b["tokens"], b["position_ids"], None)

        def loss_func(out):
            m = b["mask"]
            loss, clipped = pm.clipped_value_loss(out.float(), b["values"], b["returns"], m, self.clip)
            s, n = loss.sum(), m.sum()
            return s, n.to(torch.int), _stat_pairs({"lm loss": s, "value loss": s, "value clip frac": clipped.sum()}, n)

        return values, loss_func


class Peers:
    """The critic, reference, reward model and (async) sampler as the actor sees them; no-op defaults. Also the
    actor's checkpointable for its critic: the critic's checkpoint of an iteration exists before the actor's
    commits, so a complete actor checkpoint implies its critic."""

    name = "critic"

    def start(self, ctx: TrainContext, tokenizer, prompts: list[list[int]], first_rollout: int) -> None:
        """The actor is built and started (resumed, initialised or seeded): build or reach the other models;
        training starts at rollout `first_rollout`."""

    def rollout(self, r: int, kl_coef: float) -> Rollout:
        """Rollout r sampled, scored by reference and reward, with the critic's advantages and KL."""
        raise NotImplementedError

    def critic_step(self, k: int, ro: Rollout) -> dict[str, float]:
        """After the actor's optimizer step k: the critic's statistics (of its step when it trains here; of the
        whole rollout after its last step when it trains elsewhere)."""
        return {}

    def rollout_done(self, ctx: TrainContext, r: int) -> None:
        """The actor finished rollout r (async: weights version r + 1 exists)."""

    def agree_stop(self, preempted: bool) -> bool:
        return preempted

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        """The actor's checkpoint of `iteration` is being written: return once the critic's exists."""

    def load(self, ckpt_dir: str, iteration: int) -> None:
        """Nothing: the critic resumes where it is built (ppo_models.critic_config)."""

    def finish(self, iteration: int, code: int) -> None:
        """Training returned `code` (0, or 17 when preempted): release the other models."""

    def close(self) -> None:
        """Always, also on error: stop threads."""


class PPOActorTask(RolloutTask):
    """The policy's Task: PPO-clip loss plus unlikelihood on its rollouts; per-rollout logging; KL control."""

    metric_keys = ["lm loss", "pg loss", "ul loss", "clip frac", "approx kl"]
    fields = ("tokens", "position_ids", "labels", "mask", "old_logp", "advantages", "ul_negative")

    def __init__(self, opts, schedule: Schedule, peers: Peers, placement):
        super().__init__(schedule)
        # placement: hcx_megatron.rlhf.placement.Placement, for the run's first line and log
        self.opts, self.peers, self.placement = opts, peers, placement
        self.kl = pm.KLController(opts.init_kl_coef, opts.adaptive_kl, opts.kl_target, opts.kl_horizon)
        self.tokenizer, self.prompts, self.vocab_size = None, [], 0  # setup()'s
        self._last_rollout_end = time.time()

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        run_cfg, self.tokenizer = with_run_vocabulary(cfg)
        self.vocab_size = run_cfg.model.vocab_size
        self.prompts = read_prompts(self.opts.prompt_data, self.tokenizer)
        bad = [i for i, p in enumerate(self.prompts) if max(p) >= self.vocab_size]
        if bad:
            raise ValueError(f"{self.opts.prompt_data}: prompt {bad[0] + 1} has ids >= vocabulary size "
                             f"{self.vocab_size}")
        self.device = device
        return TaskSetup(vocab_size=self.vocab_size)

    def checkpointables(self) -> list:
        return [self, self.peers]

    def before_train(self, ctx: TrainContext) -> None:
        super().before_train(ctx)
        self.peers.start(ctx, self.tokenizer, self.prompts, self.schedule.first_rollout(ctx.iteration))
        s, p = self.opts, self.placement
        ctx.writer.write({"kind": "event", "event": "placement", "mode": p.mode,
                          "roles": {k: vars(v) for k, v in p.roles.items()}, "iteration": ctx.iteration})
        if rank0():
            mode = f"async rollouts, max staleness {s.max_staleness}" if s.async_rollouts else "sync rollouts"
            print(f"[ppo] placement: {p.describe(ctx.cfg)}; {self.schedule.steps_per_rollout} optimizer steps per PPO "
                  f"iteration; {mode}", flush=True)

    def fetch(self, r: int) -> Rollout:
        return self.peers.rollout(r, self.kl.value)

    def forward_step(self, data_iterator, model):
        b, a = next(data_iterator), self.opts
        logits = model(b["tokens"], b["position_ids"], None)

        def loss_func(out):
            # Same temperature as sampling: the ratio compares the distributions the tokens were drawn from.
            logp = token_logprobs(scaled_logits(out, a.rollout_temperature, self.vocab_size), b["labels"])
            m = b["mask"]
            terms = pm.clipped_policy_loss(logp, b["old_logp"], b["advantages"], m, a.clip_range)
            ul = (pm.unlikelihood_loss(logp, b["ul_negative"] * m) if a.unlikelihood_weight > 0
                  else torch.zeros_like(logp))
            s, n = (terms.loss + a.unlikelihood_weight * ul).sum(), m.sum()
            return s, n.to(torch.int), _stat_pairs({"lm loss": s, "pg loss": terms.loss.sum(), "ul loss": ul.sum(),
                                                      "clip frac": terms.clipped.sum(),
                                                      "approx kl": terms.approx_kl.sum()}, n)

        return logits, loss_func

    def on_step(self, ctx: TrainContext, record: dict) -> None:
        """The critic's step; at the end of a PPO iteration its log line."""
        self.accumulate({key: record[key] for key in ("pg_loss", "clip_frac", "approx_kl", "ul_loss")})
        self.accumulate({"train_tokens_per_sec": record["tokens_per_sec"],
                         **self.peers.critic_step(ctx.iteration - 1, self.rollout)})
        if ctx.iteration % self.schedule.steps_per_rollout == 0:
            self._log_rollout(ctx)
            self.peers.rollout_done(ctx, self.rollout.index)

    def agree_stop(self, preempted: bool) -> bool:
        return self.peers.agree_stop(preempted)

    def _log_rollout(self, ctx: TrainContext) -> None:
        ro, m, dp = self.rollout, self.rollout.mask, ps.get_data_parallel_world_size()
        n = float(ro.tokens.shape[0])
        pairs = {  # (sum, count) -> global sum / count; gen_tokens per replica, summed below
            "reward_mean": (ro.score.sum(), n), "kl": ((ro.kl * m).sum(dim=1).sum(), n),
            "kl_per_token": ((ro.kl * m).sum(), m.sum()), "entropy": ((ro.entropy * m).sum(), m.sum()),
            "response_length": (ro.response_length.sum(), n), "repetition": (ro.repetition.sum(), n),
            "gen_tokens": (ro.response_length.sum(), 1.0)}
        w = 1.0 if ps.is_pipeline_last_stage(ignore_virtual=True) else 0.0  # only the last stage contributes
        g = reduce_metrics([{k: torch.tensor((w * float(s), w * float(c)), dtype=torch.float64, device=self.device)
                             for k, (s, c) in pairs.items()}], list(pairs), self.device)
        staleness, gen_tokens = ro.index - ro.version, g.pop("gen_tokens") * dp
        now = time.time()  # wall time of the whole PPO iteration (the first one includes start-up)
        record = {"kind": "ppo", "iteration": ctx.iteration, "rollout": ro.index + 1, **g, "kl_coef": self.kl.value,
                  "staleness": staleness, "max_staleness": self.opts.max_staleness if self.opts.async_rollouts else 0,
                  "rollout_seconds": ro.gen_seconds, "rollout_tokens_per_sec": gen_tokens / max(ro.gen_seconds, 1e-9),
                  "exchange_seconds": ro.exchange_seconds, **self.means(),
                  "iteration_seconds": now - self._last_rollout_end}
        self._last_rollout_end = now
        ctx.writer.write(record)
        if rank0():
            print(f"[ppo] rollout {ro.index + 1} | reward {g['reward_mean']:.4f} | kl {g['kl']:.4f} "
                  f"(coef {self.kl.value:.4f}) | entropy {g['entropy']:.3f} | clip {record['clip_frac']:.3f} | "
                  f"value loss {record['value_loss']:.4f} | len {g['response_length']:.1f} | "
                  f"rep {g['repetition']:.3f} | staleness {staleness} | "
                  f"{record['rollout_tokens_per_sec']:.0f} gen tok/s", flush=True)
        self.kl.update(g["kl"], int(n * dp))

    def state_dict(self) -> dict[str, Any]:
        return {"ppo": {"kl": self.kl.state_dict(), "steps_per_rollout": self.schedule.steps_per_rollout}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ppo = state.get("ppo") or {}
        spr = self.schedule.steps_per_rollout
        if ppo.get("steps_per_rollout") not in (None, spr):
            raise ValueError(f"resume: the checkpoint has {ppo['steps_per_rollout']} steps per PPO iteration, this "
                             f"run {spr} (--ppo-epochs, --rollout-batch-size, --global-batch-size changed)")
        if ppo.get("kl"):
            self.kl.load_state_dict(ppo["kl"])

    def after_train(self, ctx: TrainContext, code: int) -> None:
        self.peers.finish(ctx.iteration, code)

    def close(self) -> None:
        self.peers.close()


__all__ = ["Schedule", "CriticTask", "PPOActorTask", "Peers", "RolloutTask"]
