"""PPO with every model on its own rank partition, each with its own TP/PP (`--placement separate`): the
actor's `PartitionPeers` (hcx_megatron/rlhf/ppo_actor.py Peers), the critic partition's Task, the frozen
reference / reward partitions and the async sampler. hcx_megatron/rlhf/ppo.py `run_ppo` gives each process its
role.

Partitions (hcx_megatron/rlhf/placement.py sizes them; hcx_megatron/distributed/partition.py builds them) are
independent megatron worlds. Their leaders exchange whole rollout batches; inside a partition each
data-parallel rank takes its rows (rollout.dp_rows / take_rows), so partitions may differ in DP size.

One PPO iteration r (sync mode; the sampler is the actor):

    sampler   generate rollout r, old log-probs + entropy (+ rule score)  --seq-->  reference, reward, critic
    reference ref log-probs                                               --ref-->  critic
    reward    normalised, clipped RM scores                               --score-> critic
    actor     KL coefficient                                              --kl-->   critic
    critic    values, per-token rewards, GAE, whitening                   --adv-->  actor
    actor, critic  train their --ppo-epochs x minibatches concurrently, agreeing on preemption every step;
    critic    value-loss statistics                                       --stats-> actor (logs the iteration)

--async-rollouts adds a `rollout` partition as the sampler. It samples rollout r with the weights of version
max(v0, r - s) (s = --max-staleness, v = rollouts trained on, v0 = the version it started from), which the
actor hands over after it finishes rollout v - 1: shard to shard (rank j -> rank j) when the rollout partition
mirrors the actor's layout, else as a weights-only dist checkpoint it loads resharded. So the sampler works on
rollouts r+1..r+s while the actor and critic train on r, and every rollout is exactly min(r - v0, s) versions
old (logged as `staleness`). The schedule is a pure function
of (v0, s, rollouts), which is what lets both sides know which messages are still in flight at a stop
(`async_in_flight`).

Every send here has its receive at a known point (gloo sends return once received), so there is no queue to
overflow and nothing is dropped: at a stop the actor and critic drain the rollouts the sampler has already
sent before the frozen partitions are released.

Checkpoints: the actor in --save, the critic in --save/critic at the same iterations (resumed from
--load/critic, ppo_models.critic_config); the critic tells the actor when its save is complete and the actor's
`CriticSaved` checkpointable waits for it, so the actor's tracker is written last. Mid-iteration saves keep each
rank's rollout rows (SAVE/ppo_rollouts/iter_N/actor_rank_R.pt, SAVE/critic/ppo_rollouts/iter_N/critic_rank_R.pt).
Frozen partitions keep no state. Preemption: actor and critic agree every step; the frozen partitions and the sampler report their
signals with their next message, so a signal anywhere stops the job within one PPO iteration.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time
from typing import Any

import torch
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config
from hcx_megatron.distributed.partition import Partition
from hcx_megatron.model.builder import sync_params_before_read, unwrap
from hcx_megatron.rlhf.ppo_actor import CriticTask, Peers, RolloutBuffer, Schedule, critic_fields
from hcx_megatron.rlhf.ppo_models import (build_reference, critic_root, read_prompts, reference_logprobs,
                                          reward_scores, rollout_settings, rule_score_fn, with_run_vocabulary)
from hcx_megatron.rlhf.rollout import (Rollout, RolloutProducer, RolloutSettings, assemble_rows, dp_rows,
                                       finalize, split_micro, take_rows)
from hcx_megatron.training import signals
from hcx_megatron.training.checkpoint import load_model_weights, save_model_weights
from hcx_megatron.training.loop import TaskSetup

TAG_SEQ, TAG_REF, TAG_SCORE, TAG_KL, TAG_ADV, TAG_STATS, TAG_VOTE, TAG_SAVED, TAG_WEIGHTS = range(1, 10)
TAG_WEIGHT_TENSORS = 1000  # + parameter index, on the actor <-> rollout pair groups

# What the sampler sends for every row of a rollout batch.
SAMPLE_FIELDS = ("tokens", "labels", "mask", "old_logp", "entropy", "ul_negative", "response_length",
                 "repetition", "lengths", "score")


# ---------------------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------------------
def async_in_flight(v0: int, first: int, consumed: int, completed: int, total: int, staleness: int) -> range:
    """Rollouts the async sampler has sent or will send before it next waits for weights, that the learner has
    not consumed: at a stop the actor and critic drain them. v0 = weights version the sampler started from,
    first = its first rollout, consumed = rollouts the learner has taken (one may be half trained),
    completed = rollouts fully trained (the actor publishes version v after rollout v-1 while v + s < total)."""
    v_last = max(v0, min(completed, total - staleness - 1))
    last = min(total - 1, v_last + staleness)
    return range(max(consumed, first), last + 1)


def sampler_version(r: int, v0: int, staleness: int) -> int:
    """The weights version the async sampler uses for rollout r."""
    return max(v0, r - staleness)


def _contributes() -> bool:
    """One rank per data-parallel replica reports model outputs: last pipeline stage, TP (and CP) rank 0."""
    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def _fit(t: torch.Tensor, length: int) -> torch.Tensor:
    """[N, L'] -> [N, length]: cut, or zero-pad (columns past a row's length are masked everywhere)."""
    if t.shape[1] >= length:
        return t[:, :length]
    return torch.nn.functional.pad(t, (0, length - t.shape[1]))


def _device(device: str) -> str:
    return "cuda" if device == "cuda" else "cpu"


def gather_batch(part: Partition, n: int, fields: dict[str, torch.Tensor] | None,
                 pad: dict[str, float] | None = None) -> dict[str, torch.Tensor] | None:
    """The whole batch on the leader from each DP replica's reporting rank (`fields` = this rank's rows)."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = None
    if fields is not None and _contributes():
        mine = (dp_rows(n, rank, dp), {k: v.detach().cpu() for k, v in fields.items()})
    got = part.gather(mine)
    if not part.is_leader:
        return None
    return assemble_rows([g for g in got if g is not None], n, pad)


