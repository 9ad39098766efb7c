"""Pieces shared by the reward-model and PPO drivers: initialising a model from another model's checkpoint
(SFT -> reward model backbone, reward model -> critic, SFT -> actor/reference), the checkpoint's model shape,
and the data-flag shim for the shared parser."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from hcx_megatron.config.args import Config
from hcx_megatron.training.checkpoint import SHARDING_METADATA, read_saved_config, resolve_checkpoint


def model_keys(chunks) -> list[str]:
    # Same naming as hcx_megatron.training.checkpoint (one key per virtual pipeline chunk).
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def load_model_weights(path: str, chunks, allow_missing: Sequence[str] = ()) -> list[str]:
    """Load the weights that `path` (a --save root or an iter_ directory) holds for `chunks`, in any layout.

    Keys the checkpoint lacks must start with one of `allow_missing` (e.g. "value_head." when a reward model
    starts from an SFT checkpoint); they keep their fresh initialisation. Keys only the checkpoint has (e.g. the
    SFT model's output_layer) are ignored. Returns the missing keys that were allowed."""
    ckpt = resolve_checkpoint(path)
    available = set(dist_checkpointing.load_tensors_metadata(ckpt).keys())
    sd, skipped = {}, []
    from hcx_megatron.model.builder import unwrap

    # Checkpoint keys are those of the bare model (hcx_megatron.training.checkpoint unwraps DDP); checkpoints
    # written before that change carry DDP's "module." level, and load through the wrapped chunk.
    prefixed = any(k.startswith("module.") for k in available)
    target = [c if prefixed and hasattr(c, "module") else unwrap(c) for c in chunks]
    for key, chunk in zip(model_keys(chunks), target):
        full = chunk.sharded_state_dict(metadata=SHARDING_METADATA)
        if prefixed and not hasattr(chunk, "module"):  # a bare (frozen) model reading an old checkpoint
            for item in full.values():
                if isinstance(getattr(item, "key", None), str):
                    item.key = "module." + item.key
        keep = {}
        for name, item in full.items():
            global_key = getattr(item, "key", None)
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or global_key in available:
                keep[name] = item
            elif any(_strip(name).startswith(p) or _strip(global_key).startswith(p) for p in allow_missing):
                skipped.append(name)
            else:
                raise KeyError(f"{ckpt}: checkpoint has no tensor {global_key!r} needed by this model "
                               f"(different architecture or model shape?)")
        sd[key] = keep
    loaded = dist_checkpointing.load(sd, ckpt)
    for key, chunk in zip(model_keys(chunks), target):
        # nn.Module's own load_state_dict: megatron's DDP override returns nothing, and we want missing keys.
        result = torch.nn.Module.load_state_dict(chunk, loaded[key], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")
                   and not any(_strip(k).startswith(p) for p in allow_missing)]
        if missing:
            raise KeyError(f"{ckpt}: weights missing after load: {missing[:5]}")
    return skipped


def apply_checkpoint_model_shape(cfg: Config, path: str) -> None:
    """Take the model shape (and vocabulary size) from the checkpoint a run starts from, so --model-preset
    need not repeat it. A shape given on the command line that differs is an error, not silently replaced."""
    saved = read_saved_config(path)["model"]
    from hcx_megatron.config.model import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg.model = ModelConfig(**{k: v for k, v in saved.items() if k in names})


def with_data_flag(argv: Sequence[str] | None) -> list[str]:
    """The shared parser insists on --data-path or --mock-data (pretraining data). RLHF drivers read their own
    JSONL flags, so --mock-data is added to satisfy that check; it has no effect on these drivers."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "--mock-data" not in args and "--data-path" not in args:
        args.append("--mock-data")
    return args


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


@torch.no_grad()
def copy_weights(dst_chunks, src_chunks) -> None:
    """dst <- src parameter values (same architecture and layout), e.g. the rollout actor snapshot."""
    from hcx_megatron.model.builder import unwrap

    for d, s in zip(dst_chunks, src_chunks):
        for (nd, pd), (ns, ps_) in zip(unwrap(d).named_parameters(), unwrap(s).named_parameters()):
            if nd != ns:
                raise RuntimeError(f"weight copy: parameter order differs ({nd} vs {ns})")
            pd.copy_(ps_)


__all__ = ["load_model_weights", "apply_checkpoint_model_shape", "with_data_flag", "flag_given", "rank0",
           "freeze", "copy_weights", "model_keys", "reject_context_parallel",
           "reject_pretraining_loader_flags"]
