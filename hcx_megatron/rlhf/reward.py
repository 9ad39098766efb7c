"""Reward model driver: `python -m hcx_megatron.rlhf.reward` (console script `hcx-reward`).

Bradley-Terry reward model on the shared training loop: a decoder initialised from an SFT checkpoint
(--sft-checkpoint, the same flag as --pretrained-checkpoint; the run takes its model shape) with a fresh scalar
head on the last pipeline stage (hcx_megatron.model.heads). For each prompt, all K(K-1)/2 comparisons of its
ranked responses are in the same optimisation step; the loss is -log sigmoid(r_better - r_worse) averaged over
the pairs of the global batch. One epoch by default (the HCX / InstructGPT finding: reward models overfit after
one). --global-batch-size and --micro-batch-size count PROMPTS.

After the last step the rewards of a calibration set (--calibration-data, default: the validation split) give a
mean and std that are stored with the checkpoint (task.state_dict() -> extra["reward_calibration"]); inference
(`RewardScorer`) returns clip((r - mean) / std, -c, c) with c = --reward-clip.

Example (2 CPU processes, data parallel):
    torchrun --nproc-per-node 2 -m hcx_megatron.rlhf.reward --device cpu --model-preset hcx-tiny \
        --tokenizer-model TOK --preference-data prefs.jsonl --valid-fraction 0.1 \
        --global-batch-size 8 --micro-batch-size 2 --seq-length 128 --lr 1e-4 --save runs/rm
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config, ConfigError, explicit_model_flags, parse_config, validate_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.config.options import add_options, option, options_from_args
from hcx_megatron.config.sequence import sequence_multiple_for
from hcx_megatron.data.preference import (LoadStats, PreferenceBatcher, build_example, chat_renderer,
                                          eval_shards, read_preference_jsonl, split_indices)
from hcx_megatron.model.heads import scalar_head_factory, sequence_scores
from hcx_megatron.pretrain import load_run_tokenizer, run_vocab_size, to_device
from hcx_megatron.rlhf.common import (apply_checkpoint_model_shape, flag_given, rank0, reject_context_parallel,
                                      reject_pretraining_loader_flags)
from hcx_megatron.training.loop import (StepBatches, TaskBase, TaskSetup, TrainContext, evaluate, main_wrapper, run,
                                        start_of_run)

CALIBRATION_KEY = "reward_calibration"


@dataclass(frozen=True)
class RMOptions:
    """The reward-model driver's own flags, defined once (config/options.py)."""

    preference_data: str = option(help="JSONL {prompt, responses, ranking} (see data/preference.py)")
    preference_valid_data: str | None = option(None, "validation JSONL; default: --valid-fraction of the data")
    valid_fraction: float = option(0.05)
    calibration_data: str | None = option(None, "JSONL whose responses calibrate reward mean/std; default: the "
                                                "validation split")
    rm_epochs: float = option(1.0, "epochs over the training prompts (sets --train-iters unless that is given)")
    reward_clip: float = option(5.0, "normalised rewards are clipped to +-this")


def add_reward_args(parser) -> None:
    g = parser.add_argument_group("reward model")
    add_options(g, RMOptions)
    g.add_argument("--sft-checkpoint", dest="pretrained_checkpoint", default=None,
                   help="initialise the backbone from this SFT checkpoint (= --pretrained-checkpoint)")


# ---------------------------------------------------------------------------------------------------------
# loss
# ---------------------------------------------------------------------------------------------------------
def bradley_terry_terms(scores: torch.Tensor, better: torch.Tensor, worse: torch.Tensor):
    """Per pair: -log sigmoid(r_b - r_w) and whether r_b > r_w."""
    margin = scores[better] - scores[worse]
    return F.softplus(-margin), (margin > 0).float()


def rm_loss_func(batch: dict[str, torch.Tensor], values: torch.Tensor):
    scores = sequence_scores(values, batch["lengths"]).float()
    losses, correct = bradley_terry_terms(scores, batch["better"], batch["worse"])
    n_pairs = torch.tensor(float(batch["better"].numel()), device=scores.device)
    n_seq = torch.tensor(float(scores.numel()), device=scores.device)
    loss_sum = losses.sum()
    stats = torch.stack([loss_sum.detach(), n_pairs])
    return loss_sum, n_pairs.to(torch.int), {
        "lm loss": stats,  # the loop's console line prints "lm loss": here it is the Bradley-Terry loss
        "rm loss": stats,
        "pair acc": torch.stack([correct.sum(), n_pairs]),
        "reward mean": torch.stack([scores.detach().sum(), n_seq]),
        "reward sq": torch.stack([(scores.detach() ** 2).sum(), n_seq]),
    }


