"""Hugging Face Llama-architecture directory -> megatron checkpoint for the pretraining driver.

The output is written by hcx_megatron.training.checkpoint.save_checkpoint itself (model weights only,
`has_optimizer: false`), so it is exactly what `--save` writes: `SAVE/iter_0000000/` + the tracker file. The
pretraining driver loads it with `--load SAVE --finetune` (weights only, fresh optimizer, iteration 0).

How "at a requested TP/PP" works: megatron's torch_dist format stores global (layout-independent) tensors that
every rank reads its own slice of at load time, so a single process writes them. The requested layout is
validated up front (head/group/layer divisibility, with the driver's own validate_config), fixes the size of
Megatron's vocabulary padding (a multiple of make_vocab_size_divisible_by x TP) and is recorded in
hcx_config.json and the --model-config YAML written next to the checkpoint.

Memory: the model is built once (empty, uninitialised tensors) at TP1/PP1 in this process with
hcx_megatron's builder and filled tensor by tensor from the safetensors files (each read lazily), so the
peak is about one model copy plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass

import torch
import yaml

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.convert import layout as L
from hcx_megatron.convert.hf_config import (
    UnsupportedModelError, model_config_from_hf, model_yaml_fields, read_hf_config,
)

log = logging.getLogger("hcx.convert")
MODEL_YAML = "model.yaml"


class HFWeights:
    """Lazy access to the tensors of an HF directory (sharded or single-file safetensors)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(single):
            weight_map = None
        else:
            bins = [f for f in os.listdir(hf_dir) if f.endswith(".bin")]
            hint = " (found PyTorch .bin files: re-save with safe_serialization=True)" if bins else ""
            raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json{hint}")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        missing = [f for f in files if not os.path.exists(os.path.join(hf_dir, f))]
        if missing:
            raise FileNotFoundError(f"{hf_dir}: shard file(s) named in model.safetensors.index.json are missing: "
                                    f"{missing}")
        self._handles = {f: safe_open(os.path.join(hf_dir, f), framework="pt") for f in files}
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._handles["model.safetensors"].keys()}
        self.weight_map = weight_map
        for name, f in weight_map.items():
            if name not in self._handles[f].keys():
                raise FileNotFoundError(f"{hf_dir}/{f}: tensor {name} listed in the index is not in the file")

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir}: tensor {name} is missing")
        return self._handles[self.weight_map[name]].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())


def expected_hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    out = {L.HF_EMBED: (m.vocab_size, h), L.HF_NORM: (h,)}
    if m.untie_embeddings_and_output_weights:
        out[L.HF_LM_HEAD] = (m.vocab_size, h)
    for i in range(m.num_layers):
        n = L.hf_layer_names(i)
        out.update({n["input_norm"]: (h,), n["q"]: (q, h), n["k"]: (kv, h), n["v"]: (kv, h), n["o"]: (h, q),
                    n["post_norm"]: (h,), n["gate"]: (f, h), n["up"]: (f, h), n["down"]: (h, f)})
    return out