def local_rows(batch: dict[str, torch.Tensor], multiple: int, device: str) -> dict[str, torch.Tensor]:
    """This DP rank's rows of a whole batch, on the device, with position ids."""
    n = batch["tokens"].shape[0]
    mine = take_rows(batch, dp_rows(n, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()), multiple)
    out = {k: v.to(_device(device)) for k, v in mine.items()}
    length = out["tokens"].shape[1]
    out["position_ids"] = torch.arange(length, device=out["tokens"].device).unsqueeze(0).expand(
        out["tokens"].shape[0], length).contiguous()
    return out


def rollout_from_rows(rows: dict[str, torch.Tensor], index: int, version: int, gen_seconds: float) -> Rollout:
    return Rollout(index=index, version=version, tokens=rows["tokens"], labels=rows["labels"], mask=rows["mask"],
                   old_logp=rows["old_logp"], ref_logp=rows.get("ref_logp", torch.zeros_like(rows["mask"])),
                   entropy=rows["entropy"], score=rows["score"], ul_negative=rows["ul_negative"],
                   response_length=rows["response_length"], repetition=rows["repetition"],
                   gen_seconds=gen_seconds, lengths=rows["lengths"])


def _param_list(chunks) -> list[torch.Tensor]:
    return [p for c in chunks for _, p in unwrap(c).named_parameters()]


