"""PPO with every model on its own rank partition, each with its own TP/PP (`--placement separate`): the actor's
`PartitionPeers`, the critic partition's Task, the frozen reference / reward partitions and the async sampler.
Partitions (placement.py sizes them, distributed/partition.py builds them) are independent megatron worlds whose
leaders exchange whole rollout batches; each data-parallel rank takes its rows, so partitions may differ in DP.
Every send has its receive at a known point (gloo sends return once received): no queue, nothing dropped.

docs/rlhf.md ("Placement", "Asynchronous rollouts") draws one PPO iteration's messages, the async sampler's
weights schedule (a pure function of v0, --max-staleness and the rollout count, so actor and critic know which
rollouts are in flight at a stop and drain them), the critic's save beside the actor's commit, and preemption.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config, resolve_device
from hcx_megatron.distributed.partition import Partition, init_partitions, layout_blocks
from hcx_megatron.distributed.weight_transfer import WeightSender, receive_weights
from hcx_megatron.rlhf.ppo_actor import CriticTask, Peers, RolloutTask, Schedule
from hcx_megatron.rlhf.ppo_models import (build_reference, read_prompts, reference_logprobs, reward_scores,
                                          rollout_producer, rollout_settings, sequences_micro, with_run_vocabulary)
from hcx_megatron.rlhf.rollout import (Rollout, RolloutProducer, RolloutSettings, assemble_rows, dp_rows,
                                       finalize, take_rows)
from hcx_megatron.training import signals
from hcx_megatron.training.loop import TaskSetup

TAG_SEQ, TAG_REF, TAG_SCORE, TAG_KL, TAG_ADV, TAG_STATS, TAG_VOTE, TAG_SAVED, TAG_WEIGHTS = range(1, 10)

# What the sampler sends for every row of a rollout batch.
SAMPLE_FIELDS = ("tokens", "labels", "mask", "old_logp", "entropy", "ul_negative", "response_length",
                 "repetition", "lengths", "score")


# ---------------------------------------------------------------------------------------------------------
# the async schedule, and moving messages and rows between partitions
# ---------------------------------------------------------------------------------------------------------
def async_in_flight(v0: int, first: int, consumed: int, completed: int, total: int, staleness: int) -> range:
    """Rollouts the async sampler has sent or will send before it next waits for weights, that the learner has
    not consumed: at a stop the actor and critic drain them. v0 = weights version the sampler started from,
    first = its first rollout, consumed = rollouts the learner has taken (one may be half trained),
    completed = rollouts fully trained (the actor publishes version v after rollout v-1 while v + s < total)."""
    v_last = max(v0, min(completed, total - staleness - 1))
    return range(max(consumed, first), min(total - 1, v_last + staleness) + 1)


def _drain(part: Partition, sources: list[tuple[str, int]], schedule: Schedule, start_iteration: int,
           iteration: int, staleness: int) -> None:
    """Take (and drop) what `sources` sent about the async rollouts in flight when a learner that started at
    `start_iteration` returned at `iteration` (async_in_flight)."""
    spr = schedule.steps_per_rollout
    if part.is_leader:
        for _ in async_in_flight(start_iteration // spr, schedule.first_rollout(start_iteration), -(-iteration // spr),
                                 iteration // spr, schedule.total_rollouts, staleness):
            for src, tag in sources:
                if part.has(src):
                    part.recv(src, tag)


def sampler_version(r: int, v0: int, staleness: int) -> int:
    """The weights version the async sampler uses for rollout r."""
    return max(v0, r - staleness)


def _recv(part: Partition, src: str, tag: int, r: int | None = None) -> Any:
    """Partition.hear, checked (with `r`) to be about rollout r."""
    msg = part.hear(src, tag)
    if r is not None and msg["index"] != r:
        raise RuntimeError(f"{part.name}: expected rollout {r} from the {src} (tag {tag}), got {msg['index']}")
    return msg


def gather_batch(part: Partition, n: int, fields: dict[str, torch.Tensor] | None,
                 pad: dict[str, float] | None = None) -> dict[str, torch.Tensor] | None:
    """The whole batch on the leader from each DP replica's reporting rank (`fields` = this rank's rows). One rank
    per data-parallel replica reports model outputs: the last pipeline stage's TP (and CP) rank 0."""
    reports = (fields is not None and ps.is_pipeline_last_stage(ignore_virtual=True)
               and ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0)
    rows = dp_rows(n, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    got = part.gather((rows, {k: v.detach().cpu() for k, v in fields.items()}) if reports else None)
    return assemble_rows([g for g in got if g is not None], n, pad) if part.is_leader else None


def local_rows(batch: dict[str, torch.Tensor], multiple: int, device: str) -> dict[str, torch.Tensor]:
    """This DP rank's rows of a whole batch (padded as it pads its own rows), on the device."""
    rows = dp_rows(batch["lengths"].shape[0], ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    return {k: v.to(device) for k, v in take_rows(batch, rows, multiple).items()}


def rollout_from(msg: dict, s: RolloutSettings, device: str) -> Rollout:
    """The rollout a sampler's message describes (index, weights version, sampling time, the whole batch): this
    DP rank's rows."""
    rows = local_rows(msg["batch"], s.seq_multiple, device)
    return Rollout(index=msg["index"], version=msg["version"], gen_seconds=msg["gen_seconds"],
                   ref_logp=rows.get("ref_logp", torch.zeros_like(rows["mask"])),
                   **{name: rows[name] for name in SAMPLE_FIELDS})


def sample_and_send(part: Partition, producer: RolloutProducer, chunks, r: int, version: int) -> Rollout:
    """Sample rollout r on this partition (each DP rank its rows) and send the whole batch to the frozen partitions
    first (they start their forward passes while the critic still waits for them), the critic, and the actor
    unless it is the sampler."""
    raw = producer.produce(r, chunks, version)
    s = producer.s
    consumers = [name for name in ("reference", "reward", "critic", "actor") if part.has(name) and name != part.name]
    full = gather_batch(part, s.rollout_batch, {f: getattr(raw, f) for f in SAMPLE_FIELDS},
                        pad={"tokens": s.pad_id, "labels": s.pad_id})
    part.tell(consumers, TAG_SEQ, {"index": r, "version": version, "gen_seconds": raw.gen_seconds, "batch": full,
                                   "preempt": signals.any_rank_received(producer.device)})
    return raw


def _stop_frozen(part: Partition, code: int) -> int:
    part.tell([name for name in ("reference", "reward") if part.has(name)], TAG_SEQ, {"stop": code})
    return code


# ---------------------------------------------------------------------------------------------------------
# the actor's side: its Peers
# ---------------------------------------------------------------------------------------------------------
class PartitionPeers(Peers):
    """The critic, reference, reward (and async rollout) partitions, seen from the actor partition."""

    def __init__(self, part: Partition, opts, schedule, weight_transfer: str | None, weights_dir: str | None):
        self.part, self.opts, self.schedule = part, opts, schedule
        self.staleness = opts.max_staleness if opts.async_rollouts else None  # None: sync (the actor samples)
        self.weights = None if self.staleness is None else WeightSender(part, "rollout", weight_transfer,
                                                                        weights_dir, TAG_WEIGHTS)
        self.producer = self.settings = self.ctx = None  # start() makes them

    def start(self, ctx, tokenizer, prompts, first_rollout: int) -> None:
        self.ctx, self.start_iteration = ctx, ctx.iteration
        self.settings = rollout_settings(ctx.cfg, self.opts, tokenizer)
        if self.staleness is None:  # sync: the actor samples (a rule reward is scored where the tokens are)
            self.producer = rollout_producer(self.settings, prompts, self.opts, ctx.device)
        else:
            self._publish(ctx.iteration // self.schedule.steps_per_rollout, first=first_rollout)

    def _publish(self, version: int, **header) -> None:
        # The sampler has loaded every version below v - s by the time the actor publishes v (it sampled rollout
        # v - 1 with version v - 1 - s or later).
        self.weights.publish(self.ctx.chunks, version, keep_from=version - self.staleness, **header)

    def rollout(self, r: int, kl_coef: float) -> Rollout:
        part, s = self.part, self.settings
        ro = (sample_and_send(part, self.producer, self.ctx.chunks, r, r) if self.staleness is None
              else rollout_from(_recv(part, "rollout", TAG_SEQ, r), s, self.ctx.device))
        start = time.time()
        part.tell(["critic"], TAG_KL, {"index": r, "kl_coef": kl_coef})
        got = local_rows(_recv(part, "critic", TAG_ADV, r)["batch"], s.seq_multiple, self.ctx.device)
        ro.advantages, ro.kl, ro.score = got["advantages"], got["kl"], got["score"]
        ro.kl_coef, ro.exchange_seconds = kl_coef, time.time() - start
        return ro

    def critic_step(self, k: int, ro: Rollout) -> dict[str, float]:
        last = (k + 1) % self.schedule.steps_per_rollout == 0  # the critic reports after its last step
        return _recv(self.part, "critic", TAG_STATS, ro.index)["stats"] if last else {}

    def rollout_done(self, ctx, r: int) -> None:
        if self.staleness is not None and r + 1 + self.staleness < self.schedule.total_rollouts:
            self._publish(r + 1)

    def agree_stop(self, preempted: bool) -> bool:
        return self.part.vote("critic", TAG_VOTE, preempted, send_first=True)

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        """The critic partition saves the same iteration in parallel; wait for its report."""
        if self.part.is_leader and (got := self.part.recv("critic", TAG_SAVED)) != iteration:
            raise RuntimeError(f"actor: the critic saved iteration {got}, the actor is saving {iteration}")

    def finish(self, iteration: int, code: int) -> None:
        """Release the other partitions: drain what the async sampler already sent, then stop it (it stops the
        frozen partitions), or stop the frozen partitions directly; then wait for the whole job."""
        if self.staleness is None:
            _stop_frozen(self.part, code)
        else:
            _drain(self.part, [("rollout", TAG_SEQ)], self.schedule, self.start_iteration, iteration, self.staleness)
            self.weights.stop(code)
        self.part.job_barrier()


# ---------------------------------------------------------------------------------------------------------
# the critic partition
# ---------------------------------------------------------------------------------------------------------
class CriticPartitionTask(CriticTask, RolloutTask):
    """The critic's own training loop (the shared loop, like the actor's): at each rollout it takes the sampled
    batch, the reference log-probs, the scores and the actor's KL coefficient, computes values, GAE and
    whitened advantages for the actor, then trains on its own minibatches step for step with the actor."""

    def __init__(self, opts, part: Partition, schedule: Schedule, role_cfg: Config):
        CriticTask.__init__(self, opts.value_clip_range, role_cfg)
        RolloutTask.__init__(self, schedule)
        self.opts, self.part = opts, part
        self.sampler = "rollout" if part.has("rollout") else "actor"
        self.settings = None
        self._signalled = False  # a frozen partition or the sampler reported a signal

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        vocab_cfg, tokenizer = with_run_vocabulary(self.vocab_source)
        self.settings = rollout_settings(vocab_cfg, self.opts, tokenizer)
        self.device = device
        return TaskSetup(vocab_size=vocab_cfg.model.vocab_size)

    def before_train(self, ctx) -> None:
        super().before_train(ctx)
        ctx.writer.label = "[critic] "

    def fetch(self, r: int) -> Rollout:
        part, s = self.part, self.settings
        seq = _recv(part, self.sampler, TAG_SEQ, r)
        ref = _recv(part, "reference", TAG_REF, r)
        score = _recv(part, "reward", TAG_SCORE, r) if part.has("reward") else {}
        kl_coef = _recv(part, "actor", TAG_KL, r)["kl_coef"]
        self._signalled |= bool(seq["preempt"] or ref["preempt"] or score.get("preempt"))
        batch = dict(seq["batch"], ref_logp=ref["ref_logp"], **({"score": score["score"]} if score else {}))
        ro = finalize(rollout_from(dict(seq, batch=batch), s, self.device), self.ctx.chunks, s.micro_batch, kl_coef,
                      s.gamma, s.lam, s.kl_kind)
        full = gather_batch(part, s.rollout_batch, {"advantages": ro.advantages, "kl": ro.kl})
        if part.is_leader:
            full.update(score=batch["score"], lengths=batch["lengths"])
            part.send("actor", TAG_ADV, {"index": r, "batch": full})
        return ro

    def on_step(self, ctx, record: dict) -> None:
        self.accumulate({key: record[key] for key in ("value_loss", "value_clip_frac")})
        if ctx.iteration % self.schedule.steps_per_rollout == 0:
            self.part.tell(["actor"], TAG_STATS, {"index": self.rollout.index, "stats": self.means()})

    def agree_stop(self, preempted: bool) -> bool:
        return self.part.vote("actor", TAG_VOTE, preempted or self._signalled, send_first=False)

    def after_save(self, ctx) -> None:
        self.part.tell(["actor"], TAG_SAVED, ctx.iteration)

    def after_train(self, ctx, code: int) -> None:
        """Take (and drop) the rollouts the async sampler and the frozen partitions already sent; then wait for
        the whole job."""
        if self.sampler == "rollout":
            _drain(self.part, [("rollout", TAG_SEQ), ("reference", TAG_REF), ("reward", TAG_SCORE)], self.schedule,
                   self.start_iteration, ctx.iteration, self.opts.max_staleness)
        self.part.job_barrier()


# ---------------------------------------------------------------------------------------------------------
# the partitions that train nothing: reference log-probs, reward-model scores, the async sampler
# ---------------------------------------------------------------------------------------------------------
def serve_frozen(part: Partition, s: RolloutSettings, device: str, model) -> int:
    """The reference or reward partition: answer every rollout batch the sampler sends until it says stop;
    returns the job's exit code. `model`: the reference's chunks, or the reward model's RewardScorer."""
    role = part.name
    tag, name = (TAG_REF, "ref_logp") if role == "reference" else (TAG_SCORE, "score")
    served = 0
    while "stop" not in (msg := _recv(part, "rollout" if part.has("rollout") else "actor", TAG_SEQ)):
        micro = sequences_micro(rollout_from(msg, s, device), s.micro_batch)
        out = reference_logprobs(model, micro, s) if role == "reference" else reward_scores(model, micro)
        flag = signals.any_rank_received(device)
        full = gather_batch(part, s.rollout_batch, None if out is None else {name: out})
        if part.is_leader:
            part.send("critic", tag, {"index": msg["index"], name: full[name], "preempt": flag})
        served += 1
    if part.is_leader:
        print(f"[ppo:{role}] served {served} rollouts; stopping", flush=True)
    return int(msg["stop"])


def run_sampler(part: Partition, producer: RolloutProducer, chunks, total_rollouts: int, staleness: int,
                transfer: str) -> int:
    """Sample rollouts with the actor's weights of version max(v0, r - s) until the actor says stop (after the
    last rollout, or earlier); returns the job's exit code."""
    v0 = r = None
    while "stop" not in (header := receive_weights(part, "actor", transfer, chunks, TAG_WEIGHTS)):
        version = int(header["version"])
        if v0 is None:
            v0, r = version, int(header["first"])
        elif r == total_rollouts or version != sampler_version(r, v0, staleness):
            raise RuntimeError(f"rollout partition: got weights version {version} for rollout {r} of "
                               f"{total_rollouts} (v0 {v0}, max staleness {staleness})")
        while r < total_rollouts and sampler_version(r, v0, staleness) <= version:
            sample_and_send(part, producer, chunks, r, version)
            r += 1
    return _stop_frozen(part, int(header["stop"]))


# ---------------------------------------------------------------------------------------------------------
# one process's role
# ---------------------------------------------------------------------------------------------------------
def start_partition(cfg: Config, placement):
    """Cut the launcher's world into the placement's partitions; returns this process's Partition."""
    from hcx_megatron.distributed.env import resolve_dist_env

    blocks = layout_blocks([(name, r.ranks) for name, r in placement.roles.items()])
    backend = "gloo" if resolve_device(cfg.runtime.device) == "cpu" else "nccl"
    return init_partitions(resolve_dist_env(), blocks, backend,
                           datetime.timedelta(minutes=cfg.runtime.distributed_timeout_minutes))


def serve_role(part: Partition, rcfg: Config, opts, schedule: Schedule, transfer: str | None,
               sft_checkpoint: str | None) -> int:
    """A partition that trains nothing: reference, reward, or the async sampler. Returns the exit code."""
    from hcx_megatron.distributed.initialize import initialize_distributed, shutdown

    device = resolve_device(rcfg.runtime.device)
    initialize_distributed(rcfg)
    signals.install_handlers()  # a signal is reported to the critic with the next answer, never fatal here
    cfg, tokenizer = with_run_vocabulary(rcfg)
    settings = rollout_settings(cfg, opts, tokenizer)
    if part.name == "rollout":  # the async sampler, a copy of the actor whose weights arrive before it samples
        producer = rollout_producer(settings, read_prompts(opts.prompt_data, tokenizer), opts, device)
        code = run_sampler(part, producer, build_reference(cfg, device, None), schedule.total_rollouts,
                           opts.max_staleness, transfer)
    else:
        from hcx_megatron.rlhf.reward import RewardScorer

        model = (RewardScorer.load(opts.rm_checkpoint, cfg, device, opts.reward_clip) if part.name == "reward"
                 else build_reference(cfg, device, sft_checkpoint))
        code = serve_frozen(part, settings, device, model)
    part.job_barrier()
    shutdown()
    return code


__all__ = ["PartitionPeers", "CriticPartitionTask", "serve_frozen", "run_sampler", "serve_role", "start_partition",
           "async_in_flight", "sampler_version", "gather_batch", "local_rows", "SAMPLE_FIELDS"]
