"""Checkpoints with megatron-core dist_checkpointing (torch_dist format), shared by every driver.

Layout of `--save DIR`:
    DIR/iter_0000100/                  dist_checkpointing directory (+ hcx_config.json, the run's typed config)
    DIR/latest_checkpointed_iteration.txt   written LAST, by atomic rename

Atomicity: every rank writes into `iter_XXXXXXX.tmp`; only after all ranks finished does rank 0 rename it to
its final name and then replace the tracker file. A run killed mid-save leaves a `.tmp` directory that the
tracker never points to, so the previous checkpoint still loads (and the next save of that iteration clears it).

What a checkpoint holds: model weights (sharded in model space, so they load under any TP/PP/VPP), the
optimizer state in megatron's `fully_reshardable` format (also layout-independent: Adam moments and
fp32 master weights are stored per parameter in model space, so they too reshard across TP/PP/DP), the LR
scheduler, the iteration (from which the data position is derived), per-rank RNG states (restored only when
the world size is unchanged; otherwise they are reseeded and a notice is printed) and a driver-specific
`extra` dict (e.g. reward normalisation statistics), plus whatever the task's checkpointables write into the
same directory before it is committed (PPO's critic, hcx_megatron/training/loop.py).

Megatron-FSDP runs (--use-megatron-fsdp) are checkpointed differently, in Megatron-LM's `fsdp_dtensor` format (see
`_fsdp_dtensor_state_dict`): same directory layout and atomic protocol, but torch.distributed.checkpoint files, not
resharded across layouts, and neither format loads into a run of the other kind (a clear error says so).

Two more ways in and out, for weights only: `load_model_weights` (start a run from another run's checkpoint, any
layout, a new head allowed) and `save_model_weights` (PPO's rollout weight versions). Every directory is written
through `write_directory_atomically`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import types
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (torch.distributed.checkpoint.save/load: the FSDP branch)
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from hcx_megatron.model.builder import sync_params_before_read, unwrap

TRACKER_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "hcx_config.json"
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# The checkpoint format of Megatron-FSDP runs (Megatron-LM's --ckpt-format fsdp_dtensor), recorded in CONFIG_FILE.
FSDP_DTENSOR_FORMAT = "fsdp_dtensor"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str | None) -> int | None:
    """The iteration the tracker names, or None when `root` holds no complete checkpoint."""
    if not root:
        return None
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.exists(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    try:
        iteration = int(text)
    except ValueError as exc:
        raise ValueError(f"{path}: expected an iteration number, found {text!r}") from exc
    if not os.path.isdir(checkpoint_dir(root, iteration)):
        raise FileNotFoundError(f"{path} names iteration {iteration} but {checkpoint_dir(root, iteration)} is missing")
    return iteration


def holds_checkpoint(path: str | None) -> bool:
    """Whether `path` is a --save root with a committed checkpoint, or one checkpoint directory."""
    return bool(path) and (read_latest_iteration(path) is not None or _is_checkpoint_directory(path))


def _is_checkpoint_directory(path: str) -> bool:
    # metadata.json: dist_checkpointing (torch_dist); .metadata: torch.distributed.checkpoint (fsdp_dtensor).
    return any(os.path.exists(os.path.join(path, name)) for name in ("metadata.json", ".metadata"))


def _is_fsdp_dtensor_directory(path: str) -> bool:
    # torch_dist (dist_checkpointing) writes metadata.json beside torch.distributed.checkpoint's .metadata;
    # fsdp_dtensor checkpoints are written by torch.distributed.checkpoint alone.
    return (os.path.exists(os.path.join(path, ".metadata"))
            and not os.path.exists(os.path.join(path, "metadata.json")))


def resolve_checkpoint(path: str) -> str:
    """Accept either a --save root (use its latest) or one iter_XXXXXXX directory."""
    it = read_latest_iteration(path)
    if it is not None:
        return checkpoint_dir(path, it)
    if _is_checkpoint_directory(path):
        return path
    raise FileNotFoundError(f"{path}: neither a checkpoint root with {TRACKER_FILE} nor a checkpoint directory")


def read_saved_config(path: str) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    with open(os.path.join(ckpt, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def model_keys(chunks) -> list[str]:
    """The state-dict key of each model chunk: one per virtual pipeline chunk."""
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def build_sharded_state_dict(chunks, optimizer=None, scheduler=None, iteration: int = 0, extra=None,
                             include_rng: bool = True, is_loading: bool = False) -> dict[str, Any]:
    sd: dict[str, Any] = {}
    for key, chunk in zip(model_keys(chunks), chunks):
        sd[key] = unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=SHARDING_METADATA)
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["extra"] = extra or {}
    if include_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        sd["rng_state"] = ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)
    return sd


def uses_megatron_fsdp(chunks) -> bool:
    """Whether the chunks are wrapped by megatron-core's Megatron-FSDP adapter (--use-megatron-fsdp)."""
    return any(getattr(getattr(c, "ddp_config", None), "use_megatron_fsdp", False) for c in chunks)


