"""The one training loop and the one run lifecycle. Pretraining, SFT, reward modelling and PPO all run through
`run()`; they differ only in their Task: its data, its forward step / loss and (optionally) its model head.

Read top to bottom: what a driver supplies (a `TaskBase` subclass: every optional part has a no-op default) ->
the one rule "am I resuming?" (`start_of_run`) -> one optimizer step and one evaluation (megatron-core's pipeline
schedule) -> set-up: task set-up, the config it completes (validated again, frozen), model, optimizer, then
resume / initialise from another run's weights / seeded start -> the training loop: steps, metrics, eval,
checkpoints (with the task's checkpointables), preemption -> `run()`, the whole lifecycle.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import finalize_model_grads

from hcx_megatron.config.args import Config, validate_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.distributed.initialize import initialize_distributed, shutdown
from hcx_megatron.model.builder import BuiltModel, ModelFactory, build_model, sync_params_before_read, unwrap
from hcx_megatron.training import heartbeat, signals
from hcx_megatron.training.checkpoint import (holds_checkpoint, load_checkpoint, load_model_weights,
                                              resolve_checkpoint, save_checkpoint)
from hcx_megatron.training.metrics import MetricsWriter, memory_gb, step_throughput
from hcx_megatron.training.optimizer import build_optimizer
from hcx_megatron.training.schedule import run_schedule


# ---------------------------------------------------------------------------------------------------------
# what a driver supplies
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepBatches:
    """The micro-batches of one optimizer step for this rank."""

    microbatches: list[dict[str, torch.Tensor]]
    seq_length: int
    micro_batch_size: int
    global_tokens: int  # tokens in the whole global batch (all DP ranks), for throughput


@dataclass(frozen=True)
class TaskSetup:
    """What a task learned in its set-up that the config must say before the model is built."""

    vocab_size: int | None = None  # the run's tokenizer vocabulary (hcx_megatron.pretrain.run_vocab_size)


class Checkpointable(Protocol):
    """Something besides the model and optimizer that each checkpoint holds (e.g. PPO's critic)."""

    name: str

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        """Write into the checkpoint directory being written; called on every rank before its commit."""

    def load(self, ckpt_dir: str, iteration: int) -> None:
        """Restore from the checkpoint the run resumes from."""


class TaskBase:
    """A driver's task. `train_batches` and `forward_step` are required; every other part has a no-op default.
    Hooks do no hidden work: checkpoint I/O belongs to the loop (state_dict and checkpointables)."""

    metric_keys: list[str] = []  # keys of the [sum, count] pairs its loss function reports, e.g. ["lm loss"]
    # Parameter-name prefixes this task's model adds to a plain decoder (a value head): a start from another run's
    # weights may lack them, and they keep their seeded initialisation.
    new_parameters: tuple[str, ...] = ()

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        """After process groups exist, before the model is built: tokenizer, data. Never mutates `cfg`."""
        return TaskSetup()

    def model_factory(self, cfg: Config, impl: str) -> ModelFactory | None:
        """None for the plain GPTModel; drivers with a value/reward head return their own factory."""
        return None

    def train_batches(self, iteration: int) -> StepBatches:
        """Micro-batches of optimizer step `iteration` (0-based). Must depend only on `iteration`."""
        raise NotImplementedError

    def eval_batches(self, eval_index: int) -> list[StepBatches]:
        """Validation steps; empty when the task has no validation data."""
        return []

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module):
        """megatron-core forward_step_func: returns (output_tensor, loss_func); loss_func(output) returns
        (loss_sum, num_tokens, {key: tensor([sum, count])})."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Extra state stored with the checkpoint. Pure: no I/O, no collectives."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def checkpointables(self) -> list[Checkpointable]:
        """What else the loop saves into each checkpoint (before its commit) and loads on resume."""
        return []

    def before_train(self, ctx: TrainContext) -> None:
        """The model is built and started (resumed, initialised or seeded), before the first step (PPO starts
        the models it trains against here)."""

    def on_step(self, ctx: TrainContext, record: dict) -> None:
        """After each optimizer step, before eval and checkpoint."""

    def agree_stop(self, preempted: bool) -> bool:
        """This rank's preemption decision -> the job's (jobs of several rank partitions stop together)."""
        return preempted

    def after_save(self, ctx: TrainContext) -> None:
        """After each checkpoint is committed."""

    def after_train(self, ctx: TrainContext, code: int) -> None:
        """Training returned `code`: 0 after its last step (or --exit-interval), 17 preempted (and saved); not
        called when it raised. SFT's generation eval runs at 0; PPO releases its other models either way."""

    def close(self) -> None:
        """Release what set-up started (loader workers, threads). Always called by run(), also on error."""


# ---------------------------------------------------------------------------------------------------------
# the one rule "am I resuming?"
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InitFrom:
    """Start from another run's weights (weights only) when --load holds no checkpoint of this run."""

    path: str
    flag: str = "--pretrained-checkpoint"  # named in errors