@dataclass
class Calibration:
    mean: float = 0.0
    std: float = 1.0
    count: int = 0

    def normalise(self, raw: torch.Tensor, clip: float) -> torch.Tensor:
        return torch.clamp((raw - self.mean) / max(self.std, 1e-6), -clip, clip)


# ---------------------------------------------------------------------------------------------------------
# task
# ---------------------------------------------------------------------------------------------------------
class RewardModelTask(TaskBase):
    metric_keys = ["lm loss", "rm loss", "pair acc", "reward mean", "reward sq"]
    new_parameters = ("value_head.",)  # a start from an SFT checkpoint: the backbone loads, the head is new

    def __init__(self, opts: RMOptions):
        self.opts = opts
        self.calibration: Calibration | None = None
        self.mode = "valid"  # eval_batches serves the validation split, or the calibration set

    def setup(self, cfg: Config, device: str) -> TaskSetup:
        self.cfg, self.device = cfg, device
        self.tokenizer = load_run_tokenizer(cfg)
        render = chat_renderer(self.tokenizer)
        seq = cfg.training.seq_length
        records = read_preference_jsonl(self.opts.preference_data)
        if self.opts.preference_valid_data:
            train_idx, valid_recs = list(range(len(records))), read_preference_jsonl(self.opts.preference_valid_data)
        else:
            train_idx, valid_idx = split_indices(len(records), self.opts.valid_fraction, cfg.training.seed)
            valid_recs = [records[i] for i in valid_idx]
        self.stats = LoadStats()
        build = lambda recs: [build_example(*r, render, seq, self.stats, where) for where, r in recs]  # noqa: E731
        self.train_examples = build([records[i] for i in train_idx])
        self.valid_examples = build(valid_recs)
        self.calib_examples = (build(read_preference_jsonl(self.opts.calibration_data)) if self.opts.calibration_data
                               else self.valid_examples or self.train_examples)
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        multiple = sequence_multiple_for(cfg)  # rows pad to the layout's sequence multiple (SP/CP/FP8)
        t = cfg.training
        pad = self.tokenizer.pad if self.tokenizer.pad >= 0 else self.tokenizer.eod
        self.pad_id, self.multiple_of = pad, multiple
        self.batcher = PreferenceBatcher(self.train_examples, t.global_batch_size, t.micro_batch_size,
                                         self.dp_rank, self.dp_size, t.seed, pad, multiple)
        if rank0():
            s = self.stats
            print(f"[reward] {len(self.train_examples)} train / {len(self.valid_examples)} valid prompts, "
                  f"{s.pairs} comparisons, {s.prompt_truncated} prompts / {s.response_truncated} responses "
                  f"truncated to --seq-length {seq}; {self.batcher.steps_per_epoch} steps per epoch", flush=True)
        return TaskSetup(vocab_size=run_vocab_size(cfg, self.tokenizer))

    def model_factory(self, cfg, impl):
        return scalar_head_factory(cfg, impl)

    def _step(self, examples) -> StepBatches:
        micro = [to_device(b, self.device) for b in self.batcher.microbatches(examples)]
        length = max(b["tokens"].shape[1] for b in micro)
        tokens = sum(int(b["lengths"].sum()) for b in micro) * self.dp_size  # estimate: other ranks alike
        return StepBatches(micro, length, micro[0]["tokens"].shape[0], tokens)

    def train_batches(self, iteration: int) -> StepBatches:
        return self._step(self.batcher.step_examples(iteration))

    def eval_batches(self, eval_index: int) -> list[StepBatches]:
        examples = self.calib_examples if self.mode == "calibration" else self.valid_examples
        mine = eval_shards(examples, self.cfg.training.micro_batch_size, self.dp_rank, self.dp_size)
        if not mine:
            return []
        return [self._step(mine)]

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        values = model(batch["tokens"], batch["position_ids"], None)
        return values, partial(rm_loss_func, batch)

    # -- calibration ----------------------------------------------------------------------------------
    def calibrate(self, ctx: TrainContext) -> Calibration:
        """Reward mean/std over the calibration set (all ranks; forward only)."""
        self.mode = "calibration"
        try:
            stats = evaluate(ctx, self, 0) or {}
        finally:
            self.mode = "valid"
        mean = stats.get("reward_mean", 0.0)
        var = max(stats.get("reward_sq", 1.0) - mean * mean, 0.0)
        n = len(eval_shards(self.calib_examples, self.cfg.training.micro_batch_size, self.dp_rank, self.dp_size))
        self.calibration = Calibration(mean, math.sqrt(var) if var > 0 else 1.0, n * self.dp_size)
        return self.calibration

    def on_step(self, ctx: TrainContext, record: dict) -> None:
        # The calibration must be in the final checkpoint, which the loop saves right after this hook.
        if ctx.iteration == ctx.cfg.training.train_iters:
            cal = self.calibrate(ctx)
            ctx.writer.write({"kind": "event", "event": "reward_calibration", "iteration": ctx.iteration,
                              "mean": cal.mean, "std": cal.std, "count": cal.count,
                              "reward_clip": self.opts.reward_clip})
            if rank0():
                print(f"[reward] calibration over {cal.count} prompts' responses: mean {cal.mean:.4f} "
                      f"std {cal.std:.4f} (stored with the checkpoint)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reward_clip": self.opts.reward_clip}
        if self.calibration is not None:
            out[CALIBRATION_KEY] = {"mean": self.calibration.mean, "std": self.calibration.std,
                                    "count": self.calibration.count}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if CALIBRATION_KEY in state:
            c = state[CALIBRATION_KEY]
            self.calibration = Calibration(float(c["mean"]), float(c["std"]), int(c.get("count", 0)))