def _fsdp_dtensor_state_dict(chunks, optimizer=None, scheduler=None, iteration: int = 0, extra=None,
                             include_rng: bool = True, is_loading: bool = False) -> dict[str, Any]:
    """The FSDP branch of `build_sharded_state_dict`, Megatron-LM's fsdp_dtensor format: plain state dicts whose
    sharded entries are FSDP's DTensors, for torch.distributed.checkpoint.

    The megatron gap it works around: megatron-core 0.16.1 cannot write Megatron-FSDP models through
    dist_checkpointing (torch_dist): the model's sharded_state_dict fails on the FSDP-sharded weights
    (transformer/mlp.py:289, apply_swiglu_sharded_factory: ZeroDivisionError) and DistributedOptimizer refuses
    every sharding type but fsdp_dtensor under FSDP. Not done here (Megatron-LM does it to reshard across TP):
    handle_swiglu_in_state_dict, since these checkpoints load only into the same layout."""
    from megatron.core.distributed.fsdp.src.megatron_fsdp.uneven_dtensor import (
        preprocess_state_dict_for_uneven_dtensor)

    if len(chunks) != 1:  # config/args.py: Megatron-FSDP needs PP 1, hence one chunk
        raise ValueError(f"fsdp_dtensor checkpoints hold one model chunk, got {len(chunks)}")
    # The bare model's state dict: FSDP's pre-hooks put its sharded (DTensor) main weights in place first.
    sd: dict[str, Any] = {"model": unwrap(chunks[0]).state_dict()}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": FSDP_DTENSOR_FORMAT})
        _fsdp_optimizer_state_on_every_rank(optimizer, sd["optimizer"])
    if scheduler is not None:
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["extra"] = extra or {}
    if include_rng:  # per rank: torch.distributed.checkpoint keeps one copy of each key
        sd[f"rng_state_rank{dist.get_rank()}"] = _rng_state()
    return preprocess_state_dict_for_uneven_dtensor(sd)


def _fsdp_optimizer_state_on_every_rank(optimizer, optimizer_sd: dict[str, Any]) -> None:
    """Second gap of megatron-core 0.16.1's fsdp_dtensor optimizer state (sharded_param_state_fsdp_dtensor):
    it lists only the parameters the inner torch Adam holds state for, and Adam creates state only for parameters
    with a gradient, which Megatron-FSDP leaves None on a rank whose shard of the parameter is empty. Ranks then
    hold different DTensors, and the per-DTensor collectives of preprocess_state_dict_for_uneven_dtensor and
    torch.distributed.checkpoint deadlock. Give every rank an entry for every parameter (Adam's zero state for
    the empty shards, never read since those parameters never get a gradient there), in parameter-group order."""
    (opt,) = getattr(optimizer, "chained_optimizers", [optimizer])
    state = optimizer_sd["state"]
    template = next(iter(state.values()), None)
    if template is None:  # no step taken yet: no rank holds state
        return
    ordered = {}
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            name = opt._param_name(param)
            ordered[name] = state[name] if name in state else {
                k: v.clone() if k == "step" else torch.zeros_like(param) for k, v in template.items()}
    optimizer_sd["state"] = ordered


def _check_checkpoint_format(ckpt: str, saved: dict[str, Any], chunks) -> None:
    """fsdp_dtensor and torch_dist checkpoints do not load into runs of the other kind (no resharding between
    them): say so, naming the checkpoint and the flag."""
    saved_fsdp = saved.get("checkpoint_format") == FSDP_DTENSOR_FORMAT
    if saved_fsdp and not uses_megatron_fsdp(chunks):
        raise ValueError(f"{ckpt} was saved by a --use-megatron-fsdp run (fsdp_dtensor format); it loads only "
                         "into a --use-megatron-fsdp run of the same layout")
    if uses_megatron_fsdp(chunks) and not saved_fsdp:
        raise ValueError(f"{ckpt} was saved without --use-megatron-fsdp (torch_dist format); a --use-megatron-fsdp "
                         "run loads only checkpoints of --use-megatron-fsdp runs (no resharding between the two)")