@dataclass(frozen=True)
class RunStart:
    kind: str  # "resume": --load's checkpoint, all state | "init": weights only from `path` | "scratch": seeded
    path: str | None = None


def start_of_run(cfg: Config, init_from: InitFrom | None = None) -> RunStart:
    """--load holding a checkpoint wins: resume it (with --finetune, Megatron-LM's meaning: its weights only, a
    new run from iteration 0). Otherwise start from `init_from` (default: --pretrained-checkpoint) when given,
    so a requeued job resumes its own run instead of starting over. Otherwise a seeded start."""
    ck = cfg.checkpoint
    if holds_checkpoint(ck.load):
        return RunStart("init" if ck.finetune else "resume", ck.load)
    if ck.finetune:
        raise FileNotFoundError(f"--finetune: --load {ck.load!r} holds no checkpoint")
    if init_from is None and ck.pretrained_checkpoint:
        init_from = InitFrom(ck.pretrained_checkpoint)
    if init_from is not None:
        if not holds_checkpoint(init_from.path):
            raise FileNotFoundError(f"{init_from.flag} {init_from.path!r} holds no checkpoint")
        return RunStart("init", init_from.path)
    return RunStart("scratch")


# ---------------------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainContext:
    cfg: Config  # the run's frozen config (the task's set-up applied)
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


def train_step(ctx: TrainContext, task: TaskBase, batches: StepBatches) -> tuple[dict[str, float], float, bool]:
    for chunk in ctx.chunks:
        chunk.zero_grad_buffer()
    ctx.optimizer.zero_grad()
    losses = run_schedule(ctx.chunks, batches.microbatches, task.forward_step, batches.seq_length,
                          batches.micro_batch_size, forward_only=False)
    ok, grad_norm, _ = ctx.optimizer.step()
    if ok:
        ctx.scheduler.step(increment=ctx.cfg.training.global_batch_size)
    return reduce_metrics(losses, task.metric_keys, ctx.device), float(grad_norm or 0.0), bool(ok)


@torch.no_grad()
def evaluate(ctx: TrainContext, task: TaskBase, eval_index: int) -> dict[str, float] | None:
    steps = task.eval_batches(eval_index)
    if not steps:
        return None
    # The forward pre-hooks would gather too, but a task's eval step may read weights outside the forward.
    sync_params_before_read(ctx.chunks)
    for chunk in ctx.chunks:
        chunk.eval()
    all_losses = []
    for batches in steps:
        all_losses += run_schedule(ctx.chunks, batches.microbatches, task.forward_step, batches.seq_length,
                                   batches.micro_batch_size, forward_only=True)
    for chunk in ctx.chunks:
        chunk.train()
    return reduce_metrics(all_losses, task.metric_keys, ctx.device)


# ---------------------------------------------------------------------------------------------------------
# set-up: task -> config -> model, optimizer -> resume / init / scratch
# ---------------------------------------------------------------------------------------------------------
def completed_config(cfg: Config, learned: TaskSetup) -> Config:
    """The run's config: `cfg` with what the task's set-up learned, validated again and frozen."""
    if not isinstance(learned, TaskSetup):
        raise TypeError(f"Task.setup must return a TaskSetup, got {type(learned).__name__}")
    if learned.vocab_size is not None and learned.vocab_size != cfg.model.vocab_size:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=learned.vocab_size))
    validate_config(cfg)
    return freeze(cfg)


def _connect_schedule_hooks(cfg: Config, built: BuiltModel, optimizer) -> None:
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


def begin(ctx: TrainContext, task: TaskBase, start: RunStart) -> None:
    """Resume (model, optimizer, scheduler, iteration, RNG, task state, checkpointables), initialise the weights
    from another run, or keep the seeded initialisation."""
    ck, rank0 = ctx.cfg.checkpoint, dist.get_rank() == 0
    if start.kind == "resume":
        ckpt = resolve_checkpoint(start.path)
        iteration, extra = load_checkpoint(ckpt, ctx.chunks, ctx.optimizer, ctx.scheduler,
                                           load_optim=not ck.no_load_optim, load_rng=not ck.no_load_rng)
        ctx.iteration = iteration
        task.load_state_dict(extra)
        for item in task.checkpointables():
            item.load(ckpt, iteration)
        note = ""
    elif start.kind == "init":
        fresh = load_model_weights(start.path, ctx.chunks, allow_missing=task.new_parameters)
        ctx.optimizer.reload_model_params()  # fp32 master copies follow the loaded weights
        note = " (weights only" + (f"; fresh: {', '.join(fresh)}" if fresh else "") + ")"
    else:
        if ck.load and rank0:
            print(f"[hcx] --load {ck.load}: no checkpoint yet, starting from scratch", flush=True)
        return
    ctx.writer.write({"kind": "event", "event": "load", "start": start.kind, "iteration": ctx.iteration,
                      "path": start.path, "finetune": start.kind == "init"})
    if rank0:
        print(f"[hcx] {start.kind}: loaded {start.path}, starting at iteration {ctx.iteration}{note}", flush=True)


