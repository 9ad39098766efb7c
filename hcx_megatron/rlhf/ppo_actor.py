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
from hcx_megatron.training import signals
from hcx_megatron.training.loop import StepBatches, TaskBase, TaskSetup, TrainContext


# ---------------------------------------------------------------------------------------------------------
# the step schedule shared by actor and critic
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    steps_per_rollout: int  # --ppo-epochs x minibatches per epoch
    minibatches_per_epoch: int  # --rollout-batch-size / --global-batch-size
    total_rollouts: int
    seed: int
    micro_batch: int

    def rollout_of(self, step: int) -> int:
        return step // self.steps_per_rollout

    def first_rollout(self, iteration: int) -> int:
        """The first rollout a run resumed at `iteration` samples (a half-trained one comes from its buffer)."""
        return -(-iteration // self.steps_per_rollout)

    def batches(self, ro: Rollout, k: int, fields: dict[str, torch.Tensor]) -> StepBatches:
        """Optimizer step k's share of this rank's rollout rows: PPO epoch (k mod spr) // mpe visits the rows in a
        permutation seeded by (seed, rollout, epoch), minibatch m takes its m-th slice."""
        epoch, m = divmod(k % self.steps_per_rollout, self.minibatches_per_epoch)
        n = ro.tokens.shape[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + ro.index * 101 + epoch)
        per = n // self.minibatches_per_epoch
        rows = torch.randperm(n, generator=g)[m * per: (m + 1) * per].to(ro.tokens.device)
        batch = {name: t.index_select(0, rows) for name, t in fields.items()}
        length = batch["tokens"].shape[1]
        return StepBatches(split_micro(batch, self.micro_batch), length, self.micro_batch,
                           rows.numel() * length * ps.get_data_parallel_world_size())


def critic_fields(ro: Rollout) -> dict[str, torch.Tensor]:
    return {"tokens": ro.tokens, "position_ids": ro.position_ids, "mask": ro.mask, "old_values": ro.values,
            "returns": ro.returns}


def actor_fields(ro: Rollout) -> dict[str, torch.Tensor]:
    return {"tokens": ro.tokens, "position_ids": ro.position_ids, "labels": ro.labels, "mask": ro.mask,
            "old_logp": ro.old_logp, "advantages": ro.advantages, "ul_negative": ro.ul_negative}


def _global_means(pairs: dict[str, tuple[float, float]], device: str) -> dict[str, float]:
    """{name: (sum, count)} -> global sum/count. Callers contribute only on the last pipeline stage; TP replicas
    repeat both numbers, which leaves the ratio unchanged."""
    keys = list(pairs)
    t = torch.tensor([[pairs[k][0], pairs[k][1]] for k in keys], dtype=torch.float64,
                     device="cuda" if device == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: (t[i, 0] / t[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


# ---------------------------------------------------------------------------------------------------------
# a half-trained rollout, saved with the checkpoint (a save in the middle of a PPO iteration)
# ---------------------------------------------------------------------------------------------------------
class RolloutBuffer:
    """Checkpointable: each rank's rollout rows and step statistics when a checkpoint falls in the middle of a
    PPO iteration, `<root>/ppo_rollouts/iter_N/<role>_rank_R.pt` (root: the model's save / load root). The
    loop saves it before its tracker commit, so a complete checkpoint implies its buffer."""

    def __init__(self, role: str, owner, schedule: Schedule):
        self.name = f"{role}_rollout_buffer"
        self.role, self.owner, self.schedule = role, owner, schedule
        self.save_root: str | None = None
        self.load_root: str | None = None
        self.device = "cpu"

    def roots(self, save: str | None, load: str | None) -> None:
        self.save_root, self.load_root = save, load

    def _path(self, root: str, iteration: int) -> str:
        return os.path.join(root, "ppo_rollouts", f"iter_{iteration:07d}",
                            f"{self.role}_rank_{dist.get_rank():05d}.pt")

    def save(self, ckpt_tmp_dir: str | None, iteration: int) -> None:
        ro = self.owner.rollout
        if iteration % self.schedule.steps_per_rollout == 0 or ro is None:
            return
        path = self._path(self.save_root, iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"rollout": ro.to_state(), "acc": self.owner.acc}, path + ".tmp")
        os.replace(path + ".tmp", path)  # never a partial buffer under the final name
        dist.barrier()  # every rank's buffer is written before the checkpoint commits

    def load(self, ckpt_dir: str | None, iteration: int) -> None:
        if iteration % self.schedule.steps_per_rollout == 0:
            return
        path = self._path(self.load_root, iteration)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the checkpoint was saved in the middle of a PPO iteration but this "
                                    "rank's rollout buffer is missing (resume needs the same world size and "
                                    "placement)")
        state = torch.load(path, weights_only=False)
        ro = Rollout.from_state(state["rollout"])
        if self.device == "cuda":
            for k, v in ro.__dict__.items():
                if torch.is_tensor(v):
                    setattr(ro, k, v.cuda())
        self.owner.rollout, self.owner.acc = ro, state["acc"]


# ---------------------------------------------------------------------------------------------------------
# the critic's loss (a value head); who steps it depends on the placement
# ---------------------------------------------------------------------------------------------------------
class CriticTask(TaskBase):
    """Per-token value head with the clipped value loss. Built with the actor's vocabulary (`vocab_source`: the
    actor's config, or its partition's); starts from the reward model or the SFT backbone (ppo_models.critic_init),
    whose value head is new."""

    metric_keys = ["lm loss", "value loss", "value clip frac"]
    new_parameters = ("value_head.",)

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
            loss, clipped = pm.clipped_value_loss(out.float(), b["old_values"], b["returns"], m, self.clip)
            s, n = loss.sum(), m.sum()
            stat = torch.stack([s.detach(), n])
            return s, n.to(torch.int), {"lm loss": stat, "value loss": stat,
                                        "value clip frac": torch.stack([clipped.sum(), n])}

        return values, loss_func


# ---------------------------------------------------------------------------------------------------------
# where the other models live
# ---------------------------------------------------------------------------------------------------------
class Peers:
    """The critic, reference, reward model and (async) sampler as the actor sees them; no-op defaults."""

    def start(self, ctx: TrainContext, tokenizer, prompts: list[list[int]], first_rollout: int) -> None:
        """The actor is built and started (resumed, initialised or seeded): build or reach the other models;
        training starts at rollout `first_rollout`."""

    def rollout(self, r: int, kl_coef: float) -> Rollout:
        """Rollout r sampled, scored by reference and reward, with the critic's advantages and KL."""
        raise NotImplementedError

    def critic_step(self, k: int, ro: Rollout) -> dict[str, float]:
        """After the actor's optimizer step k: the critic's step statistics, if it trains here."""
        return {}

    def rollout_stats(self, r: int) -> dict[str, float]:
        """At the end of rollout r: statistics of a critic that trained elsewhere."""
        return {}

    def rollout_done(self, ctx: TrainContext, r: int) -> None:
        """The actor finished rollout r (async: weights version r + 1 exists)."""

    def agree_stop(self, preempted: bool) -> bool:
        return preempted

    def checkpointables(self) -> list:
        return []

    def finish(self, iteration: int, code: int) -> None:
        """Training returned `code` (0, or 17 when preempted): release the other models."""

    def close(self) -> None:
        """Always, also on error: stop threads."""


# ---------------------------------------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------------------------------------
class PPOActorTask(TaskBase):
    """The policy's Task: PPO-clip loss plus unlikelihood on its rollouts; per-rollout logging; KL control."""

    metric_keys = ["lm loss", "pg loss", "ul loss", "clip frac", "approx kl"]

    def __init__(self, opts, schedule: Schedule, peers: Peers, placement):
        self.opts, self.schedule, self.peers = opts, schedule, peers
        self.placement = placement  # hcx_megatron.rlhf.placement.Placement, for the run's first line and log
        self.kl = pm.KLController(opts.init_kl_coef, opts.adaptive_kl, opts.kl_target, opts.kl_horizon)
        self.rollout: Rollout | None = None
        self.acc: dict[str, list[float]] = {}  # per-step statistics of the current rollout
        self.buffer = RolloutBuffer("actor", self, schedule)
        self.tokenizer = None
        self.prompts: list[list[int]] = []
        self.vocab_size = 0
        self.device = "cpu"
        self.ctx: TrainContext | None = None
        self.returned: int | None = None  # the loop's exit code once training returned (0, or 17 preempted)
        self._last_rollout_end = time.time()

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, cfg: Config, device: str) -> TaskSetup:
        run_cfg, self.tokenizer = with_run_vocabulary(cfg)
        self.vocab_size = run_cfg.model.vocab_size
        self.prompts = read_prompts(self.opts.prompt_data, self.tokenizer)
        bad = [i for i, p in enumerate(self.prompts) if max(p) >= self.vocab_size]
        if bad:
            raise ValueError(f"{self.opts.prompt_data}: prompt {bad[0] + 1} has ids >= vocabulary size "
                             f"{self.vocab_size}")
        self.device = self.buffer.device = device
        self.buffer.roots(cfg.checkpoint.save, cfg.checkpoint.load)
        return TaskSetup(vocab_size=self.vocab_size)

    def checkpointables(self) -> list:
        return [self.buffer, *self.peers.checkpointables()]

    def before_train(self, ctx: TrainContext) -> None:
        self.ctx = ctx
        self.peers.start(ctx, self.tokenizer, self.prompts, self.schedule.first_rollout(ctx.iteration))
        s, p = self.opts, self.placement
        ctx.writer.write({"kind": "event", "event": "placement", "mode": p.mode,
                          "roles": {k: vars(v) for k, v in p.roles.items()}, "iteration": ctx.iteration})
        if rank0():
            print(f"[ppo] placement: {p.describe(ctx.cfg)}; {self.schedule.steps_per_rollout} optimizer steps "
                  f"per PPO iteration; "
                  + (f"async rollouts, max staleness {s.max_staleness}" if s.async_rollouts else "sync rollouts"),
                  flush=True)

    # -- rollouts -------------------------------------------------------------------------------------
    def train_batches(self, iteration: int) -> StepBatches:
        r = self.schedule.rollout_of(iteration)
        if self.rollout is None or self.rollout.index != r:
            self.rollout, self.acc = self.peers.rollout(r, self.kl.value), {}
        return self.schedule.batches(self.rollout, iteration, actor_fields(self.rollout))

    # -- loss -----------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        b = next(data_iterator)
        logits = model(b["tokens"], b["position_ids"], None)
        return logits, lambda out: self._loss(b, out)

    def _loss(self, b, logits):
        a = self.opts
        # Same temperature as sampling: the ratio compares the distributions the tokens were drawn from.
        logp = token_logprobs(scaled_logits(logits, a.rollout_temperature, self.vocab_size), b["labels"])
        m = b["mask"]
        terms = pm.clipped_policy_loss(logp, b["old_logp"], b["advantages"], m, a.clip_range)
        ul = pm.unlikelihood_loss(logp, b["ul_negative"] * m) if a.unlikelihood_weight > 0 else torch.zeros_like(logp)
        total = terms.loss + a.unlikelihood_weight * ul
        s, n = total.sum(), m.sum()
        return s, n.to(torch.int), {
            "lm loss": torch.stack([s.detach(), n]),
            "pg loss": torch.stack([terms.loss.sum().detach(), n]),
            "ul loss": torch.stack([ul.sum().detach(), n]),
            "clip frac": torch.stack([terms.clipped.sum(), n]),
            "approx kl": torch.stack([terms.approx_kl.sum(), n]),
        }

    # -- per step: the critic's step, per-rollout logging ---------------------------------------------
    def on_step(self, ctx: TrainContext, record: dict) -> None:
        for key in ("pg_loss", "clip_frac", "approx_kl", "ul_loss", "tokens_per_sec"):
            self.acc.setdefault(key, []).append(record[key])
        for key, value in self.peers.critic_step(ctx.iteration - 1, self.rollout).items():
            self.acc.setdefault(key, []).append(value)
        if ctx.iteration % self.schedule.steps_per_rollout == 0:
            for key, value in self.peers.rollout_stats(self.rollout.index).items():
                self.acc[key] = [value]
            self._log_rollout(ctx)
            self.peers.rollout_done(ctx, self.rollout.index)

    def agree_stop(self, preempted: bool) -> bool:
        stop = self.peers.agree_stop(preempted)
        if stop:
            self.returned = signals.EXIT_CODE_PREEMPTED  # the loop saves and returns it
        return stop

    def _log_rollout(self, ctx: TrainContext) -> None:
        ro = self.rollout
        w = 1.0 if ps.is_pipeline_last_stage(ignore_virtual=True) else 0.0
        m = ro.mask
        seq_kl = (ro.kl * m).sum(dim=1)
        n = float(ro.tokens.shape[0])
        g = _global_means({
            "reward_mean": (w * float(ro.score.sum()), w * n),
            "kl": (w * float(seq_kl.sum()), w * n),
            "kl_per_token": (w * float((ro.kl * m).sum()), w * float(m.sum())),
            "entropy": (w * float((ro.entropy * m).sum()), w * float(m.sum())),
            "response_length": (w * float(ro.response_length.sum()), w * n),
            "repetition": (w * float(ro.repetition.sum()), w * n),
            "gen_tokens": (w * float(ro.response_length.sum()), w),  # per replica, summed below
        }, self.device)
        gen_tokens = g.pop("gen_tokens") * ps.get_data_parallel_world_size()
        staleness = ro.index - ro.version
        record = {"kind": "ppo", "iteration": ctx.iteration, "rollout": ro.index + 1, **g,
                  "kl_coef": self.kl.value, "staleness": staleness,
                  "max_staleness": self.opts.max_staleness if self.opts.async_rollouts else 0,
                  "rollout_seconds": ro.gen_seconds,
                  "rollout_tokens_per_sec": gen_tokens / max(ro.gen_seconds, 1e-9),
                  "exchange_seconds": ro.exchange_seconds,
                  **{k: sum(v) / len(v) for k, v in self.acc.items()}}
        record["train_tokens_per_sec"] = record.pop("tokens_per_sec", 0.0)
        now = time.time()  # wall time of the whole PPO iteration (the first one includes start-up)
        record["iteration_seconds"] = now - self._last_rollout_end
        self._last_rollout_end = now
        ctx.writer.write(record)
        if rank0():
            print(f"[ppo] rollout {ro.index + 1} | reward {g['reward_mean']:.4f} | kl {g['kl']:.4f} "
                  f"(coef {self.kl.value:.4f}) | entropy {g['entropy']:.3f} | clip {record['clip_frac']:.3f} | "
                  f"value loss {record['value_loss']:.4f} | len {g['response_length']:.1f} | "
                  f"rep {g['repetition']:.3f} | staleness {staleness} | "
                  f"{record['rollout_tokens_per_sec']:.0f} gen tok/s", flush=True)
        self.kl.update(g["kl"], int(n * ps.get_data_parallel_world_size()))

    # -- checkpoint (pure: the rollout buffer and the critic are checkpointables the loop saves) ---------
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

    def after_train(self, ctx: TrainContext) -> None:
        self.returned = 0

    def close(self) -> None:
        """Always called by the loop. Once training returned (after_train; or the partitions agreed to stop,
        after which the loop saves and returns 17), release the other models."""
        try:
            if self.returned is not None:
                self.peers.finish(self.ctx.iteration, self.returned)
        finally:
            self.peers.close()


__all__ = ["Schedule", "CriticTask", "PPOActorTask", "Peers", "RolloutBuffer", "critic_fields", "actor_fields"]