def write_directory_atomically(final: str, write: Callable[[str], None]) -> str:
    """Collective: every rank runs `write(tmp)` into `final + ".tmp"`; once all have, rank 0 renames it to
    `final`. A run killed midway leaves only the .tmp directory (cleared by the next write of `final`), never a
    partial directory under the final name."""
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        if os.path.exists(tmp):  # left by a run killed while writing
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    dist.barrier()
    write(tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return final


def _start_writer_results_queue() -> None:
    """megatron-core 0.16.1's filesystem writer (torch_dist) collects results through a Manager queue that it
    starts on a rank's first save in a *spawned* process, and spawn re-imports the driver's `__main__` module
    there (torch + megatron: ~5 s of CPU and a stall on every rank's first save). The Manager needs none of it:
    start megatron's queue here with `__main__` hidden from spawn."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        filesystem_async._get_write_results_queue()
    finally:
        sys.modules["__main__"] = main


def save_checkpoint(root: str, iteration: int, chunks, optimizer, scheduler, config_dict: dict[str, Any],
                    extra: dict[str, Any] | None = None, save_optim: bool = True,
                    before_commit: Callable[[str], None] | None = None) -> str:
    """Write DIR/iter_N atomically, then the tracker. `before_commit(tmp_dir)` runs on every rank once the data
    are written and before the rename and the tracker: the loop saves the task's checkpointables there."""
    sync_params_before_read(chunks)  # --overlap-param-gather: the last step's all-gather may still be pending

    fsdp = uses_megatron_fsdp(chunks)

    def write(tmp: str) -> None:
        if fsdp:
            sd = _fsdp_dtensor_state_dict(chunks, optimizer if save_optim else None, scheduler, iteration, extra)
            torch.distributed.checkpoint.save(sd, checkpoint_id=tmp)
        else:
            sd = build_sharded_state_dict(chunks, optimizer if save_optim else None, scheduler, iteration, extra)
            _start_writer_results_queue()
            dist_checkpointing.save(sd, tmp,
                                    content_metadata={**SHARDING_METADATA, "world_size": dist.get_world_size()})
        dist.barrier()
        if before_commit is not None:
            before_commit(tmp)
        if dist.get_rank() == 0:
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump({**config_dict, "iteration": iteration, "world_size": dist.get_world_size(),
                           "has_optimizer": save_optim,
                           "checkpoint_format": FSDP_DTENSOR_FORMAT if fsdp else "torch_dist"},
                          f, indent=2, default=str)

    final = write_directory_atomically(checkpoint_dir(root, iteration), write)
    if dist.get_rank() == 0:
        tracker_tmp = os.path.join(root, TRACKER_FILE + ".tmp")
        with open(tracker_tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER_FILE))
    dist.barrier()
    return final


def save_model_weights(path: str, chunks) -> str:
    """Weights only (collective), atomically, as a directory `load_model_weights` reads under any layout."""
    sync_params_before_read(chunks)

    def write(tmp: str) -> None:
        sd = {key: unwrap(c).sharded_state_dict(metadata=SHARDING_METADATA)
              for key, c in zip(model_keys(chunks), chunks)}
        _start_writer_results_queue()
        dist_checkpointing.save(sd, tmp, content_metadata=SHARDING_METADATA)

    return write_directory_atomically(path, write)