def prune_weight_versions(root: str, keep_from: int | None) -> None:
    """Remove weights versions below `keep_from` (all with None): the sampler has loaded every version below
    v - s by the time the actor publishes v (it sampled rollout v - 1 with version v - 1 - s or later)."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if name.startswith("v_") and (keep_from is None or int(name[2:].split(".")[0]) < keep_from):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_from is None:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# sampling (the actor in sync mode, the rollout partition in async mode)
# ---------------------------------------------------------------------------------------------------------
def sample_and_send(part: Partition, producer: RolloutProducer, chunks, r: int, version: int,
                    consumers: list[str]) -> Rollout:
    """Sample rollout r on this partition (each DP rank its rows) and send the whole batch to `consumers`."""
    raw = producer.produce(r, chunks, version)
    s = producer.s
    fields = {f: getattr(raw, f) for f in SAMPLE_FIELDS}
    full = gather_batch(part, s.rollout_batch, fields, pad={"tokens": s.pad_id, "labels": s.pad_id})
    preempt = signals.any_rank_received(producer.device)
    if part.is_leader:
        msg = {"index": r, "version": version, "gen_seconds": raw.gen_seconds, "batch": full, "preempt": preempt}
        for dst in consumers:
            part.send(dst, TAG_SEQ, msg)
    return raw


def sampler_consumers(part: Partition, include_actor: bool) -> list[str]:
    # The frozen partitions first: they start their forward passes while the critic still waits for them.
    out = [name for name in ("reference", "reward") if part.has(name)] + ["critic"]
    return out + (["actor"] if include_actor else [])


# ---------------------------------------------------------------------------------------------------------
# the actor's side: its Peers
# ---------------------------------------------------------------------------------------------------------
class CriticSaved:
    """Checkpointable of the actor: the critic saves on its own partition at the same iteration, in parallel
    with the actor; the actor's tracker waits until the critic reports that save complete."""

    name = "critic"

    def __init__(self, part: Partition):
        self.part = part

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        if self.part.is_leader:
            got = self.part.recv("critic", TAG_SAVED)
            if got != iteration:
                raise RuntimeError(f"actor: the critic saved iteration {got}, the actor is saving {iteration}")

    def load(self, ckpt_dir: str, iteration: int) -> None:
        pass  # the critic partition resumes its own checkpoint (ppo_models.critic_resume_dir)


