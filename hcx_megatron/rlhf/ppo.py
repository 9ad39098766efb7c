"""PPO driver: `python -m hcx_megatron.rlhf.ppo` (console script `hcx-ppo`).

Four models: actor (init from --sft-checkpoint, trained through the shared loop), critic (init from
--rm-checkpoint, per-token value head, trained with the shared loop's train_step and its own optimizer),
reference (frozen copy of the SFT weights) and reward (frozen reward model with its stored calibration,
normalised and clipped; or a --rule-reward for synthetic runs).

Placement (hcx_megatron/rlhf/placement.py): --placement separate puts each model on its own rank partition with
its own TP/PP (hcx_megatron/rlhf/ppo_separate.py runs those roles); colocated puts all four on the same ranks
with the run's one layout (this module); auto (default) separates them when the world holds them.

One PPO iteration = one rollout batch (--rollout-batch-size prompts) followed by --ppo-epochs passes over it in
minibatches of --global-batch-size sequences; every minibatch is one optimizer step of the actor (a loop
iteration) and of the critic. So --train-iters = rollouts x ppo-epochs x rollout-batch / global-batch
(--ppo-rollouts N sets it).

Checkpoints: the actor in --save (plain GPTModel, same format as pretraining, so the conversion tool exports
it), the critic in --save/critic at the same iteration, written from the actor task's state_dict() right
before the actor's own save (the actor tracker is written last, so a complete actor checkpoint implies its
critic). A save in the middle of a PPO iteration also stores each rank's rollout buffer
(--save/ppo_rollouts/iter_N/rank_R.pt). In synchronous mode resuming reproduces the uninterrupted run.
--async-rollouts: a background producer samples the next rollouts on a weight snapshot while the learner
trains (see rlhf/rollout.py AsyncRollouts for the staleness bound); on resume its queue is refilled from the
resumed weights, so async runs resume correctly but not bit-identically.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import CheckpointConfig, Config, ConfigError, parse_config, validate_config
from hcx_megatron.config.sequence import sequence_multiple_for
from hcx_megatron.data.chat import generation_stop_and_pad_ids
from hcx_megatron.inference.generate import add_generation_args
from hcx_megatron.model.heads import scalar_head_factory, sequence_scores
from hcx_megatron.pretrain import load_run_tokenizer
from hcx_megatron.rlhf import ppo_math as pm
from hcx_megatron.rlhf.common import (apply_checkpoint_model_shape, freeze, load_model_weights,
                                      rank0, reject_context_parallel, reject_pretraining_loader_flags,
                                      with_data_flag)
from hcx_megatron.rlhf import placement as ppo_placement
from hcx_megatron.rlhf.rollout import (AsyncRollouts, Rollout, RolloutProducer, RolloutSettings, finalize,
                                       forward_collect, scaled_logits, split_micro, token_logprobs)
from hcx_megatron.training.checkpoint import checkpoint_dir, read_latest_iteration, save_checkpoint
from hcx_megatron.training.loop import StepBatches, TrainContext, main_wrapper, setup, train, train_step


def add_ppo_args(parser) -> None:
    g = parser.add_argument_group("ppo")
    g.add_argument("--prompt-data", required=True,
                   help='JSONL of {"prompt": messages | "text"} (chat format) or {"prompt_ids": [...]}')
    g.add_argument("--sft-checkpoint", default=None, help="actor and reference initialisation")
    g.add_argument("--rm-checkpoint", default=None, help="reward model (frozen) and critic initialisation")
    g.add_argument("--rule-reward", default=None,
                   help="synthetic rule reward instead of a reward model, e.g. share:7-7")
    g.add_argument("--reward-clip", type=float, default=None, help="override the reward model's stored clip")
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per PPO iteration (all DP ranks)")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
    g.add_argument("--ppo-rollouts", type=int, default=None, help="number of PPO iterations (sets --train-iters)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    add_generation_args(g)
    g.add_argument("--rollout-temperature", type=float, default=1.0,
                   help="sampling temperature; log-probs for the ratio and KL are computed at the same one")
    g.add_argument("--rollout-top-p", type=float, default=1.0,
                   help="< 1 makes the sampler differ from the temperature-scaled policy the ratio uses")
    g.add_argument("--stop-ids", type=int, nargs="*", default=None,
                   help="default: <|endofturn|> with an HCX tokenizer, eod otherwise")
    g.add_argument("--init-kl-coef", type=float, default=0.04)
    g.add_argument("--adaptive-kl", action="store_true", help="Ziegler et al. adaptive KL controller")
    g.add_argument("--kl-target", type=float, default=6.0)
    g.add_argument("--kl-horizon", type=int, default=10000)
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument("--clip-range", type=float, default=0.2)
    g.add_argument("--value-clip-range", type=float, default=0.2)
    g.add_argument("--critic-lr", type=float, default=None, help="default: --lr")
    g.add_argument("--unlikelihood-weight", type=float, default=0.0,
                   help="sequence-level unlikelihood on repeated n-grams (0 = off)")
    g.add_argument("--repetition-ngram", type=int, default=2)
    g.add_argument("--async-rollouts", action="store_true")
    g.add_argument("--max-staleness", type=int, default=1,
                   help="async: a rollout is sampled at most this many PPO iterations behind the learner")
    g.add_argument("--critic-save", default=None, help="default: SAVE/critic")
    ppo_placement.add_placement_args(parser)


def read_prompts(path: str, tokenizer) -> list[list[int]]:
    from hcx_megatron.data.chat import prompt_ids

    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
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


def stop_and_pad_ids(args, tokenizer) -> tuple[tuple[int, ...], int]:
    """--stop-ids, else the tokenizer's <|endofturn|> (its eod when it has no chat tokens); its pad id."""
    if args.stop_ids is not None:
        return tuple(args.stop_ids), (tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod)
    if hasattr(tokenizer, "endofturn_id"):
        return generation_stop_and_pad_ids(tokenizer)
    return (tokenizer.eod,), (tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod)