def _materialize_optimizer_state(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer.state_dict() asserts that torch Adam already holds a
    `step` (true only after a first step), yet its own sharded load path only creates dummy states later. Create
    them first, as that load path would; the loaded checkpoint then overwrites every value."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer):
            if not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()
            _keep_torch_adam_step(opt)


def _keep_torch_adam_step(opt) -> None:
    """Second gap of the same path: with torch Adam, load_state_dict() first restores the shared `step` from
    the param groups, then `_set_main_param_and_optimizer_states` copies every state key from the checkpoint's
    per-parameter tensors, which (by design) carry no `step`, and raises KeyError('step'). On this optimizer
    instance only, supply the already-restored step so that copy is a no-op for it."""
    original = type(opt)._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(opt, model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states


def _unshare_torch_adam_steps(optimizer) -> None:
    """Third gap: DistributedOptimizer.load_state_dict gives every parameter the SAME `step` tensor; torch Adam
    increments each parameter's step in place, so one step would advance it once per parameter (seen here: 2
    -> 29 after one step, breaking bias correction and exact resume). Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def load_checkpoint(path: str, chunks, optimizer=None, scheduler=None, load_optim: bool = True,
                    load_rng: bool = True, strict: bool = True) -> tuple[int, dict[str, Any]]:
    """Load into already-built chunks (any layout). Returns (iteration, extra)."""
    ckpt = resolve_checkpoint(path)
    saved = json.load(open(os.path.join(ckpt, CONFIG_FILE), encoding="utf-8"))
    _check_checkpoint_format(ckpt, saved, chunks)
    if load_optim and optimizer is not None and not saved.get("has_optimizer", True):
        raise ValueError(f"{ckpt} holds no optimizer state (saved with --no-save-optim or converted); "
                         "load it with --finetune or --no-load-optim")
    same_world = saved.get("world_size") == dist.get_world_size()
    if load_rng and not same_world and dist.get_rank() == 0:
        print(f"[checkpoint] world size changed ({saved.get('world_size')} -> {dist.get_world_size()}): "
              "RNG states are reseeded instead of restored", flush=True)
    include_rng = load_rng and same_world
    if uses_megatron_fsdp(chunks):
        return _load_fsdp_dtensor_checkpoint(ckpt, chunks, optimizer if load_optim else None,
                                             scheduler if load_optim else None, include_rng, strict)
    if load_optim and optimizer is not None:
        _materialize_optimizer_state(optimizer)
    sd = build_sharded_state_dict(chunks, optimizer if load_optim else None, scheduler if load_optim else None,
                                  include_rng=include_rng, is_loading=True)
    loaded = dist_checkpointing.load(sd, ckpt)
    for key, chunk in zip(model_keys(chunks), chunks):
        unwrap(chunk).load_state_dict(loaded[key], strict=strict)
    if load_optim and optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_torch_adam_steps(optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(loaded["opt_param_scheduler"])
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 master copies follow the freshly loaded weights
    if include_rng:
        _set_rng_state(loaded["rng_state"])
    return int(loaded["iteration"]), dict(loaded.get("extra") or {})


def _load_fsdp_dtensor_checkpoint(ckpt: str, chunks, optimizer, scheduler, include_rng: bool,
                                  strict: bool) -> tuple[int, dict[str, Any]]:
    """The FSDP branch of `load_checkpoint` (see `_fsdp_dtensor_state_dict`), as Megatron-LM loads fsdp_dtensor:
    torch.distributed.checkpoint reads in place into the DTensor state dicts, then the model's and optimizer's
    load_state_dict finish (the FSDP adapter's post-load hook copies the main weights into the model weights;
    the optimizer maps its parameter-name keys back to its parameter groups)."""
    sd = _fsdp_dtensor_state_dict(chunks, optimizer, scheduler, include_rng=include_rng, is_loading=True)
    torch.distributed.checkpoint.load(sd, checkpoint_id=ckpt)
    chunks[0].load_state_dict(sd["model"], strict=strict)
    if optimizer is not None:
        optimizer.load_state_dict(sd["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(sd["opt_param_scheduler"])
    if include_rng:
        _set_rng_state(sd[f"rng_state_rank{dist.get_rank()}"])
    return int(sd["iteration"]), dict(sd.get("extra") or {})


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def load_model_weights(path: str, chunks, allow_missing: Sequence[str] = ()) -> list[str]:
    """Load the weights that `path` (a --save root, an iter_ directory or a `save_model_weights` directory) holds
    for `chunks`, in any layout: a run's start from another run's weights (hcx_megatron/training/loop.py).

    Keys the checkpoint lacks must start with one of `allow_missing` (e.g. "value_head." when a reward model
    starts from an SFT checkpoint); they keep their fresh initialisation. Keys only the checkpoint has (e.g. the
    SFT model's output_layer) are ignored. Returns the missing keys that were allowed."""
    ckpt = resolve_checkpoint(path)
    if uses_megatron_fsdp(chunks) or _is_fsdp_dtensor_directory(ckpt):
        raise ValueError(f"{ckpt}: starting from another run's weights (--pretrained-checkpoint) is not supported "
                         "with --use-megatron-fsdp runs or their fsdp_dtensor checkpoints; resume with --load")
    available = set(dist_checkpointing.load_tensors_metadata(ckpt).keys())
    sd, skipped = {}, []
    # Checkpoint keys are those of the bare model (save_checkpoint unwraps DDP); checkpoints written before that
    # change carry DDP's "module." level, and load through the wrapped chunk.
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
            elif any(_strip_module(name).startswith(p) or _strip_module(global_key).startswith(p)
                     for p in allow_missing):
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
                   and not any(_strip_module(k).startswith(p) for p in allow_missing)]
        if missing:
            raise KeyError(f"{ckpt}: weights missing after load: {missing[:5]}")
    return skipped