def check_hf_weights(weights: HFWeights, m: ModelConfig) -> None:
    expected = expected_hf_shapes(m)
    names = weights.names()
    # Tied models may still carry an lm_head copy; rotary inv_freq buffers are derived, not weights.
    ignorable = {L.HF_LM_HEAD} if not m.untie_embeddings_and_output_weights else set()
    unexpected = sorted(n for n in names - set(expected) - ignorable if not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        biases = [n for n in unexpected if n.endswith(".bias")]
        what = ("bias tensors (HCX decoders have no linear biases)" if biases
                else "tensors the Llama mapping has no place for")
        raise UnsupportedModelError(f"{weights.hf_dir}: unexpected {what}: {unexpected[:8]}"
                                    + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
    missing = sorted(set(expected) - names)
    if missing:
        raise ValueError(f"{weights.hf_dir}: missing tensor(s) {missing[:8]}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    for name, shp in expected.items():
        got = weights.shape(name)
        if got != shp:
            raise ValueError(f"{weights.hf_dir}: {name} has shape {got}, config.json implies {shp}")


def check_tokenizer_fits(hf_dir: str, vocab_size: int) -> int | None:
    path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    n = Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"{path}: tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    return n


@dataclass
class ImportResult:
    save: str
    checkpoint_dir: str
    model_yaml: str
    model: ModelConfig
    padded_vocab_size: int
    seconds: float


def import_from_hf(hf_dir: str, save: str, tp: int = 1, pp: int = 1, vpp: int | None = None,
                   dtype: str = "fp32", make_vocab_size_divisible_by: int = 128) -> ImportResult:
    """Convert; returns where things went. Must run in a process without torch.distributed (it starts a
    1-process gloo world)."""
    from hcx_megatron.convert import mcore_runtime as rt
    from hcx_megatron.training.checkpoint import save_checkpoint

    start = time.time()
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype {dtype!r}: the megatron checkpoint holds fp32 (default) or bf16 weights")
    m = model_config_from_hf(read_hf_config(hf_dir), where=os.path.join(hf_dir, "config.json"))
    m = dataclasses.replace(m, make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    weights = HFWeights(hf_dir)
    check_hf_weights(weights, m)
    check_tokenizer_fits(hf_dir, m.vocab_size)

    # The layout the user asked for, validated with the driver's rules (raises ConfigError naming the flag).
    from hcx_megatron.config.args import ConfigError, validate_config

    try:
        target = rt.cpu_config(m, tp=tp, pp=pp, bf16=dtype == "bf16")
        if vpp is not None:
            target.parallel.virtual_pipeline_model_parallel_size = vpp
            validate_config(target)
    except ConfigError as exc:  # the driver's message, with this tool's flag names
        msg = str(exc)
        for flag in ("tensor-model-parallel-size", "pipeline-model-parallel-size",
                     "virtual-pipeline-model-parallel-size"):
            msg = msg.replace(f"--{flag}", f"--target-{flag.replace('-model-', '-')}")
        raise ConfigError(f"{os.path.join(hf_dir, 'config.json')}: {msg}") from None
    padded = target.padded_vocab_size

    build = rt.cpu_config(m, tp=1, pp=1, bf16=dtype == "bf16")
    rt.init_processes(build)
    try:
        chunks = rt.build_chunks(build, padded_vocab_size=padded)
        model = chunks[0].module
        params = dict(model.named_parameters())
        filled: set[str] = set()

        def assign(name: str, value: torch.Tensor) -> None:
            p = params[name]
            if tuple(p.shape) != tuple(value.shape):
                raise ValueError(f"{name}: converted tensor has shape {tuple(value.shape)}, model expects "
                                 f"{tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(value)
            filled.add(name)

        shape = L.AttentionShape(m.num_attention_heads, m.num_query_groups, m.head_dim, m.hidden_size)
        assign("embedding.word_embeddings.weight", L.pad_vocab(weights.get(L.HF_EMBED), padded))
        local = {L.INPUT_NORM: "input_layernorm.weight", L.PRE_MLP_NORM: "pre_mlp_layernorm.weight"}
        t0 = time.time()
        for i in range(m.num_layers):
            for key, value in L.hf_layer_to_mcore(weights.get, i, shape).items():
                assign(f"decoder.layers.{i}.{local.get(key, key)}", value)
            if (i + 1) % max(1, m.num_layers // 10) == 0 or i + 1 == m.num_layers:
                log.info("imported layer %d/%d (%.2f layers/s)", i + 1, m.num_layers,
                         (i + 1) / max(1e-9, time.time() - t0))
        assign("decoder.final_layernorm.weight", weights.get(L.HF_NORM))
        if m.untie_embeddings_and_output_weights:
            assign("output_layer.weight", L.pad_vocab(weights.get(L.HF_LM_HEAD), padded))
        unset = sorted(set(params) - filled)
        if unset:
            raise RuntimeError(f"parameters not set by the HF mapping: {unset}")

        config_dict = target.to_dict()
        config_dict["converted_from"] = {"hf_dir": os.path.abspath(hf_dir), "format": "hf-llama"}
        ckpt = save_checkpoint(save, 0, chunks, None, None, config_dict, save_optim=False)
    finally:
        rt.shutdown_processes()
    yaml_path = os.path.join(save, MODEL_YAML)
    with open(yaml_path, "w", encoding="utf-8") as f:
        f.write(f"# Model shape imported from {os.path.abspath(hf_dir)}; use with --model-config\n")
        yaml.safe_dump(model_yaml_fields(m), f, sort_keys=False, allow_unicode=True)
    return ImportResult(save, ckpt, yaml_path, m, padded, time.time() - start)


def continue_pretraining_command(result: ImportResult, tp: int, pp: int) -> str:
    """The documented command line that continues pretraining from an imported checkpoint."""
    return (f"torchrun --nproc-per-node {tp * pp} -m hcx_megatron.pretrain --model-config {result.model_yaml} "
            f"--tensor-model-parallel-size {tp} --pipeline-model-parallel-size {pp} "
            f"--load {result.save} --finetune --save RUN_DIR/ckpt --data-path DATA_PREFIX "
            f"--tokenizer-model TOKENIZER_DIR ...")
