"""megatron-core on CPU for the converter: process groups (1 process, or torchrun ranks), the HCX model built
with hcx_megatron's own builder, checkpoint load, logits and greedy decoding.

Used by import (build at TP1/PP1, fill, save), `--verify`, and `python -m hcx_megatron.convert.mcore_forward`.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import torch
from megatron.core.transformer.module import MegatronModule

from hcx_megatron.config.args import Config, build_parser, config_from_args, validate_config
from hcx_megatron.config.model import ModelConfig
# Import megatron's model modules BEFORE cpu_mode patches torch.cuda: torch.compile-decorated functions in
# megatron (jit_fuser) are registered at import time and dynamo rejects the patched torch.cuda functions.
from hcx_megatron.model.builder import build_model
from hcx_megatron.training.checkpoint import load_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_config(model: ModelConfig, tp: int = 1, pp: int = 1, world_size: int | None = None,
               seed: int = 1234, bf16: bool = False) -> Config:
    """A validated CPU Config for `model` at TP x PP (no data: the converter never trains). Raises
    ConfigError (naming the flag) when the model cannot be laid out that way."""
    world = world_size or tp * pp
    seq = min(128, model.max_position_embeddings)
    dp = world // (tp * pp) if world % (tp * pp) == 0 else 1
    argv = ["--device", "cpu", "--transformer-impl", "local",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--micro-batch-size", "1", "--global-batch-size", str(max(1, dp)), "--seq-length", str(seq),
            "--seed", str(seed)] + (["--bf16"] if bf16 else [])
    cfg = config_from_args(build_parser().parse_args(argv), world_size=world)
    cfg.model = dataclasses.replace(model)
    validate_config(cfg)
    return cfg


def init_processes(cfg: Config) -> None:
    """torch.distributed + megatron parallel_state. Outside torchrun this process becomes a 1-rank world."""
    from hcx_megatron.distributed.initialize import initialize_distributed

    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    initialize_distributed(cfg)


def shutdown_processes() -> None:
    """Tear down process groups and undo CPU mode's torch patches."""
    from hcx_megatron.distributed import cpu_mode
    from hcx_megatron.distributed.initialize import shutdown

    shutdown()
    cpu_mode.deactivate()


class CheckpointWrapper(MegatronModule):
    """Stands in for megatron's DDP wrapper: same `module.` key prefix in (sharded) state dicts, but without
    DDP's gradient buffers (the converter never trains, and those would double the memory)."""

    def __init__(self, chunk: torch.nn.Module):
        super().__init__(config=chunk.config)
        self.module = chunk

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_chunks(cfg: Config, padded_vocab_size: int | None = None,
                 initialize: bool = False) -> list[CheckpointWrapper]:
    """This rank's model chunks via hcx_megatron.model.builder. `padded_vocab_size` overrides the vocabulary
    rows (the importer builds at TP1 with the padding of the target TP)."""
    build_cfg = cfg
    if padded_vocab_size is not None and padded_vocab_size != cfg.padded_vocab_size:
        tp = cfg.parallel.tensor_model_parallel_size
        multiple = padded_vocab_size // tp
        model = dataclasses.replace(cfg.model, make_vocab_size_divisible_by=multiple)
        build_cfg = dataclasses.replace(cfg, model=model)
        if build_cfg.padded_vocab_size != padded_vocab_size:
            raise ValueError(f"cannot build a model with {padded_vocab_size} vocabulary rows at TP{tp}")
    built = build_model(build_cfg, "cpu", wrap_ddp=False, initialize=initialize)
    chunks = [CheckpointWrapper(c) for c in built.chunks]
    for c in chunks:
        c.eval()
    return chunks


def load_into(chunks, path: str) -> int:
    """Load model weights only (any saved layout). Returns the checkpoint's iteration."""
    iteration, _ = load_checkpoint(path, chunks, optimizer=None, scheduler=None, load_optim=False, load_rng=False)
    return iteration


@torch.no_grad()
def logits(chunks, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary fp32 logits [b, s, vocab_size] (Megatron's padding rows cut). PP must be 1."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if len(chunks) != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("the converter's forward runs with --pipeline-model-parallel-size 1 (any TP)")
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    out = chunks[0](tokens, position_ids, None)  # [b, s, V/TP]: GPTModel keeps the vocab split across TP
    out = gather_from_tensor_model_parallel_region(out)
    return out[..., :vocab_size].float()


@torch.no_grad()
def greedy(chunks, prompt: list[int], new_tokens: int, vocab_size: int) -> list[int]:
    """Greedy continuation without a KV cache (recomputes the prefix; fine for verification sizes)."""
    ids = list(prompt)
    for _ in range(new_tokens):
        nxt = int(logits(chunks, torch.tensor([ids]), vocab_size)[0, -1].argmax())
        ids.append(nxt)
    return ids[len(prompt):]
