"""Pieces shared by the reward-model and PPO drivers: initialising a model from another model's checkpoint
(SFT -> reward model backbone, reward model -> critic, SFT -> actor/reference), the checkpoint's model shape,
and the flags these drivers refuse."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from hcx_megatron.config.args import Config, ConfigError
# model_keys and load_model_weights live with the checkpoint module; re-exported for the PPO modules.
from hcx_megatron.training.checkpoint import load_model_weights, model_keys, read_saved_config  # noqa: F401


def apply_checkpoint_model_shape(cfg: Config, path: str, explicit: dict[str, tuple[str, object]]) -> None:
    """Resolve step (before validation and freezing): take the model shape (and vocabulary size) from the
    checkpoint a run starts from, so --model-preset need not repeat it. `explicit`: the shape flags given on the
    command line (hcx_megatron.config.args.explicit_model_flags); one that differs from the checkpoint is an error
    naming the flag, never silently replaced. The caller validates the result."""
    from hcx_megatron.config.model import ModelConfig

    saved = read_saved_config(path)["model"]
    for flag, (name, value) in explicit.items():
        if name in saved and saved[name] != value:
            raise ConfigError(f"{flag} {value} differs from the checkpoint this run starts from ({path}: "
                              f"{name}={saved[name]}); drop the flag (the shape comes from the checkpoint)")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg.model = ModelConfig(**{k: v for k, v in saved.items() if k in names})


def flag_given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def reject_context_parallel(cfg: Config, program: str) -> None:
    """Reward-model and PPO batches are not sliced per context-parallel rank (their losses read per-sequence
    values at the last prompt/response positions, which CP would scatter over ranks): with CP > 1 every rank would
    train on the whole sequence. Refuse the flag before any process starts."""
    cp = cfg.parallel.context_parallel_size
    if cp > 1:
        raise SystemExit(f"{program}: --context-parallel-size {cp} is not supported for reward modelling and PPO "
                         "(their batches are not split per context-parallel rank); use 1")


def reject_pretraining_loader_flags(cfg: Config, program: str) -> None:
    """--dataloader dali / --num-workers drive the pretraining loaders (hcx_megatron/data/loaders.py); reward and
    PPO batches are built in the training process. Refuse them rather than ignore them."""
    d = cfg.data
    if d.dataloader != "torch" or d.num_workers:
        raise SystemExit(f"{program}: --dataloader {d.dataloader} --num-workers {d.num_workers}: these flags apply to "
                         "pretraining only; use --dataloader torch --num-workers 0")


def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def freeze(chunks) -> None:
    for c in chunks:
        c.eval()
        for p in c.parameters():
            p.requires_grad_(False)


__all__ = ["load_model_weights", "apply_checkpoint_model_shape", "flag_given", "rank0",
           "freeze", "model_keys", "reject_context_parallel",
           "reject_pretraining_loader_flags"]