class PartitionPeers(Peers):
    """The critic, reference, reward (and async rollout) partitions, seen from the actor partition."""

    def __init__(self, part: Partition, opts, schedule, weight_transfer: str | None, weights_dir: str | None):
        self.part, self.opts, self.schedule = part, opts, schedule
        self.staleness = opts.max_staleness if opts.async_rollouts else None  # None: sync (the actor samples)
        self.transfer, self.weights_dir = weight_transfer, weights_dir  # async: "p2p" | "checkpoint"
        self.saved = CriticSaved(part)
        self.producer: RolloutProducer | None = None
        self.settings: RolloutSettings | None = None
        self.ctx = None
        self.device = "cpu"
        self.first = self.completed0 = 0
        self._works: list = []
        self._keep: list = []

    def start(self, ctx, tokenizer, prompts, first_rollout: int) -> None:
        self.ctx, self.device = ctx, ctx.device
        self.settings = rollout_settings(ctx.cfg, self.opts, tokenizer)
        if self.staleness is None:  # sync: the actor samples (a rule reward is scored where the tokens are)
            self.producer = RolloutProducer(self.settings, prompts, None, rule_score_fn(self.opts, ctx.device),
                                            ctx.device, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        self.first, self.completed0 = first_rollout, ctx.iteration // self.schedule.steps_per_rollout
        if self.staleness is not None:
            self._publish(self.completed0, first=first_rollout)

    # -- async weights ------------------------------------------------------------------------------------
    def _publish(self, version: int, first: int | None = None) -> None:
        """Hand weights version `version` to the rollout partition without waiting for it (the sampler takes a
        version when it needs it: waiting here would deadlock against its rollout sends)."""
        for w in self._works:
            w.wait()
        self._works = []
        header = {"version": version, "first": first}
        sync_params_before_read(self.ctx.chunks)  # both transfers read the parameters directly
        if self.transfer == "p2p":  # same layout: rank j's shards to rank j
            pair = self.part.pair("rollout")
            self._keep = [p.detach().to("cpu", copy=True) for p in _param_list(self.ctx.chunks)]
            self._works = [pair.send([t], 1, TAG_WEIGHT_TENSORS + i) for i, t in enumerate(self._keep)]
        else:  # another layout: a weights-only dist checkpoint, loaded resharded on the other side
            header["path"] = save_model_weights(os.path.join(self.weights_dir, f"v_{version:07d}"), self.ctx.chunks)
            if self.part.is_leader:
                prune_weight_versions(self.weights_dir, keep_from=version - self.staleness)
        if self.part.is_leader:
            self._works.append(self.part.isend("rollout", TAG_WEIGHTS, header))

    # -- per rollout ----------------------------------------------------------------------------------------
    def rollout(self, r: int, kl_coef: float) -> Rollout:
        part, s = self.part, self.settings
        if self.staleness is not None:
            msg = part.broadcast(part.recv("rollout", TAG_SEQ) if part.is_leader else None)
            if msg["index"] != r:
                raise RuntimeError(f"actor: expected rollout {r} from the rollout partition, got {msg['index']}")
            ro = rollout_from_rows(local_rows(msg["batch"], s.seq_multiple, self.device), r, msg["version"],
                                   msg["gen_seconds"])
        else:
            ro = sample_and_send(part, self.producer, self.ctx.chunks, r, r, sampler_consumers(part, False))
        start = time.time()
        if part.is_leader:
            part.send("critic", TAG_KL, {"index": r, "kl_coef": kl_coef})
        got = part.broadcast(part.recv("critic", TAG_ADV) if part.is_leader else None)
        if got["index"] != r:
            raise RuntimeError(f"actor: expected advantages of rollout {r}, got {got['index']}")
        rows = dp_rows(s.rollout_batch, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        length, dev = ro.tokens.shape[1], ro.tokens.device
        ro.advantages = _fit(got["advantages"][rows], length).to(dev)
        ro.kl = _fit(got["kl"][rows], length).to(dev)
        ro.score = got["score"][rows].to(dev)
        zeros = torch.zeros_like(ro.mask)
        ro.values, ro.returns, ro.kl_coef = zeros, zeros, kl_coef
        ro.exchange_seconds = time.time() - start
        return ro

    def rollout_stats(self, r: int) -> dict[str, float]:
        got = self.part.broadcast(self.part.recv("critic", TAG_STATS) if self.part.is_leader else None)
        if got["index"] != r:
            raise RuntimeError(f"actor: expected critic statistics of rollout {r}, got {got['index']}")
        return got["stats"]

    def rollout_done(self, ctx, r: int) -> None:
        version = r + 1
        if self.staleness is not None and version + self.staleness < self.schedule.total_rollouts:
            self._publish(version)

    # -- stopping and saving ------------------------------------------------------------------------------
    def agree_stop(self, preempted: bool) -> bool:
        part = self.part
        if part.is_leader:
            part.send("critic", TAG_VOTE, preempted)
            preempted = bool(part.recv("critic", TAG_VOTE)) or preempted
        return bool(part.broadcast(preempted))

    def checkpointables(self) -> list:
        return [self.saved]

    def finish(self, iteration: int, code: int) -> None:
        """Release the other partitions: drain what the async sampler already sent, then stop it (it stops the
        frozen partitions), or stop the frozen partitions directly; then wait for the whole job."""
        part, spr = self.part, self.schedule.steps_per_rollout
        if self.staleness is not None:
            for _ in async_in_flight(self.completed0, self.first, -(-iteration // spr), iteration // spr,
                                     self.schedule.total_rollouts, self.staleness):
                if part.is_leader:
                    part.recv("rollout", TAG_SEQ)
            for w in self._works:
                w.wait()
            if part.is_leader:
                part.send("rollout", TAG_WEIGHTS, {"stop": code})  # received after every version it loads
                if self.transfer == "checkpoint":
                    prune_weight_versions(self.weights_dir, keep_from=None)
        elif part.is_leader:
            _stop_frozen(part, code)
        part.job_barrier()


# ---------------------------------------------------------------------------------------------------------
# the critic partition
# ---------------------------------------------------------------------------------------------------------
class CriticPartitionTask(CriticTask):
    """The critic's own training loop (the shared loop, like the actor's): at each rollout it takes the sampled
    batch, the reference log-probs, the scores and the actor's KL coefficient, computes values, GAE and
    whitened advantages for the actor, then trains on its own minibatches step for step with the actor."""

    def __init__(self, opts, part: Partition, schedule: Schedule, role_cfg: Config):
        super().__init__(opts.value_clip_range, role_cfg)
        self.opts, self.part, self.schedule = opts, part, schedule
        self.sampler = "rollout" if part.has("rollout") else "actor"
        self.rollout: Rollout | None = None
        self.acc: dict[str, list[float]] = {}
        self.buffer = RolloutBuffer("critic", self, schedule)
        self.settings: RolloutSettings | None = None
        self.device = "cpu"
        self.ctx = None
        self.first = self.completed0 = 0
        self.returned: int | None = None  # the loop's exit code once training returned
        self._signalled = False  # a frozen partition or the sampler reported a signal
        self.buffer.roots(critic_root(role_cfg.checkpoint.save), critic_root(role_cfg.checkpoint.load))

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        vocab_cfg, tokenizer = with_run_vocabulary(self.vocab_source)
        self.settings = rollout_settings(vocab_cfg, self.opts, tokenizer)
        self.device = self.buffer.device = device
        return TaskSetup(vocab_size=vocab_cfg.model.vocab_size)

    def checkpointables(self) -> list:
        return [self.buffer]

    def before_train(self, ctx) -> None:
        self.ctx = ctx
        ctx.writer.label = "[critic] "
        self.first = self.schedule.first_rollout(ctx.iteration)
        self.completed0 = ctx.iteration // self.schedule.steps_per_rollout

    def train_batches(self, k: int):
        r = self.schedule.rollout_of(k)
        if self.rollout is None or self.rollout.index != r:
            self.rollout, self.acc = self._receive(r), {}
        return self.schedule.batches(self.rollout, k, critic_fields(self.rollout))

    def _receive(self, r: int) -> Rollout:
        part, s = self.part, self.settings
        bundle = None
        if part.is_leader:
            seq = part.recv(self.sampler, TAG_SEQ)
            ref = part.recv("reference", TAG_REF)
            score = part.recv("reward", TAG_SCORE) if part.has("reward") else None
            kl = part.recv("actor", TAG_KL)
            for name, m in (("sampler", seq), ("reference", ref), ("reward", score), ("actor", kl)):
                if m is not None and m["index"] != r:
                    raise RuntimeError(f"critic: expected rollout {r} from the {name}, got {m['index']}")
            batch = dict(seq["batch"], ref_logp=ref["ref_logp"])
            if score is not None:
                batch["score"] = score["score"]
            self._signalled |= bool(seq["preempt"] or ref["preempt"] or (score or {}).get("preempt"))
            bundle = {"batch": batch, "kl_coef": kl["kl_coef"], "version": seq["version"],
                      "gen_seconds": seq["gen_seconds"]}
        bundle = part.broadcast(bundle)
        rows = local_rows(bundle["batch"], s.seq_multiple, self.device)
        ro = rollout_from_rows(rows, r, bundle["version"], bundle["gen_seconds"])
        ro = finalize(ro, self.ctx.chunks, s.micro_batch, bundle["kl_coef"], s.gamma, s.lam, s.kl_kind)
        full = gather_batch(part, s.rollout_batch, {"advantages": ro.advantages, "kl": ro.kl})
        if part.is_leader:
            part.send("actor", TAG_ADV, {"index": r, "advantages": full["advantages"], "kl": full["kl"],
                                         "score": bundle["batch"]["score"]})
        return ro

    def on_step(self, ctx, record: dict) -> None:
        for key in ("value_loss", "value_clip_frac"):
            self.acc.setdefault(key, []).append(record[key])
        if ctx.iteration % self.schedule.steps_per_rollout == 0 and self.part.is_leader:
            stats = {k: sum(v) / len(v) for k, v in self.acc.items()}
            self.part.send("actor", TAG_STATS, {"index": self.rollout.index, "stats": stats})

    def agree_stop(self, preempted: bool) -> bool:
        part = self.part
        if part.is_leader:
            other = bool(part.recv("actor", TAG_VOTE))
            mine = preempted or self._signalled
            part.send("actor", TAG_VOTE, mine)
            preempted = mine or other
        stop = bool(part.broadcast(preempted))
        if stop:
            self.returned = signals.EXIT_CODE_PREEMPTED  # the loop saves and returns it
        return stop

    def after_save(self, ctx) -> None:
        if self.part.is_leader:
            self.part.send("actor", TAG_SAVED, ctx.iteration)

    def state_dict(self) -> dict[str, Any]:
        return {"ppo_critic": {"steps_per_rollout": self.schedule.steps_per_rollout}}

    def after_train(self, ctx) -> None:
        self.returned = 0

    def close(self) -> None:
        """Once training returned (not on an error): take (and drop) the rollouts the async sampler and the
        frozen partitions already sent; then wait for the whole job."""
        if self.returned is None:
            return
        spr, part, iteration = self.schedule.steps_per_rollout, self.part, self.ctx.iteration
        if self.sampler == "rollout" and part.is_leader:
            for _ in async_in_flight(self.completed0, self.first, -(-iteration // spr), iteration // spr,
                                     self.schedule.total_rollouts, self.opts.max_staleness):
                part.recv(self.sampler, TAG_SEQ)
                part.recv("reference", TAG_REF)
                if part.has("reward"):
                    part.recv("reward", TAG_SCORE)
        part.job_barrier()


# ---------------------------------------------------------------------------------------------------------
# frozen partitions: reference log-probs, reward-model scores
# ---------------------------------------------------------------------------------------------------------
def serve_frozen(part: Partition, role: str, settings: RolloutSettings, device: str, reference=None,
                 scorer=None) -> int:
    """Answer every rollout batch the sampler sends until it says stop; returns the job's exit code."""
    s = settings
    sampler = "rollout" if part.has("rollout") else "actor"
    tag, name = (TAG_REF, "ref_logp") if role == "reference" else (TAG_SCORE, "score")
    served = 0
    while True:
        msg = part.broadcast(part.recv(sampler, TAG_SEQ) if part.is_leader else None)
        if "stop" in msg:
            if part.is_leader:
                print(f"[ppo:{role}] served {served} rollouts; stopping", flush=True)
            return int(msg["stop"])
        rows = local_rows({k: msg["batch"][k] for k in ("tokens", "labels", "mask", "lengths")}, s.seq_multiple,
                          device)
        micro = split_micro(rows, s.micro_batch)
        out = reference_logprobs(reference, micro, s) if role == "reference" else reward_scores(scorer, micro)
        flag = signals.any_rank_received(device)
        full = gather_batch(part, s.rollout_batch, None if out is None else {name: out})
        if part.is_leader:
            part.send("critic", tag, {"index": msg["index"], name: full[name], "preempt": flag})
        served += 1


# ---------------------------------------------------------------------------------------------------------
# the async sampler partition
# ---------------------------------------------------------------------------------------------------------
def run_sampler(part: Partition, producer: RolloutProducer, chunks, total_rollouts: int, staleness: int,
                transfer: str = "p2p") -> int:
    """Sample rollouts with the actor's weights of version max(v0, r - s); returns the job's exit code."""
    params = _param_list(chunks)
    pair = part.pair("actor") if transfer == "p2p" else None

    def receive_weights() -> dict:
        header = part.broadcast(part.recv("actor", TAG_WEIGHTS) if part.is_leader else None)
        if "stop" in header:
            return header
        if "path" in header:
            load_model_weights(header["path"], chunks)
            return header
        with torch.no_grad():
            for i, p in enumerate(params):
                buf = torch.empty(p.shape, dtype=p.dtype)
                pair.recv([buf], 0, TAG_WEIGHT_TENSORS + i).wait()
                p.copy_(buf)
        return header

    header = receive_weights()
    if "stop" in header:
        return _stop_frozen(part, int(header["stop"]))
    v0, first = int(header["version"]), int(header["first"])
    version = v0
    consumers = sampler_consumers(part, include_actor=True)
    for r in range(first, total_rollouts):
        need = sampler_version(r, v0, staleness)
        if need > version:
            header = receive_weights()
            if "stop" in header:
                return _stop_frozen(part, int(header["stop"]))
            version = int(header["version"])
            if version != need:
                raise RuntimeError(f"rollout partition: expected weights version {need}, got {version}")
        sample_and_send(part, producer, chunks, r, version, consumers)
    header = receive_weights()
    if "stop" not in header:
        raise RuntimeError(f"rollout partition: all rollouts sampled, yet the actor sent version {header}")
    return _stop_frozen(part, int(header["stop"]))


def _stop_frozen(part: Partition, code: int) -> int:
    if part.is_leader:
        for name in ("reference", "reward"):
            if part.has(name):
                part.send(name, TAG_SEQ, {"stop": code})
    return code


# ---------------------------------------------------------------------------------------------------------
# one process's role
# ---------------------------------------------------------------------------------------------------------
def start_partition(cfg: Config, placement):
    """Cut the launcher's world into the placement's partitions; returns this process's Partition."""
    from hcx_megatron.config.args import resolve_device
    from hcx_megatron.distributed.env import resolve_dist_env
    from hcx_megatron.distributed.partition import init_partitions, layout_blocks

    blocks = layout_blocks([(name, r.ranks) for name, r in placement.roles.items()])
    backend = "gloo" if resolve_device(cfg.runtime.device) == "cpu" else "nccl"
    return init_partitions(resolve_dist_env(), blocks, backend,
                           datetime.timedelta(minutes=cfg.runtime.distributed_timeout_minutes))


def serve_role(part: Partition, rcfg: Config, opts, schedule: Schedule, transfer: str | None,
               sft_checkpoint: str | None) -> int:
    """A partition that trains nothing: reference, reward, or the async sampler. Returns the exit code."""
    from hcx_megatron.config.args import resolve_device
    from hcx_megatron.distributed.initialize import initialize_distributed, shutdown

    device = resolve_device(rcfg.runtime.device)
    initialize_distributed(rcfg)
    signals.install_handlers()  # a signal is reported to the critic with the next answer, never fatal here
    cfg, tokenizer = with_run_vocabulary(rcfg)
    settings = rollout_settings(cfg, opts, tokenizer)
    if part.name == "reward":
        from hcx_megatron.rlhf.reward import RewardScorer

        scorer = RewardScorer.load(opts.rm_checkpoint, cfg, device, opts.reward_clip)
        code = serve_frozen(part, "reward", settings, device, scorer=scorer)
    else:
        chunks = build_reference(cfg, device, sft_checkpoint)  # the rollout partition's weights arrive later
        if part.name == "reference":
            code = serve_frozen(part, "reference", settings, device, reference=chunks)
        else:  # rollout: the async sampler, a copy of the actor that receives its weights
            producer = RolloutProducer(settings, read_prompts(opts.prompt_data, tokenizer), None,
                                       rule_score_fn(opts, device), device, ps.get_data_parallel_rank(),
                                       ps.get_data_parallel_world_size())
            code = run_sampler(part, producer, chunks, schedule.total_rollouts, opts.max_staleness, transfer)
    part.job_barrier()
    shutdown()
    return code


__all__ = ["PartitionPeers", "CriticPartitionTask", "CriticSaved", "serve_frozen", "run_sampler", "serve_role",
           "start_partition", "async_in_flight", "sampler_version", "gather_batch", "local_rows", "SAMPLE_FIELDS"]