def setup(cfg: Config, task: TaskBase, init_from: InitFrom | None = None) -> TrainContext:
    """Everything before the first step: this process's start (signal handlers, process groups, the global RNG
    seeds), then the task's model (`setup_model`)."""
    start = start_of_run(cfg, init_from)  # before any process group: a missing checkpoint fails early
    signals.install_handlers()
    _, device = initialize_distributed(cfg)
    return setup_model(cfg, task, device, start)


def setup_model(cfg: Config, task: TaskBase, device: str, start: RunStart) -> TrainContext:
    """One trained model in a started process: task set-up, the completed config, model, optimizer, scheduler and
    the start of the run. It reseeds no global RNG and draws from none (weights are seeded per parameter,
    model/init.py), so several models in one process (PPO's colocated actor and critic) may be set up in any
    order; only a resume with RNG state (not --no-load-rng) sets the global RNGs."""
    cfg = completed_config(cfg, task.setup(cfg, device))
    built = build_model(cfg, device, factory=task.model_factory(cfg, "auto"))
    optimizer, scheduler = build_optimizer(cfg, built.chunks)
    _connect_schedule_hooks(cfg, built, optimizer)
    writer = MetricsWriter(cfg.logging.metrics_jsonl, cfg.logging.tensorboard_dir, dist.get_rank() == 0,
                           cfg.training.train_iters)
    ctx = TrainContext(cfg, device, built, optimizer, scheduler, writer)
    begin(ctx, task, start)
    return ctx


# ---------------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------------
def save(ctx: TrainContext, task: TaskBase) -> None:
    """One checkpoint: model, optimizer, scheduler, task state, then the task's checkpointables into the same
    directory before its commit."""
    c = ctx.cfg.checkpoint
    items = task.checkpointables()
    save_checkpoint(c.save, ctx.iteration, ctx.chunks, ctx.optimizer, ctx.scheduler, ctx.cfg.to_dict(),
                    extra=task.state_dict(), save_optim=not c.no_save_optim,
                    before_commit=lambda tmp: [item.save(tmp, ctx.iteration) for item in items])
    ctx.writer.write({"kind": "event", "event": "save", "iteration": ctx.iteration, "path": c.save})
    task.after_save(ctx)


def train(ctx: TrainContext, task: TaskBase) -> int:
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
        heartbeat.beat(ctx.iteration)  # the launcher's hang watchdog (launch/watchdog.py) reads it
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
        task.on_step(ctx, record)
        if t.eval_interval and ctx.iteration % t.eval_interval == 0:
            ev = evaluate(ctx, task, ctx.iteration // t.eval_interval)
            if ev is not None:
                ctx.writer.write({"kind": "eval", "iteration": ctx.iteration, **ev})
                if dist.get_rank() == 0:
                    print(f"[eval] iter {ctx.iteration} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items()),
                          flush=True)
        preempted = task.agree_stop(signals.any_rank_received(ctx.device))
        exiting = bool(t.exit_interval and ctx.iteration % t.exit_interval == 0)
        periodic = bool(cfg.checkpoint.save_interval and ctx.iteration % cfg.checkpoint.save_interval == 0)
        if cfg.checkpoint.save and (periodic or preempted or exiting):
            save(ctx, task)
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
        save(ctx, task)
    return 0


# ---------------------------------------------------------------------------------------------------------
# the whole lifecycle
# ---------------------------------------------------------------------------------------------------------
def run(cfg: Config, task: TaskBase, init_from: InitFrom | None = None) -> int:
    """Start processes -> task set-up -> build -> resume / init / scratch (`start_of_run`) -> train ->
    after_train -> close -> shutdown. `cfg` is the driver's validated, frozen config. Returns the exit code."""
    ctx = None
    try:
        ctx = setup(cfg, task, init_from)
        task.before_train(ctx)
        code = train(ctx, task)
        task.after_train(ctx, code)
    finally:
        task.close()
        if ctx is not None:
            ctx.writer.close()
    dist.barrier()
    shutdown()
    return code


def main_wrapper(fn: Callable[[], int]) -> None:
    """Exit with the run's code (17 = preempted, see slurm/*.sh)."""
    sys.exit(fn())


__all__ = ["TaskBase", "TaskSetup", "Checkpointable", "InitFrom", "RunStart", "start_of_run", "StepBatches",
           "TrainContext", "run", "setup", "setup_model", "begin", "train", "train_step", "save", "evaluate",
           "reduce_metrics", "completed_config", "ps", "main_wrapper"]
