"""The one training loop. Pretraining, SFT, reward modelling and PPO's learner all run through `run()`; they
differ only in the `Task` they pass: its data, its forward step / loss and (optionally) its model head.

Read top to bottom: start processes -> task set-up (tokenizer, data) -> build model chunks -> optimizer and
scheduler -> resume -> for each iteration: forward/backward over the micro-batches with megatron-core's
pipeline schedule, optimizer step, metrics, eval, checkpoint, preemption check.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from hcx_megatron.config.args import Config
from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
from hcx_megatron.model.builder import BuiltModel, ModelFactory, build_model, sync_params_before_read, unwrap
from hcx_megatron.training import signals
from hcx_megatron.training.checkpoint import load_checkpoint, read_latest_iteration, save_checkpoint
from hcx_megatron.training.metrics import MetricsWriter, memory_gb, step_throughput
from hcx_megatron.training.optimizer import build_optimizer


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step for this rank."""

    microbatches: list[dict[str, torch.Tensor]]
    seq_length: int
    micro_batch_size: int
    global_tokens: int  # tokens in the whole global batch (all DP ranks), for throughput


class Task(Protocol):
    """What a driver supplies to the loop."""

    metric_keys: list[str]  # keys of the [sum, count] pairs its loss function reports, e.g. ["lm loss"]

    def setup(self, cfg: Config, device: str) -> None:
        """After process groups exist, before the model is built: tokenizer, datasets, cfg.model.vocab_size."""

    def model_factory(self, cfg: Config, impl: str) -> ModelFactory | None:
        """None for the plain GPTModel; drivers with a value/reward head return their own factory."""

    def train_batches(self, iteration: int) -> StepBatches:
        """Micro-batches of optimizer step `iteration` (0-based). Must depend only on `iteration`."""

    def eval_batches(self, eval_index: int) -> list[StepBatches]:
        """Validation steps; empty when the task has no validation data."""

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        """megatron-core forward_step_func: returns (output_tensor, loss_func); loss_func(output) returns
        (loss_sum, num_tokens, {key: tensor([sum, count])})."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state stored with the checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # Optional hooks (looked up with getattr; PPO on separate rank partitions uses them):
    #   agree_stop(preempted: bool) -> bool   after each step: the preemption decision of all partitions
    #   before_commit() -> None               a save's data are written; its tracker is not yet
    #   after_save(ctx) -> None               after each checkpoint save


@dataclass
class TrainContext:
    cfg: Config
    device: str
    built: BuiltModel
    optimizer: Any
    scheduler: Any
    writer: MetricsWriter
    iteration: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chunks(self):
        return self.built.chunks


def _model_arg(chunks):
    return chunks if len(chunks) > 1 else chunks[0]


def _iterators(batches: StepBatches, n_chunks: int):
    # The interleaved schedule reads one iterator per model chunk; each sees the same micro-batches.
    its = [iter(batches.microbatches) for _ in range(n_chunks)]
    return its if n_chunks > 1 else its[0]


def reduce_metrics(loss_dicts: list[dict[str, torch.Tensor]], keys: list[str], device: str) -> dict[str, float]:
    """Sum each key's [sum, count] over micro-batches, then over all ranks; return sum/count per key.
    Only the last pipeline stage has values; TP replicas repeat them, which leaves the ratio unchanged, and CP
    ranks hold disjoint slices of each sequence (hcx_megatron/data/context_parallel.py), whose sums add up."""
    dev = "cuda" if device == "cuda" else "cpu"
    totals = torch.zeros(len(keys), 2, dtype=torch.float64, device=dev)
    for d in loss_dicts or []:
        for i, k in enumerate(keys):
            if k in d:
                totals[i] += d[k].detach().to(totals.dtype).view(-1)[:2]
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {k.replace(" ", "_"): (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, k in enumerate(keys)}


def train_step(ctx: TrainContext, task: Task, batches: StepBatches) -> tuple[dict[str, float], float, bool]:
    for chunk in ctx.chunks:
        chunk.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    losses = get_forward_backward_func()(
        forward_step_func=task.forward_step,
        data_iterator=_iterators(batches, len(ctx.chunks)),
        model=_model_arg(ctx.chunks),
        num_microbatches=len(batches.microbatches),
        seq_length=batches.seq_length,
        micro_batch_size=batches.micro_batch_size,
        forward_only=False,
    )
    ok, grad_norm, _ = ctx.optimizer.step()
    if ok:
        ctx.scheduler.step(increment=ctx.cfg.training.global_batch_size)
    return reduce_metrics(losses, task.metric_keys, ctx.device), float(grad_norm or 0.0), bool(ok)


@torch.no_grad()
def evaluate(ctx: TrainContext, task: Task, eval_index: int) -> dict[str, float] | None:
    steps = task.eval_batches(eval_index)
    if not steps:
        return None
    # The forward pre-hooks would gather too, but a task's eval step may read weights outside the forward.
    sync_params_before_read(ctx.chunks)
    for chunk in ctx.chunks:
        chunk.eval()
    all_losses = []
    for batches in steps:
        all_losses += get_forward_backward_func()(
            forward_step_func=task.forward_step,
            data_iterator=_iterators(batches, len(ctx.chunks)),
            model=_model_arg(ctx.chunks),
            num_microbatches=len(batches.microbatches),
            seq_length=batches.seq_length,
            micro_batch_size=batches.micro_batch_size,
            forward_only=True,
        ) or []
    for chunk in ctx.chunks:
        chunk.train()
    return reduce_metrics(all_losses, task.metric_keys, ctx.device)


def _save(ctx: TrainContext, task: Task) -> None:
    c = ctx.cfg.checkpoint
    save_checkpoint(c.save, ctx.iteration, ctx.chunks, ctx.optimizer, ctx.scheduler, ctx.cfg.to_dict(),
                    extra=task.state_dict(), save_optim=not c.no_save_optim,
                    before_commit=getattr(task, "before_commit", None))
    ctx.writer.write({"kind": "event", "event": "save", "iteration": ctx.iteration, "path": c.save})
    after_save = getattr(task, "after_save", None)  # optional: partitioned PPO tells the actor its critic is saved
    if after_save is not None:
        after_save(ctx)


def setup(cfg: Config, task: Task) -> TrainContext:
    """Everything before the first step: processes, task data, model, optimizer, resume."""
    signals.install_handlers()
    _, device = initialize_distributed(cfg)
    task.setup(cfg, device)
    built = build_model(cfg, device, factory=task.model_factory(cfg, "auto"))
    optimizer, scheduler = build_optimizer(cfg, built.chunks)
    # Hooks megatron-core's schedules call: per-token loss normalisation over DP and micro-batches, gradient
    # all-reduce / reduce-scatter at the end of the step, loss scaling for mixed precision.
    tc = built.config
    tc.finalize_model_grads_func = finalize_model_grads
    tc.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        tc.no_sync_func = [c.no_sync for c in built.chunks] if len(built.chunks) > 1 else built.chunks[0].no_sync
    if cfg.parallel.overlap_param_gather and cfg.parallel.use_distributed_optimizer:
        tc.param_sync_func = [c.start_param_sync for c in built.chunks]
        if len(built.chunks) == 1:
            tc.param_sync_func = tc.param_sync_func[0]
    writer = MetricsWriter(cfg.logging.metrics_jsonl, cfg.logging.tensorboard_dir, dist.get_rank() == 0,
                           cfg.training.train_iters)
    ctx = TrainContext(cfg, device, built, optimizer, scheduler, writer)
    ck = cfg.checkpoint
    has_ckpt = bool(ck.load) and (read_latest_iteration(ck.load) is not None
                                  or os.path.exists(os.path.join(ck.load, "metadata.json")))
    if ck.finetune and not has_ckpt:
        raise FileNotFoundError(f"--finetune: --load {ck.load!r} holds no checkpoint")
    if ck.load and not has_ckpt and dist.get_rank() == 0:
        print(f"[hcx] --load {ck.load}: no checkpoint yet, starting from scratch", flush=True)
    if has_ckpt:
        load_optim = not (ck.finetune or ck.no_load_optim)
        iteration, extra = load_checkpoint(ck.load, built.chunks, optimizer, scheduler, load_optim=load_optim,
                                           load_rng=not (ck.finetune or ck.no_load_rng))
        ctx.iteration = 0 if ck.finetune else iteration
        if not ck.finetune:
            task.load_state_dict(extra)
        writer.write({"kind": "event", "event": "load", "iteration": ctx.iteration, "path": ck.load,
                      "finetune": ck.finetune})
        if dist.get_rank() == 0:
            note = " (finetune: weights only)" if ck.finetune else ""
            print(f"[hcx] loaded {ck.load} at iteration {iteration}{note}", flush=True)
    return ctx


def train(ctx: TrainContext, task: Task, on_step: Callable[[TrainContext, dict], None] | None = None) -> int:
    """Run from ctx.iteration to --train-iters. Returns the process exit code (0, or 17 when preempted)."""
    cfg, t = ctx.cfg, ctx.cfg.training
    output_size = getattr(unwrap(ctx.chunks[0]), "output_size", None)  # scalar heads: 1, LM: the vocabulary
    saved_at = None
    while ctx.iteration < t.train_iters:
        requested = time.time()
        batches = task.train_batches(ctx.iteration)
        start = time.time()
        data_wait = start - requested  # how long the step waited for its data (prefetching loaders hide it)
        stats, grad_norm, ok = train_step(ctx, task, batches)
        step_time = time.time() - start
        ctx.iteration += 1
        record = {
            "kind": "train",
            "iteration": ctx.iteration,
            **stats,
            "lr": ctx.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm,
            "update_skipped": not ok,
            "step_time_s": step_time,
            "data_wait_s": data_wait,
            **step_throughput(cfg, batches.seq_length, batches.global_tokens, step_time, dist.get_world_size(),
                              output_size),
            "consumed_samples": ctx.iteration * t.global_batch_size,
            "seq_length": batches.seq_length,
            "mem_gb": memory_gb(ctx.device),
        }
        ctx.history.append(record)
        ctx.writer.write(record)
        if ctx.iteration % cfg.logging.log_interval == 0 or ctx.iteration == t.train_iters:
            ctx.writer.console(record)
        if on_step is not None:
            on_step(ctx, record)
        if t.eval_interval and ctx.iteration % t.eval_interval == 0:
            ev = evaluate(ctx, task, ctx.iteration // t.eval_interval)
            if ev is not None:
                ctx.writer.write({"kind": "eval", "iteration": ctx.iteration, **ev})
                if dist.get_rank() == 0:
                    print(f"[eval] iter {ctx.iteration} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                          flush=True)
        preempted = signals.any_rank_received(ctx.device)
        agree_stop = getattr(task, "agree_stop", None)  # optional: jobs of several partitions stop together
        if agree_stop is not None:
            preempted = agree_stop(preempted)
        exiting = bool(t.exit_interval and ctx.iteration % t.exit_interval == 0)
        periodic = bool(cfg.checkpoint.save_interval and ctx.iteration % cfg.checkpoint.save_interval == 0)
        if cfg.checkpoint.save and (periodic or preempted or exiting):
            _save(ctx, task)
            saved_at = ctx.iteration
        if preempted:
            ctx.writer.write({"kind": "event", "event": "preempted", "iteration": ctx.iteration})
            if dist.get_rank() == 0:
                print(f"[hcx] preemption signal: saved at iteration {ctx.iteration}, exiting "
                      f"{signals.EXIT_CODE_PREEMPTED}", flush=True)
            return signals.EXIT_CODE_PREEMPTED
        if exiting:
            return 0
    if cfg.checkpoint.save and saved_at != ctx.iteration:
        _save(ctx, task)
    return 0


def run(cfg: Config, task: Task, on_step=None, after_train: Callable[[TrainContext], None] | None = None) -> int:
    """Full driver run: set-up, train, optional post-training hook, clean shutdown. Returns the exit code."""
    ctx = setup(cfg, task)
    try:
        code = train(ctx, task, on_step)
        if after_train is not None and code == 0:
            after_train(ctx)
    finally:
        ctx.writer.close()
    dist.barrier()
    shutdown()
    return code


def main_wrapper(fn: Callable[[], int]) -> None:
    """Exit with the run's code (17 = preempted, see slurm/*.sh)."""
    sys.exit(fn())


__all__ = ["Task", "StepBatches", "TrainContext", "run", "setup", "train", "evaluate", "reduce_metrics",
           "ps", "main_wrapper"]