# ---------------------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------------------
class RewardScorer:
    """Frozen reward model for PPO: normalised, clipped sequence rewards (`calibration.normalise`)."""

    def __init__(self, chunks, calibration: Calibration, clip: float):
        self.chunks, self.calibration, self.clip = list(chunks), calibration, clip

    @classmethod
    def load(cls, path: str, cfg: Config, device: str, clip: float | None = None) -> "RewardScorer":
        from hcx_megatron.model.builder import build_model
        from hcx_megatron.rlhf.common import freeze
        from hcx_megatron.training.checkpoint import load_checkpoint

        built = build_model(cfg, device, factory=scalar_head_factory(cfg, "auto"), wrap_ddp=False)
        chunks = built.chunks
        _, extra = load_checkpoint(path, chunks, optimizer=None, load_rng=False)
        if CALIBRATION_KEY not in extra:
            raise ValueError(f"{path}: reward checkpoint has no {CALIBRATION_KEY} (train it to its last step)")
        c = extra[CALIBRATION_KEY]
        freeze(chunks)
        return cls(chunks, Calibration(float(c["mean"]), float(c["std"]), int(c.get("count", 0))),
                   float(extra.get("reward_clip", 5.0) if clip is None else clip))

    @torch.no_grad()
    def raw(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Direct forward (pipeline size 1); PPO runs the chunks through the forward-only schedule instead."""
        if len(self.chunks) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("RewardScorer.raw needs --pipeline-model-parallel-size 1")
        pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        return sequence_scores(self.chunks[0](tokens, pos, None), lengths).float()

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.calibration.normalise(self.raw(tokens, lengths), self.clip)


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def resolve_reward_config(argv, world_size: int) -> tuple[Config, RMOptions]:
    """parse -> resolve (the model shape of the checkpoint the run starts from: its own on resume, else the SFT
    checkpoint; --train-iters from --rm-epochs) -> validate once -> freeze."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, ns = parse_config(argv, extra_args=add_reward_args, description="HCX reward model (Bradley-Terry)",
                           world_size=world_size, validate=False)
    opts = options_from_args(ns, RMOptions)
    reject_context_parallel(cfg, "hcx-reward")
    reject_pretraining_loader_flags(cfg, "hcx-reward")
    if not cfg.data.tokenizer_model:
        raise SystemExit("hcx-reward: --tokenizer-model is required (preference data are chat text)")
    try:
        start = start_of_run(cfg)
        if start.path is not None:
            apply_checkpoint_model_shape(cfg, start.path, explicit_model_flags(ns))
        cfg.training.variable_seq_lengths = True  # micro-batches hold different numbers and lengths of sequences
        if not flag_given(argv, "--train-iters"):
            n = len(read_preference_jsonl(opts.preference_data))
            if not opts.preference_valid_data:
                n = len(split_indices(n, opts.valid_fraction, cfg.training.seed)[0])
            cfg.training.train_iters = max(1, math.ceil(opts.rm_epochs * (n // cfg.training.global_batch_size)))
        validate_config(cfg)
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"hcx-reward: error: {exc}") from None
    return freeze(cfg), opts


def main(argv=None) -> int:
    from hcx_megatron.distributed.env import world_size_from_env

    cfg, opts = resolve_reward_config(argv, world_size_from_env())
    return run(cfg, RewardModelTask(opts))


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["RewardModelTask", "RewardScorer", "Calibration", "RMOptions",
           "resolve_reward_config", "bradley_terry_terms", "rm_loss_func", "main", "add_reward_args",
           "CALIBRATION_KEY"]
