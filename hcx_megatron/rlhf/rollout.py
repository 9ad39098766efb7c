"""PPO rollouts on megatron-core model chunks.

A rollout is made in two halves:
  1. `RolloutProducer.produce(r, policy_chunks)` — sample responses for rollout r's prompts with the shared
     generation utility (hcx_megatron.inference.generate), then, teacher-forced through megatron-core's
     forward-only schedule (so TP and PP layouts work as in training; at TP1 x PP1 on CPU a captured graph of the
     same forward, `forward_collect`): the sampling policy's log-probs and
     entropy at the SAMPLING temperature, the frozen reference's log-probs at the same temperature, and the
     sequence score (normalised + clipped reward model, or a rule). Only frozen models and the given policy
     weights are read, so this half can run in a background thread on a weight snapshot (async mode).
  2. `finalize(raw, critic_chunks, ...)` — on the learner: per-token values from the current critic, per-token
     rewards (-kl_coef * KL, score on the last response token), GAE, advantage whitening over the data-parallel
     group.
Model outputs exist only on the last pipeline stage; other stages carry zeros in those fields (their forward
steps never read them).

Tensors are [N, L], label-aligned (position t = emitting token t+1), see hcx_megatron/rlhf/ppo_math.py.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy

from hcx_megatron.inference.compiled import compiled_forward_unsupported_reason, run_forward
from hcx_megatron.model.builder import sync_params_before_read
from hcx_megatron.training.schedule import forward_only_collect
from hcx_megatron.rlhf import ppo_math as pm

_NEG = -1e9  # logit for Megatron's padding rows: never sampled, zero probability


# ---------------------------------------------------------------------------------------------------------
# vocabulary-parallel log-probs and entropy
# ---------------------------------------------------------------------------------------------------------
def scaled_logits(logits: torch.Tensor, temperature: float, vocab_size: int) -> torch.Tensor:
    """logits [..., V/tp] (this TP rank's vocabulary slice) / temperature, padding rows >= vocab_size masked."""
    x = logits.float() / temperature
    v_local = x.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * v_local
    if start + v_local > vocab_size:
        ids = torch.arange(start, start + v_local, device=x.device)
        x = x.masked_fill(ids >= vocab_size, _NEG)
    return x


def token_logprobs(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(x)[label] over the full (TP-split) vocabulary; differentiable."""
    # megatron's vocab-parallel cross entropy works in place on its input: give it a copy.
    if torch.is_grad_enabled() or ps.get_tensor_model_parallel_world_size() > 1:
        return -tensor_parallel.vocab_parallel_cross_entropy(x.clone(), labels)
    return _one_rank_no_grad_token_logprobs(x, labels)


def _one_rank_no_grad_token_logprobs(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """token_logprobs without autograd on one TP rank: the steps of megatron's vocab-parallel cross entropy without
    its all-reduces over the one-rank group (identities, but three gloo calls per micro-batch): bitwise the same."""
    ce = VocabParallelCrossEntropy
    logits, logits_max = ce.calculate_logits_max(x.clone())
    _, _, predicted, sum_exp, exp_logits = ce.calculate_predicted_logits(logits, labels, logits_max, 0,
                                                                        logits.shape[-1])
    return -ce.calculate_cross_entropy_loss(exp_logits, predicted, sum_exp)[1]


@torch.no_grad()
def vocab_parallel_entropy(x: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(x) over the TP-split vocabulary: log Z - sum p * (x - max)."""
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    m = x.max(dim=-1, keepdim=True).values
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(x - m)
    z = e.sum(dim=-1, keepdim=True)
    if tp > 1:
        dist.all_reduce(z, group=group)
    pl = ((e / z) * (x - m)).sum(dim=-1)
    if tp > 1:
        dist.all_reduce(pl, group=group)
    return torch.log(z.squeeze(-1)) - pl


# ---------------------------------------------------------------------------------------------------------
# forward-only passes
# ---------------------------------------------------------------------------------------------------------
def split_micro(batch: dict[str, torch.Tensor], mbs: int) -> list[dict[str, torch.Tensor]]:
    n = next(iter(batch.values())).shape[0]
    return [{k: v[i: i + mbs] for k, v in batch.items()} for i in range(0, n, mbs)]


def teacher_forced_forward(model, tokens, position_ids):
    """The whole-sequence forward, as the learner's training step calls it."""
    return model(tokens, position_ids, None)


@torch.no_grad()
def forward_collect(chunks: Sequence, micro: list[dict[str, torch.Tensor]],
                    fn: Callable[[torch.Tensor, dict], torch.Tensor]) -> torch.Tensor | None:
    """Run `chunks` forward-only over the micro-batches (megatron-core schedule, any PP) and concatenate
    fn(last-stage output, micro-batch) along dim 0. Returns None on pipeline stages other than the last.
    Where the layout allows (hcx_megatron/inference/compiled.py: CPU, TP1 x PP1, main thread) the forward is
    called directly, as a dynamo-captured graph once it has run enough eager calls: the same ops, so the same
    values bit for bit as the schedule's eager forward and the learner's grad-enabled one (the first PPO ratio
    stays exactly 1)."""
    chunks = list(chunks)
    training = [c for c in chunks if c.training]  # frozen models are in eval mode already: no module walk
    for c in training:
        c.eval()
    direct = len(chunks) == 1 and compiled_forward_unsupported_reason(chunks) is None

    def step(data_iterator, model):
        b = next(data_iterator)
        out = teacher_forced_forward(model, b["tokens"], b["position_ids"])
        return out, lambda o, non_loss_data=False: fn(o, b)

    try:
        if direct:  # one stage: the forward-only schedule around the forward would only call it
            res = [fn(run_forward(teacher_forced_forward, chunks[0], b["tokens"], b["position_ids"], compiled=True),
                      b) for b in micro]
        else:
            res = forward_only_collect(chunks, micro, step, micro[0]["tokens"].shape[1],
                                       micro[0]["tokens"].shape[0])
    finally:
        for c in training:
            c.train()
    if res is None:  # not the last pipeline stage
        return None
    return torch.cat([r.float() for r in res], dim=0)


# ---------------------------------------------------------------------------------------------------------
# data structures
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RolloutSettings:
    rollout_batch: int  # prompts per rollout, all DP ranks together
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_ids: tuple[int, ...]
    vocab_size: int
    pad_id: int
    micro_batch: int
    seq_multiple: int = 1
    kl_kind: str = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    repetition_ngram: int = 2
    seed: int = 1234
    kv_cache: bool = True  # generate with megatron-core's KV cache (False: the full-prefix reference path)


@dataclass
class Rollout:
    """One DP rank's share of a rollout batch (CPU or device tensors)."""

    index: int  # rollout number
    version: int  # policy version (= rollouts trained on) of the weights that sampled it
    tokens: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L] tokens shifted left
    mask: torch.Tensor  # [N, L] float, 1 on response actions
    old_logp: torch.Tensor  # [N, L] sampling policy, at the sampling temperature (last stage)
    ref_logp: torch.Tensor  # [N, L] reference, same temperature (last stage)
    entropy: torch.Tensor  # [N, L] sampling policy entropy (last stage)
    score: torch.Tensor  # [N] normalised/clipped sequence reward (last stage)
    ul_negative: torch.Tensor  # [N, L] float, 1 where the response token repeats an earlier n-gram
    response_length: torch.Tensor  # [N]
    repetition: torch.Tensor  # [N] share of repeated n-grams in each response
    gen_seconds: float = 0.0
    lengths: torch.Tensor | None = None  # [N] prompt + response tokens
    exchange_seconds: float = 0.0  # separate placement: the actor's wait for the other partitions' results
    # filled by finalize():
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # [N, L] per-token KL estimate
    kl_coef: float = 0.0

    @property
    def position_ids(self) -> torch.Tensor:
        n, length = self.tokens.shape
        return torch.arange(length, device=self.tokens.device).unsqueeze(0).expand(n, length).contiguous()

    def to_state(self) -> dict:
        return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_state(cls, state: dict, device: str) -> "Rollout":
        return cls(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in state.items()})


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int,
                    multiple: int, ngram: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response rows with label-aligned action masks and repetition marks."""
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    length = max(len(s) for s in rows) + 1  # one trailing slot so the last token has a (pad) label
    length = -(-length // multiple) * multiple
    n = len(rows)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros(n, length)
    ul = torch.zeros(n, length)
    rep = torch.zeros(n)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
        start = len(p) - 1  # position whose label is the first response token
        mask[i, start: start + len(r)] = 1.0
        marks = pm.repeated_ngram_positions(list(r), ngram)
        if r:
            ul[i, start: start + len(r)] = torch.tensor(marks, dtype=torch.float)
        rep[i] = pm.repetition_rate(list(r), ngram)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return {"tokens": tokens, "labels": labels, "mask": mask, "ul_negative": ul, "repetition": rep,
            "response_length": torch.tensor([float(len(r)) for r in responses]),
            "lengths": torch.tensor([len(s) for s in rows], dtype=torch.long)}


# ---------------------------------------------------------------------------------------------------------
# whole rollout batches (separate placement: partitions with different data-parallel sizes exchange them)
# ---------------------------------------------------------------------------------------------------------
def dp_rows(n: int, dp_rank: int, dp_size: int) -> list[int]:
    """Rows of a rollout batch that data-parallel rank `dp_rank` owns (RolloutProducer's split)."""
    return list(range(dp_rank, n, dp_size))


def assemble_rows(parts: Sequence[tuple[Sequence[int], dict[str, torch.Tensor]]], n: int,
                  pad: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Rows from several data-parallel ranks -> one batch of n rows; [rows, L_i] fields are right-padded to the
    longest L (with pad[name], default 0)."""
    pad = pad or {}
    names = parts[0][1].keys()
    out = {}
    for name in names:
        ts = [fields[name] for _, fields in parts]
        if ts[0].dim() == 2:
            width = max(t.shape[1] for t in ts)
            full = torch.full((n, width), pad.get(name, 0), dtype=ts[0].dtype)
        else:
            full = torch.zeros((n, *ts[0].shape[1:]), dtype=ts[0].dtype)
        seen = torch.zeros(n, dtype=torch.bool)
        for (rows, fields), t in zip(parts, ts):
            idx = torch.as_tensor(list(rows), dtype=torch.long)
            if t.dim() == 2:
                full[idx, : t.shape[1]] = t.cpu()
            else:
                full[idx] = t.cpu()
            seen[idx] = True
        if not bool(seen.all()):
            raise RuntimeError(f"assemble_rows: rows {torch.nonzero(~seen).flatten().tolist()[:8]} of {name!r} "
                               "came from no rank")
        out[name] = full
    return out


def take_rows(batch: dict[str, torch.Tensor], rows: Sequence[int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """These rows of a whole batch, [rows, L] fields trimmed to the longest of them (+1 label slot, rounded up to
    `multiple`) exactly as build_sequences pads a rank's own rows. Needs batch["lengths"]."""
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    length = int(batch["lengths"][idx].max()) + 1
    length = -(-length // multiple) * multiple
    out = {}
    for name, t in batch.items():
        t = t.index_select(0, idx)
        if t.dim() == 2:
            if t.shape[1] < length:
                # a wider TP multiple than the sender's: the extra columns are masked out, and causal attention
                # keeps them from touching real positions, so their values do not matter
                t = torch.nn.functional.pad(t, (0, length - t.shape[1]))
            t = t[:, :length]
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------------
# producer (generation + frozen scoring) and learner-side finalisation
# ---------------------------------------------------------------------------------------------------------
class RolloutProducer:
    """Samples rollouts for this DP rank, with the sampling policy's log-probs and entropy; `score_fn(batch,
    responses, micro) -> [N]` (a rule on the sampled token ids) or None. The reference and a reward model score
    them where they live (hcx_megatron/rlhf/ppo_models.py)."""

    def __init__(self, settings: RolloutSettings, prompts: list[list[int]], score_fn, device: str, dp_rank: int,
                 dp_size: int):
        s = settings
        if s.rollout_batch % dp_size or (s.rollout_batch // dp_size) % s.micro_batch:
            raise ValueError(f"--rollout-batch-size {s.rollout_batch} must split into data-parallel size "
                             f"{dp_size} x --micro-batch-size {s.micro_batch}")
        self.s, self.prompts, self.score_fn = s, prompts, score_fn
        self.device, self.dp_rank, self.dp_size = device, dp_rank, dp_size
        self._perm: dict[int, np.ndarray] = {}

    def prompt_indices(self, r: int) -> tuple[list[int], list[int]]:
        """(positions within the rollout, prompt indices) of this rank's share of rollout r. Prompts are visited
        in a seeded permutation per pass over the prompt set; the map depends only on r."""
        n, R = len(self.prompts), self.s.rollout_batch
        positions = list(range(self.dp_rank, R, self.dp_size))
        out = []
        for p in positions:
            g = r * R + p
            epoch, k = divmod(g, n)
            if epoch not in self._perm:
                self._perm[epoch] = np.random.RandomState((self.s.seed + 104729 * epoch) % 2**32).permutation(n)
            out.append(int(self._perm[epoch][k]))
        return positions, out

    def produce(self, r: int, policy_chunks, version: int) -> Rollout:
        from hcx_megatron.inference.generate import generate

        s = self.s
        start = time.time()
        sync_params_before_read(policy_chunks)  # the learner's chunks right after a step (a no-op on snapshots)
        positions, idx = self.prompt_indices(r)
        prompts = [self.prompts[i] for i in idx]
        gen = generate(policy_chunks, prompts, s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                       stop_ids=s.stop_ids, seed=(s.seed * 7919 + r) % 2**31, vocab_size=s.vocab_size,
                       pad_id=s.pad_id, seed_indices=positions, kv_cache=s.kv_cache)
        seq = build_sequences(prompts, gen.tokens, s.pad_id, s.seq_multiple, s.repetition_ngram)
        dev = self.device if self.device == "cuda" else "cpu"
        batch = {k: v.to(dev) for k, v in seq.items()}
        batch["position_ids"] = torch.arange(batch["tokens"].shape[1], device=dev).unsqueeze(0).expand_as(
            batch["tokens"]).contiguous()
        micro = split_micro(batch, s.micro_batch)

        def logp_and_entropy(out, b):
            x = scaled_logits(out, s.temperature, s.vocab_size)
            return torch.stack([token_logprobs(x, b["labels"]), vocab_parallel_entropy(x)], dim=0).transpose(0, 1)

        pol = forward_collect(policy_chunks, micro, logp_and_entropy)  # [N, 2, L]
        score = None if self.score_fn is None else self.score_fn(batch, gen.tokens, micro)
        n, length = batch["tokens"].shape
        zeros = torch.zeros(n, length, device=dev)
        m = batch["mask"]
        return Rollout(
            index=r, version=version, tokens=batch["tokens"], labels=batch["labels"], mask=m,
            old_logp=pol[:, 0] * m if pol is not None else zeros,
            ref_logp=zeros,
            entropy=pol[:, 1] * m if pol is not None else zeros,
            score=score if score is not None else torch.zeros(n, device=dev),
            ul_negative=batch["ul_negative"], response_length=batch["response_length"],
            repetition=batch["repetition"], gen_seconds=time.time() - start, lengths=batch["lengths"])


def finalize(ro: Rollout, critic_chunks, micro_batch: int, kl_coef: float, gamma: float, lam: float,
             kl_kind: str) -> Rollout:
    """Values from the current critic, per-token rewards, GAE and whitened advantages (learner side)."""
    batch = {"tokens": ro.tokens, "position_ids": ro.position_ids}
    sync_params_before_read(critic_chunks)
    values = forward_collect(critic_chunks, split_micro(batch, micro_batch), lambda out, b: out)
    m = ro.mask
    if values is None:  # not the last pipeline stage: its forward steps only need tokens
        z = torch.zeros_like(m)
        ro.values, ro.advantages, ro.returns, ro.kl = z, z, z, z
    else:
        values = values * m
        rewards, kl = pm.token_rewards(ro.score, ro.old_logp, ro.ref_logp, m, kl_coef, kl_kind)
        adv, ret = pm.gae(rewards, values, m, gamma, lam)
        ro.values, ro.returns, ro.kl = values, ret, kl
        ro.advantages = pm.masked_whiten(adv, m, group=ps.get_data_parallel_group())
    ro.kl_coef = kl_coef
    return ro


# ---------------------------------------------------------------------------------------------------------
# asynchronous producer
# ---------------------------------------------------------------------------------------------------------
class AsyncRollouts:
    """A background thread produces rollouts into a bounded queue while the learner trains.

    Staleness bound: the producer starts rollout r only once the learner has published policy version
    >= r - max_staleness (version v = weights after training on rollouts 0..v-1) and samples with the newest
    published weights, so a rollout is at most `max_staleness` policy updates (rollout batches) behind the
    learner that consumes it; the queue holds at most `max_staleness` finished rollouts. The producer reads
    only its own weight snapshot and frozen models, and uses no collectives (TP = PP = 1 required), so it
    never races the learner's process groups."""

    def __init__(self, produce: Callable[[int, Sequence, int], Rollout], snapshot_chunks, first: int, last: int,
                 max_staleness: int):
        """produce(r, policy_chunks, version) -> rollout r, sampled and scored (e.g. RolloutProducer.produce)."""
        if max_staleness < 1:
            raise ValueError("--max-staleness must be >= 1 with --async-rollouts")
        self.produce, self.snapshot = produce, snapshot_chunks
        self.max_staleness = max_staleness
        self.q: queue.Queue = queue.Queue(maxsize=max_staleness)
        self._cv = threading.Condition()
        self._weights: list[dict[str, torch.Tensor]] | None = None
        self._version = first
        self._error: BaseException | None = None
        self._stop = False
        self._first, self._last = first, last
        self._thread: threading.Thread | None = None

    def publish(self, learner_chunks, version: int) -> None:
        """Learner: the weights after training on `version` rollouts (a CPU copy; the producer loads it)."""
        from hcx_megatron.model.builder import unwrap

        sync_params_before_read(learner_chunks)  # state_dict() bypasses the forward pre-hooks' gather
        weights = [{k: v.detach().clone() for k, v in unwrap(c).state_dict().items() if torch.is_tensor(v)}
                   for c in learner_chunks]
        with self._cv:
            self._weights, self._version = weights, version
            self._cv.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from hcx_megatron.model.builder import unwrap

        try:
            for r in range(self._first, self._last):
                with self._cv:
                    self._cv.wait_for(lambda: self._stop or self._version >= r - self.max_staleness)
                    if self._stop:
                        return
                    weights, version = self._weights, self._version
                if weights is not None:
                    for c, w in zip(self.snapshot, weights):
                        unwrap(c).load_state_dict(w, strict=False)
                ro = self.produce(r, self.snapshot, version)
                while not self._stop:
                    try:
                        self.q.put(ro, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # surfaced to the learner by get()
            self._error = exc
            self.q.put(None)

    def get(self, r: int) -> Rollout:
        ro = self.q.get()
        if ro is None or self._error is not None:
            raise RuntimeError("rollout producer thread failed") from self._error
        if ro.index != r:
            raise RuntimeError(f"rollout producer out of order: expected {r}, got {ro.index}")
        return ro

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


__all__ = ["RolloutSettings", "Rollout", "RolloutProducer", "AsyncRollouts", "finalize", "forward_collect",
           "dp_rows", "assemble_rows", "take_rows",
           "scaled_logits", "token_logprobs", "vocab_parallel_entropy", "build_sequences", "split_micro"]
