"""Resize the vocabulary of a megatron checkpoint (any saved TP/PP/VPP) after the tokenizer grew.

Rule (stated, tested): rows [0, K) of `embedding.word_embeddings.weight` and `output_layer.weight` are copied
unchanged, K = the old vocab_size (or `keep_rows`, see resize_checkpoint_vocab); every row from K up to the new
Megatron-padded size is the MEAN of those K rows of the same tensor (padding excluded). Everything else is copied bit for bit. Hence, before any
training, the logits of old token ids are those of the old model on any input made of old ids (the embedding of
every old id and the output row of every old id are unchanged, and nothing else depends on the vocabulary); a
new token starts with the average input embedding and an output logit equal to the average old logit, so it
neither dominates the softmax nor starts from noise (Hewitt 2021, "Initializing new word embeddings").

Layout: like the importer, one process reads the global tensors (dist_reader, whatever layout wrote them),
builds the model at TP1/PP1 with the new vocabulary padded Megatron's way for the TARGET tensor-parallel size
(default: the size the checkpoint was saved with), fills it and writes it with the driver's own save_checkpoint
(model weights only, iteration 0, has_optimizer false: the optimizer state has the old shapes). Load it with
`--load NEW --finetune` at any TP/PP whose padding of the new vocabulary gives the same number of rows.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import torch
import yaml

from hcx_megatron.convert import layout as L
from hcx_megatron.convert.dist_reader import DistCheckpointReader
from hcx_megatron.convert.export import check_checkpoint_shapes, saved_model_config
from hcx_megatron.convert.hf_config import model_yaml_fields
from hcx_megatron.convert.importer import MODEL_YAML

INIT_RULE = "mean of the old real rows (embedding and output layer separately); old rows copied unchanged"
# Model parameter names of the local layer spec whose stored (TE-style) key differs; the rest are the same name.
_LOCAL_NAME = {L.INPUT_NORM: "input_layernorm.weight", L.PRE_MLP_NORM: "pre_mlp_layernorm.weight"}


@dataclass
class ResizeResult:
    save: str
    checkpoint_dir: str
    model_yaml: str
    old_vocab_size: int
    new_vocab_size: int
    old_padded_rows: int
    new_padded_rows: int
    target_tensor_parallel_size: int
    seconds: float


def resized_rows(old: torch.Tensor, old_vocab_size: int, padded_rows: int) -> torch.Tensor:
    """[old real rows; mean of them repeated up to padded_rows] (the rule in the module docstring)."""
    real = old[:old_vocab_size]
    mean = real.float().mean(dim=0, keepdim=True).to(old.dtype)
    return torch.cat([real, mean.expand(padded_rows - old_vocab_size, -1)], dim=0).contiguous()


def resize_checkpoint_vocab(load: str, save: str, new_vocab_size: int, tp: int | None = None,
                            pp: int | None = None, keep_rows: int | None = None) -> ResizeResult:
    """Write checkpoint root `save` with `new_vocab_size` vocabulary rows. `keep_rows` (default: the checkpoint's
    vocab_size) is how many leading rows are real old tokens: an open model whose embedding is larger than its
    tokenizer has unused rows there, and new token ids land on them, so they are re-initialised too. Must run
    without torch.distributed (it starts a 1-process gloo world, as the importer does)."""
    from hcx_megatron.config.args import ConfigError
    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.training.checkpoint import save_checkpoint

    start = time.time()
    reader = DistCheckpointReader(load)
    m = saved_model_config(reader)
    prefix = L.detect_prefix(reader.tensors())
    check_checkpoint_shapes(reader, m, prefix)
    if new_vocab_size < m.vocab_size:
        raise ValueError(f"--new-vocab-size {new_vocab_size} is smaller than the checkpoint's vocab_size "
                         f"{m.vocab_size} ({reader.path}); shrinking would drop trained rows")
    keep_rows = m.vocab_size if keep_rows is None else keep_rows
    if not 0 < keep_rows <= m.vocab_size:
        raise ValueError(f"keep_rows {keep_rows} must be in [1, {m.vocab_size}] (the checkpoint's vocab_size)")
    if os.path.exists(os.path.join(save, "latest_checkpointed_iteration.txt")):
        raise FileExistsError(f"--save {save} already holds a checkpoint; choose a new directory")
    saved_parallel = reader.config.get("parallel") or {}
    tp = tp or int(saved_parallel.get("tensor_model_parallel_size", 1))
    pp = pp or int(saved_parallel.get("pipeline_model_parallel_size", 1))
    embedding_key = L.mcore_key(L.EMBEDDING, prefix=prefix)
    stored = reader.info(embedding_key)
    bf16 = stored.dtype == torch.bfloat16
    new_m = dataclasses.replace(m, vocab_size=new_vocab_size)
    try:
        target = rt.cpu_config(new_m, tp=tp, pp=pp, bf16=bf16)
    except ConfigError as exc:
        raise ConfigError(f"--target-tensor-parallel-size {tp} / --target-pipeline-parallel-size {pp}: {exc}") from None
    padded = target.padded_vocab_size

    build = rt.cpu_config(new_m, tp=1, pp=1, bf16=bf16)
    rt.init_processes(build)
    try:
        chunks = rt.build_chunks(build, padded_vocab_size=padded)
        params = dict(chunks[0].module.named_parameters())
        filled: set[str] = set()

        def assign(name: str, value: torch.Tensor) -> None:
            p = params[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"{reader.path}: {name} would have shape {tuple(value.shape)}, the resized model "
                                 f"expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(value)
            filled.add(name)

        assign(L.EMBEDDING, resized_rows(reader.read(embedding_key), keep_rows, padded))
        if m.untie_embeddings_and_output_weights:
            assign(L.OUTPUT_LAYER, resized_rows(reader.read(L.mcore_key(L.OUTPUT_LAYER, prefix=prefix)),
                                                keep_rows, padded))
        assign(L.FINAL_NORM, reader.read(L.mcore_key(L.FINAL_NORM, prefix=prefix)))
        stacked = [L.mcore_key(k, True, prefix) for k in L.LAYER_KEYS]
        for i in range(m.num_layers):
            raw = reader.read_layer(stacked, i)
            for key in L.LAYER_KEYS:
                assign(f"{L.LAYER_PREFIX}{i}.{_LOCAL_NAME.get(key, key)}", raw[L.mcore_key(key, True, prefix)])
        unset = sorted(set(params) - filled)
        if unset:
            raise RuntimeError(f"parameters not set from {reader.path}: {unset}")
        config_dict = target.to_dict()
        config_dict["resized_vocab_from"] = {"checkpoint": os.path.abspath(reader.path),
                                             "old_vocab_size": m.vocab_size, "new_vocab_size": new_vocab_size,
                                             "kept_rows": keep_rows,
                                             "init_rule": INIT_RULE}
        if "converted_from" in reader.config:
            config_dict["converted_from"] = reader.config["converted_from"]
        ckpt = save_checkpoint(save, 0, chunks, None, None, config_dict, save_optim=False)
    finally:
        rt.shutdown_processes()
    yaml_path = os.path.join(save, MODEL_YAML)
    with open(yaml_path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"# Model shape of {os.path.abspath(reader.path)} with the vocabulary resized to {new_vocab_size}; "
                "use with --model-config\n")
        yaml.safe_dump(model_yaml_fields(new_m), f, sort_keys=False, allow_unicode=True)
    os.replace(yaml_path + ".tmp", yaml_path)
    return ResizeResult(save, ckpt, yaml_path, m.vocab_size, new_vocab_size, stored.shape[0], padded, tp,
                        time.time() - start)


__all__ = ["resize_checkpoint_vocab", "resized_rows", "ResizeResult", "INIT_RULE"]