def rollout_settings(cfg: Config, args, tokenizer) -> RolloutSettings:
    """Sampling and scoring settings of one model's layout (rows pad to its sequence multiple: SP/CP/FP8)."""
    stop, pad = stop_and_pad_ids(args, tokenizer)
    return RolloutSettings(
        rollout_batch=args.rollout_batch_size, max_new_tokens=args.max_new_tokens,
        temperature=args.rollout_temperature, top_p=args.rollout_top_p, stop_ids=stop,
        vocab_size=cfg.model.vocab_size, pad_id=pad, micro_batch=cfg.training.micro_batch_size,
        seq_multiple=sequence_multiple_for(cfg),
        kl_kind=args.kl_estimator, gamma=args.gamma, lam=args.lam, repetition_ngram=args.repetition_ngram,
        seed=cfg.training.seed, kv_cache=args.generation_kv_cache)


def _global_means(pairs: dict[str, tuple[float, float]], device: str) -> dict[str, float]:
    """{name: (sum, count)} -> global sum/count. Callers contribute only on the last pipeline stage; TP replicas
    repeat both numbers, which leaves the ratio unchanged."""
    keys = list(pairs)
    t = torch.tensor([[pairs[k][0], pairs[k][1]] for k in keys], dtype=torch.float64,
                     device="cuda" if device == "cuda" else "cpu")
    dist.all_reduce(t)
    return {k: (t[i, 0] / t[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


def minibatch(ro: Rollout, k: int, steps_per_rollout: int, minibatches_per_epoch: int, seed: int, mbs: int,
              fields: dict[str, torch.Tensor]) -> StepBatches:
    """Optimizer step k's share of this rank's rollout rows: PPO epoch (k mod spr) // mpe visits the rows in a
    permutation seeded by (seed, rollout, epoch), minibatch m takes its m-th slice."""
    epoch, m = divmod(k % steps_per_rollout, minibatches_per_epoch)
    n = ro.tokens.shape[0]
    g = torch.Generator().manual_seed(seed * 1_000_003 + ro.index * 101 + epoch)
    per = n // minibatches_per_epoch
    rows = torch.randperm(n, generator=g)[m * per: (m + 1) * per].to(ro.tokens.device)
    batch = {name: t.index_select(0, rows) for name, t in fields.items()}
    length = batch["tokens"].shape[1]
    return StepBatches(split_micro(batch, mbs), length, mbs, rows.numel() * length * ps.get_data_parallel_world_size())


def critic_fields(ro: Rollout) -> dict[str, torch.Tensor]:
    return {"tokens": ro.tokens, "position_ids": ro.position_ids, "mask": ro.mask, "old_values": ro.values,
            "returns": ro.returns}


def rollout_file(root: str, iteration: int, role: str = "") -> str:
    """Each rank's rollout buffer of a save in the middle of a PPO iteration (role-prefixed when partitioned)."""
    name = f"{role + '_' if role else ''}rank_{dist.get_rank():05d}.pt"
    return os.path.join(root, "ppo_rollouts", f"iter_{iteration:07d}", name)


def save_mid_rollout(path: str, ro: Rollout, acc: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"rollout": ro.to_state(), "acc": acc}, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a partial buffer under the final name


def load_mid_rollout(path: str, device: str) -> tuple[Rollout, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: the checkpoint was saved in the middle of a PPO iteration but this "
                                "rank's rollout buffer is missing (resume needs the same world size and placement)")
    state = torch.load(path, weights_only=False)
    ro = Rollout.from_state(state["rollout"])
    if device == "cuda":
        for k, v in ro.__dict__.items():
            if torch.is_tensor(v):
                setattr(ro, k, v.cuda())
    return ro, state["acc"]


class CriticTask:
    """Value-head model; its steps are driven by the actor task (same minibatches)."""

    metric_keys = ["lm loss", "value loss", "value clip frac"]

    def __init__(self, clip: float):
        self.clip = clip

    def setup(self, cfg: Config, device: str) -> None:
        load_run_tokenizer(cfg)  # sets the vocabulary size the model is built with

    def model_factory(self, cfg, impl):
        return scalar_head_factory(cfg, impl)

    def train_batches(self, iteration):
        raise RuntimeError("the critic is stepped by the PPO actor task")

    def eval_batches(self, eval_index):
        return []

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

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class PPOActorTask:
    metric_keys = ["lm loss", "pg loss", "ul loss", "clip frac", "approx kl"]

    def __init__(self, args, steps_per_rollout: int, minibatches_per_epoch: int):
        self.args = args
        self.spr, self.mpe = steps_per_rollout, minibatches_per_epoch
        self.rollout: Rollout | None = None
        self.kl = pm.KLController(args.init_kl_coef, args.adaptive_kl, args.kl_target, args.kl_horizon)
        self._pending: dict[str, Any] = {}
        self._acc: dict[str, list[float]] = {}
        self.async_rollouts: AsyncRollouts | None = None
        # Separate placement: the exchange with the critic/reference/reward (and rollout) partitions,
        # hcx_megatron.rlhf.ppo_separate.ActorLink. None when all models share the ranks.
        self.link = None
        self._last_rollout_end = time.time()

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, cfg: Config, device: str) -> None:
        self.cfg, self.device = cfg, device
        self.tokenizer = load_run_tokenizer(cfg)
        self.prompts = read_prompts(self.args.prompt_data, self.tokenizer)
        bad = [i for i, p in enumerate(self.prompts) if max(p) >= cfg.model.vocab_size]
        if bad:
            raise ValueError(f"{self.args.prompt_data}: prompt {bad[0] + 1} has ids >= vocabulary size "
                             f"{cfg.model.vocab_size}")
        self.stop_ids, self.pad_id = stop_and_pad_ids(self.args, self.tokenizer)

    def model_factory(self, cfg, impl):
        return None  # the actor is a plain GPTModel: its checkpoints export like pretraining ones

    def attach(self, ctx: TrainContext, critic_ctx: TrainContext, critic_task: CriticTask,
               producer: RolloutProducer, snapshot_chunks=None) -> None:
        self.ctx, self.critic_ctx, self.critic_task, self.producer = ctx, critic_ctx, critic_task, producer
        if self._pending.get("kl"):
            self.kl.load_state_dict(self._pending["kl"])
        self._restore_mid_rollout(ctx)
        if snapshot_chunks is not None:
            first = ctx.iteration // self.spr + (1 if self.rollout is not None else 0)
            total = self.cfg.training.train_iters // self.spr
            self.async_rollouts = AsyncRollouts(producer, snapshot_chunks, first, total, self.args.max_staleness)
            self.async_rollouts.publish(ctx.chunks, first)
            self.async_rollouts.start()

    def attach_separate(self, ctx: TrainContext, link) -> None:
        """Separate placement: the critic, reference and reward run on other partitions behind `link`."""
        self.ctx, self.link = ctx, link
        if self._pending.get("kl"):
            self.kl.load_state_dict(self._pending["kl"])
        self._restore_mid_rollout(ctx)
        link.start(ctx)

    def _restore_mid_rollout(self, ctx: TrainContext) -> None:
        if self._pending.get("mid_rollout"):
            path = rollout_file(self.cfg.checkpoint.load, ctx.iteration, "actor" if self.link else "")
            self.rollout, self._acc = load_mid_rollout(path, self.device)

    # -- rollouts -------------------------------------------------------------------------------------
    def _ensure_rollout(self, r: int) -> None:
        if self.rollout is not None and self.rollout.index == r:
            return
        if self.link is not None:
            self.rollout, self._acc = self.link.rollout(r, self.kl.value), {}
            return
        if self.async_rollouts is not None:
            raw = self.async_rollouts.get(r)
        else:
            raw = self.producer.produce(r, self.ctx.chunks, version=r)
        a = self.args
        self.rollout = finalize(raw, self.critic_ctx.chunks, self.cfg.training.micro_batch_size, self.kl.value,
                                a.gamma, a.lam, a.kl_estimator)
        self._acc = {}

    def _batches(self, k: int, fields: dict[str, torch.Tensor]) -> StepBatches:
        t = self.cfg.training
        return minibatch(self.rollout, k, self.spr, self.mpe, t.seed, t.micro_batch_size, fields)

    def train_batches(self, iteration: int) -> StepBatches:
        self._ensure_rollout(iteration // self.spr)
        ro = self.rollout
        return self._batches(iteration, {"tokens": ro.tokens, "position_ids": ro.position_ids, "labels": ro.labels,
                                         "mask": ro.mask, "old_logp": ro.old_logp, "advantages": ro.advantages,
                                         "ul_negative": ro.ul_negative})

    def critic_batches(self, iteration: int) -> StepBatches:
        return self._batches(iteration, critic_fields(self.rollout))

    def eval_batches(self, eval_index: int):
        return []

    # -- loss -----------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        b = next(data_iterator)
        logits = model(b["tokens"], b["position_ids"], None)
        return logits, lambda out: self._loss(b, out)

    def _loss(self, b, logits):
        a = self.args
        # Same temperature as sampling: the ratio compares the distributions the tokens were drawn from.
        logp = token_logprobs(scaled_logits(logits, a.rollout_temperature, self.cfg.model.vocab_size), b["labels"])
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

    # -- per step: critic update, per-rollout logging -------------------------------------------------
    def on_step(self, ctx: TrainContext, record: dict) -> None:
        k = ctx.iteration - 1  # the step just taken
        for key in ("pg_loss", "clip_frac", "approx_kl", "ul_loss", "tokens_per_sec"):
            self._acc.setdefault(key, []).append(record[key])
        if self.link is None:
            stats, _, _ = train_step(self.critic_ctx, self.critic_task, self.critic_batches(k))
            for key in ("value_loss", "value_clip_frac"):
                self._acc.setdefault(key, []).append(stats[key])
        if ctx.iteration % self.spr == 0:
            if self.link is not None:  # the critic trained on its own partition, step for step
                for key, value in self.link.critic_stats(self.rollout.index).items():
                    self._acc[key] = [value]
            self._log_rollout(ctx)
            if self.link is not None:
                self.link.rollout_done(ctx, self.rollout.index)

    def agree_stop(self, preempted: bool) -> bool:
        return preempted if self.link is None else self.link.agree_stop(preempted)

    def _log_rollout(self, ctx: TrainContext) -> None:
        ro = self.rollout
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        w = 1.0 if last else 0.0
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
        staleness = (ro.index - ro.version)
        record = {"kind": "ppo", "iteration": ctx.iteration, "rollout": ro.index + 1, **g,
                  "kl_coef": self.kl.value, "staleness": staleness,
                  "max_staleness": self.args.max_staleness if self.args.async_rollouts else 0,
                  "rollout_seconds": ro.gen_seconds,
                  "rollout_tokens_per_sec": gen_tokens / max(ro.gen_seconds, 1e-9),
                  **{k: sum(v) / len(v) for k, v in self._acc.items()}}
        record["train_tokens_per_sec"] = record.pop("tokens_per_sec", 0.0)
        now = time.time()  # wall time of the whole PPO iteration (the first one includes start-up)
        record["iteration_seconds"] = now - self._last_rollout_end
        self._last_rollout_end = now
        if self.link is not None:
            record["exchange_seconds"] = ro.exchange_seconds
        ctx.writer.write(record)
        if rank0():
            print(f"[ppo] rollout {ro.index + 1} | reward {g['reward_mean']:.4f} | kl {g['kl']:.4f} "
                  f"(coef {self.kl.value:.4f}) | entropy {g['entropy']:.3f} | clip {record['clip_frac']:.3f} | "
                  f"value loss {record['value_loss']:.4f} | len {g['response_length']:.1f} | "
                  f"rep {g['repetition']:.3f} | staleness {staleness} | "
                  f"{record['rollout_tokens_per_sec']:.0f} gen tok/s", flush=True)
        self.kl.update(g["kl"], int(n * ps.get_data_parallel_world_size()))
        if self.async_rollouts is not None:
            self.async_rollouts.publish(ctx.chunks, ro.index + 1)

    # -- checkpoint -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Called by the loop right before it saves the actor: save the critic and, mid-iteration, the rollout
        buffer first (the actor's tracker is written last, so a complete actor checkpoint implies both). With
        separate placement the critic saves on its own partition at the same iteration, while the actor writes
        its own data; the actor's tracker waits for it (before_commit)."""
        k = self.ctx.iteration
        if self.link is None and self.critic_root:
            c = self.critic_ctx
            save_checkpoint(self.critic_root, k, c.chunks, c.optimizer, c.scheduler, c.cfg.to_dict())
        mid = k % self.spr != 0 and self.rollout is not None
        if mid:
            save_mid_rollout(rollout_file(self.cfg.checkpoint.save, k, "actor" if self.link else ""),
                             self.rollout, self._acc)
            dist.barrier()
        return {"ppo": {"kl": self.kl.state_dict(), "mid_rollout": mid, "steps_per_rollout": self.spr}}

    def before_commit(self) -> None:
        if self.link is not None:
            self.link.wait_critic_saved(self.ctx.iteration)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ppo = state.get("ppo") or {}
        if ppo and ppo.get("steps_per_rollout") not in (None, self.spr):
            raise ValueError(f"resume: the checkpoint has {ppo['steps_per_rollout']} steps per PPO iteration, this "
                             f"run {self.spr} (--ppo-epochs, --rollout-batch-size, --global-batch-size changed)")
        self._pending = ppo


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def _score_fn(args, scorer, device):
    if args.rule_reward:
        from hcx_megatron.rlhf.synthetic import parse_rule_reward

        rule = parse_rule_reward(args.rule_reward)
        dev = "cuda" if device == "cuda" else "cpu"
        return lambda batch, responses, micro: torch.tensor(rule(responses), dtype=torch.float32, device=dev)

    def rm(batch, responses, micro):
        raw = forward_collect(scorer.chunks, micro, lambda out, b: sequence_scores(out.float(), b["lengths"]))
        return None if raw is None else scorer.calibration.normalise(raw, scorer.clip)

    return rm


def main(argv=None) -> int:
    from hcx_megatron.distributed.initialize import shutdown
    from hcx_megatron.model.builder import build_model
    from hcx_megatron.rlhf.reward import RewardScorer

    argv = with_data_flag(argv)
    # Validated below, per rank partition when the models get their own (the actor's world is then its own).
    cfg, args = parse_config(argv, extra_args=add_ppo_args, description="HCX PPO (RLHF)", validate=False)
    reject_context_parallel(cfg, "hcx-ppo")
    reject_pretraining_loader_flags(cfg, "hcx-ppo")
    if bool(args.rm_checkpoint) == bool(args.rule_reward):
        raise SystemExit("hcx-ppo: give exactly one of --rm-checkpoint or --rule-reward")
    if args.sft_checkpoint or args.rm_checkpoint:
        apply_checkpoint_model_shape(cfg, args.sft_checkpoint or args.rm_checkpoint)
    t = cfg.training
    if args.rollout_batch_size % t.global_batch_size:
        raise SystemExit(f"hcx-ppo: --rollout-batch-size {args.rollout_batch_size} must be a multiple of "
                         f"--global-batch-size {t.global_batch_size}")
    try:
        placement = ppo_placement.plan_placement(args, cfg, cfg.runtime.world_size)
        if placement.mode == "colocated":
            validate_config(cfg)
    except ConfigError as exc:
        raise SystemExit(f"hcx-ppo: {exc}") from None
    dp = cfg.data_parallel_size
    if placement.mode == "colocated" and args.rollout_batch_size % (dp * t.micro_batch_size):
        raise SystemExit(f"hcx-ppo: --rollout-batch-size {args.rollout_batch_size} must be a multiple of "
                         f"data-parallel size {dp} x --micro-batch-size {t.micro_batch_size}")
    p = cfg.parallel
    if (placement.mode == "colocated" and args.async_rollouts
            and (p.tensor_model_parallel_size > 1 or p.pipeline_model_parallel_size > 1)):
        raise SystemExit("hcx-ppo: --async-rollouts with colocated models needs --tensor-model-parallel-size 1 "
                         "and --pipeline-model-parallel-size 1 (the producer thread runs no collectives); "
                         "with --placement separate a rollout partition samples under any layout")
    if args.async_rollouts and args.max_staleness < 1:
        raise SystemExit("hcx-ppo: --max-staleness must be >= 1 with --async-rollouts")
    mpe = args.rollout_batch_size // t.global_batch_size
    spr = args.ppo_epochs * mpe
    if args.ppo_rollouts:
        t.train_iters = args.ppo_rollouts * spr
    elif t.train_iters % spr:
        raise SystemExit(f"hcx-ppo: --train-iters {t.train_iters} is not a whole number of PPO iterations "
                         f"({spr} steps each); use --ppo-rollouts")
    resume = read_latest_iteration(cfg.checkpoint.load) if cfg.checkpoint.load else None
    critic_root = args.critic_save or (os.path.join(cfg.checkpoint.save, "critic") if cfg.checkpoint.save else None)
    if placement.mode == "separate":
        from hcx_megatron.rlhf.ppo_separate import run_separate

        if args.critic_save and not cfg.checkpoint.save:
            raise SystemExit("hcx-ppo: --critic-save needs --save (actor and critic are saved together)")
        return run_separate(cfg, args, placement, spr, mpe, resume, critic_root)

    # Critic first: set-up re-seeds the global RNGs, the actor's set-up then restores its checkpointed ones.
    critic_cfg = copy.deepcopy(cfg)
    critic_cfg.training.lr = args.critic_lr or t.lr
    critic_cfg.training.min_lr = min(t.min_lr, critic_cfg.training.lr)
    critic_load = None
    if resume is not None:
        critic_load = checkpoint_dir(os.path.join(cfg.checkpoint.load, "critic") if not args.critic_save
                                     else args.critic_save, resume)
    critic_cfg.checkpoint = CheckpointConfig(load=critic_load, no_load_rng=True)
    critic_cfg.logging.metrics_jsonl = critic_cfg.logging.tensorboard_dir = None
    critic_task = CriticTask(args.value_clip_range)
    critic_ctx = setup(critic_cfg, critic_task)

    actor_task = PPOActorTask(args, spr, mpe)
    actor_task.critic_root = critic_root
    ctx = setup(cfg, actor_task)
    device = ctx.device
    if resume is None:
        if args.sft_checkpoint:
            load_model_weights(args.sft_checkpoint, ctx.chunks)
            ctx.optimizer.reload_model_params()
        if args.rm_checkpoint:
            load_model_weights(args.rm_checkpoint, critic_ctx.chunks)
        elif args.sft_checkpoint:
            load_model_weights(args.sft_checkpoint, critic_ctx.chunks, allow_missing=("value_head.",))
        critic_ctx.optimizer.reload_model_params()

    ref_chunks = build_model(cfg, device, wrap_ddp=False).chunks
    if args.sft_checkpoint:
        load_model_weights(args.sft_checkpoint, ref_chunks)
    freeze(ref_chunks)  # without an SFT checkpoint: the actor's own seeded initialisation
    scorer = RewardScorer.load(args.rm_checkpoint, cfg, device, args.reward_clip) if args.rm_checkpoint else None
    settings = rollout_settings(cfg, args, actor_task.tokenizer)
    producer = RolloutProducer(settings, actor_task.prompts, ref_chunks, _score_fn(args, scorer, device), device,
                               ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    snapshot = build_model(cfg, device, wrap_ddp=False).chunks if args.async_rollouts else None
    if snapshot is not None:
        freeze(snapshot)
    actor_task.attach(ctx, critic_ctx, critic_task, producer, snapshot)
    if rank0():
        print(f"[ppo] placement: actor, critic, reference and reward on the same {dist.get_world_size()} ranks "
              f"({placement.reason}) "
              f"(TP {cfg.parallel.tensor_model_parallel_size}, PP {cfg.parallel.pipeline_model_parallel_size}, "
              f"DP {dp}); {spr} optimizer steps per PPO iteration; "
              + (f"async rollouts, max staleness {args.max_staleness}" if args.async_rollouts else "sync rollouts"),
              flush=True)
    start = time.time()
    try:
        code = train(ctx, actor_task, on_step=actor_task.on_step)
    finally:
        if actor_task.async_rollouts is not None:
            actor_task.async_rollouts.stop()
        ctx.writer.close()
    if rank0():
        print(f"[ppo] done in {time.time() - start:.1f}s", flush=True)
    dist.barrier()
    shutdown()
    return code


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["PPOActorTask", "CriticTask", "add_ppo_args", "read_prompts", "main"]
