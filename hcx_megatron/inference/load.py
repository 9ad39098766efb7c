"""Load a training checkpoint (pretrain / SFT / any driver of the shared loop) for inference, in any TP x PP
layout: the model shape comes from the checkpoint's hcx_config.json, the layout from the caller, and
dist_checkpointing reshards the weights."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from typing import Any

from hcx_megatron.config.args import (
    CheckpointConfig, Config, DataConfig, LoggingConfig, ParallelConfig, RuntimeConfig, TrainingConfig,
)
from hcx_megatron.config.model import ModelConfig


def _build(cls, values: dict[str, Any] | None):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})


def config_from_saved(saved: dict[str, Any], tensor_parallel: int = 1, pipeline_parallel: int = 1,
                      device: str = "auto", world_size: int = 1) -> Config:
    """The saved run's Config with an inference layout: no optimizer state, no data, the given TP x PP."""
    if "model" not in saved:
        raise ValueError("hcx_config.json has no 'model' section; not a checkpoint written by hcx_megatron")
    cfg = Config(
        model=_build(ModelConfig, saved.get("model")),
        parallel=ParallelConfig(tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel),
        training=_build(TrainingConfig, saved.get("training")),
        data=_build(DataConfig, saved.get("data")),
        checkpoint=CheckpointConfig(),
        logging=LoggingConfig(),
        runtime=dataclasses.replace(_build(RuntimeConfig, saved.get("runtime")), device=device, world_size=world_size,
                                    fp8_format=None),
    )
    cfg.training.bf16 = bool(saved.get("training", {}).get("bf16", False)) and device != "cpu"
    cfg.training.recompute_granularity = cfg.training.recompute_method = None
    cfg.training.recompute_num_layers = None
    # Prompts of different lengths are generated in one process: let pipeline p2p exchange shapes.
    cfg.training.variable_seq_lengths = True
    return cfg


@dataclass
class InferenceModel:
    cfg: Config
    chunks: list
    tokenizer: Any
    device: str


def load_for_inference(load: str, tensor_parallel: int = 1, pipeline_parallel: int = 1, device: str = "auto",
                       tokenizer_model: str | None = None, with_tokenizer: bool = True) -> InferenceModel:
    """Start processes (torchrun/Slurm/MPI env, or a single process), build the model and load `load`.
    with_tokenizer=False: token ids in and out only (benchmarks); the returned tokenizer is None."""
    import torch.distributed as dist

    from hcx_megatron.distributed.env import resolve_dist_env
    from hcx_megatron.distributed.initialize import initialize_distributed
    from hcx_megatron.model.builder import build_model
    from hcx_megatron.tokenizer import build_tokenizer
    from hcx_megatron.training.checkpoint import load_checkpoint, read_saved_config

    saved = read_saved_config(load)
    env = resolve_dist_env()
    if env.source == "single" and "MASTER_PORT" not in os.environ:
        # A lone process still needs a rendezvous port: take a free one so several chats can run side by side.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
        env = resolve_dist_env()
    if env.world_size % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {env.world_size} is not divisible by TP {tensor_parallel} x PP {pipeline_parallel}")
    cfg = config_from_saved(saved, tensor_parallel, pipeline_parallel, device, env.world_size)
    tok_dir = tokenizer_model or cfg.data.tokenizer_model
    if with_tokenizer and not tok_dir:
        raise ValueError(f"{load}: the run had no --tokenizer-model; pass --tokenizer-model DIR")
    tokenizer = build_tokenizer(cfg.data.tokenizer_type, tok_dir) if with_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"--tokenizer-model {tok_dir} has {tokenizer.vocab_size} tokens but the checkpoint was "
                         f"trained with {cfg.model.vocab_size}")
    _, dev = initialize_distributed(cfg)
    built = build_model(cfg, dev, wrap_ddp=False, initialize=False)
    # Bare chunks (no DDP gradient buffers): checkpoint keys are those of the unwrapped GPTModel.
    chunks = built.chunks
    load_checkpoint(load, chunks, optimizer=None, scheduler=None, load_optim=False, load_rng=False)
    if dist.get_rank() == 0:
        print(f"[hcx] loaded {load} (iteration {saved.get('iteration')}) as TP{tensor_parallel} x PP{pipeline_parallel} "
              f"on {dev}", flush=True)
    return InferenceModel(cfg, chunks, tokenizer, dev)


__all__ = ["config_from_saved", "load_for_inference", "InferenceModel"]
