"""Pretraining driver: `python -m hcx_megatron.pretrain` (console script `hcx-pretrain`).

Megatron-LM flags, e.g. (4 CPU processes, TP2 x PP2):
    torchrun --nproc-per-node 4 -m hcx_megatron.pretrain --model-preset hcx-tiny --device cpu \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --micro-batch-size 2 \
        --global-batch-size 8 --seq-length 128 --train-iters 20 --mock-data --save runs/demo/ckpt
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
from megatron.core import parallel_state as ps

from hcx_megatron.config.args import Config, ConfigError, parse_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.data.context_parallel import slice_batch_for_context_parallel
from hcx_megatron.data.gpt_datasets import GlobalBatchIterator, build_gpt_datasets, sample_counts
from hcx_megatron.data.loaders import build_step_loader
from hcx_megatron.distributed.env import world_size_from_env
from hcx_megatron.training.loop import StepBatches, TaskBase, TaskSetup, main_wrapper, run, start_of_run


def lm_loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Sum of per-token losses under the mask, the token count, and the [sum, count] pair for logging.
    megatron-core (calculate_per_token_loss) divides gradients by the global token count."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    if device != "cuda":
        return batch
    return {k: v.cuda(non_blocking=True) for k, v in batch.items()}


@dataclasses.dataclass
class Phase:
    start_iteration: int
    seq_length: int


def sequence_phases(cfg: Config) -> list[Phase]:
    """HCX's context schedule: --seq-length first, then --long-context-seq-length for the final fraction."""
    t = cfg.training
    phases = [Phase(0, t.seq_length)]
    if t.long_context_seq_length:
        start = int(round(t.train_iters * t.long_context_start_fraction))
        if 0 < start < t.train_iters:
            phases.append(Phase(start, t.long_context_seq_length))
    return phases


def load_run_tokenizer(cfg: Config):
    """The run's tokenizer: --tokenizer-model, or without one (--mock-data) a NullTokenizer over the preset's
    vocabulary. Reads files only; the model's vocabulary follows from it (`run_vocab_size`)."""
    from hcx_megatron.tokenizer import build_tokenizer

    if cfg.data.tokenizer_model:
        return build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    return build_tokenizer("NullTokenizer", None, cfg.model.vocab_size)


def run_vocab_size(cfg: Config, tokenizer) -> int:
    """The vocabulary the model is built with (Megatron padding goes on top of it): a real tokenizer's size, or
    the preset's with --mock-data. A run starting from a checkpoint (`start_of_run`) whose vocabulary is larger
    takes the checkpoint's size: open models (imported with `from-hf`) often have more embedding rows than their
    tokenizer has tokens. A tokenizer larger than the checkpoint's vocabulary is refused, naming
    tools/extend_vocab.py (which resizes both)."""
    from hcx_megatron.training.checkpoint import read_saved_config

    if not cfg.data.tokenizer_model:
        return cfg.model.vocab_size
    start = start_of_run(cfg)
    saved_vocab = (read_saved_config(start.path).get("model") or {}).get("vocab_size") if start.path else None
    if saved_vocab is not None and saved_vocab < tokenizer.vocab_size:
        raise ValueError(
            f"--tokenizer-model {cfg.data.tokenizer_model} has {tokenizer.vocab_size} tokens but the checkpoint "
            f"at {start.path} has a vocabulary of {saved_vocab}: resize the checkpoint's embedding and output "
            "layers with tools/extend_vocab.py (--load CKPT --save NEW_CKPT --new-vocab-size N, or together with "
            "the tokenizer extension) and load NEW_CKPT")
    return max(tokenizer.vocab_size, int(saved_vocab or 0))


def check_pretrain_config(cfg: Config) -> None:
    """Pretraining's own checks (the shared validate_config knows nothing of the drivers' data)."""
    if not (cfg.data.mock_data or cfg.data.data_path):
        raise ConfigError("give --data-path PREFIX [...] or --mock-data")


class PretrainTask(TaskBase):
    metric_keys = ["lm loss"]

    def __init__(self):
        self.cfg: Config | None = None
        self.device = "cpu"
        self.tokenizer = None
        self._phase_data: dict[int, tuple] = {}

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, cfg: Config, device: str) -> TaskSetup:
        self.cfg, self.device = cfg, device
        self.tokenizer = load_run_tokenizer(cfg)
        self.phases = sequence_phases(cfg)
        return TaskSetup(vocab_size=run_vocab_size(cfg, self.tokenizer))

    def _phase(self, iteration: int) -> tuple[int, Phase]:
        idx = max(i for i, p in enumerate(self.phases) if p.start_iteration <= iteration)
        return idx, self.phases[idx]

    def _datasets(self, idx: int):
        if idx not in self._phase_data:
            cfg, phase = self.cfg, self.phases[idx]
            end = self.phases[idx + 1].start_iteration if idx + 1 < len(self.phases) else cfg.training.train_iters
            counts = sample_counts(cfg, end - phase.start_iteration)
            train, valid, _ = build_gpt_datasets(cfg, self.tokenizer, phase.seq_length, counts)
            t = cfg.training
            for loader, _ in self._phase_data.values():
                loader.close()  # an earlier phase's queue (and its workers) is not read again
            # Training steps come from a prefetching loader (--dataloader); evaluation reads synchronously.
            self._phase_data[idx] = (
                build_step_loader(cfg, train, end - phase.start_iteration, self.device,
                                  ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()),
                GlobalBatchIterator(valid, t.global_batch_size, t.micro_batch_size) if valid is not None else None,
            )
        return self._phase_data[idx]

    # -- batches --------------------------------------------------------------------------------------
    def _step(self, it: GlobalBatchIterator, consumed: int, seq_length: int) -> StepBatches:
        t = self.cfg.training
        micro = [to_device(b, self.device) for b in it.microbatches(consumed)]
        return StepBatches(micro, seq_length, t.micro_batch_size, t.global_batch_size * seq_length)

    def train_batches(self, iteration: int) -> StepBatches:
        idx, phase = self._phase(iteration)
        loader, _ = self._datasets(idx)
        t = self.cfg.training
        micro = loader.step(iteration - phase.start_iteration)  # already on the device
        return StepBatches(micro, phase.seq_length, t.micro_batch_size, t.global_batch_size * phase.seq_length)

    def eval_batches(self, eval_index: int) -> list[StepBatches]:
        idx, phase = self._phase(max(0, eval_index * self.cfg.training.eval_interval - 1))
        _, valid = self._datasets(idx)
        if valid is None:
            return []
        t = self.cfg.training
        first = eval_index * t.eval_iters * t.global_batch_size
        return [self._step(valid, (first + k * t.global_batch_size) % max(1, len(valid.dataset)), phase.seq_length)
                for k in range(t.eval_iters)]

    # -- model ----------------------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        batch = slice_batch_for_context_parallel(next(data_iterator))  # this CP rank's share; whole at CP 1
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(lm_loss_func, batch["loss_mask"])

    def close(self) -> None:
        for loader, _ in self._phase_data.values():
            loader.close()


def main(argv=None) -> int:
    cfg, _ = parse_config(argv, description="HCX pretraining on megatron-core", world_size=world_size_from_env(),
                          extra_checks=check_pretrain_config)
    return run(freeze(cfg), PretrainTask())


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["PretrainTask", "lm_loss_func", "sequence_phases", "load_run_tokenizer", "run_vocab_size",
           "check_pretrain_config", "main", "ps"]
