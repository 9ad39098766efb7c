"""Megatron torch_dist checkpoint (any TP/PP/VPP) -> Hugging Face LlamaForCausalLM directory, streaming.

Memory: the reader loads one decoder layer (or the embedding / output layer, one tensor at a time); the writer
keeps at most one pending safetensors shard. See dist_reader.py for why the TP/PP/VPP of the run does not
matter, and layout.py for the tensor mappings.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import torch

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.convert import layout as L
from hcx_megatron.convert.dist_reader import DistCheckpointReader
from hcx_megatron.convert.hf_config import generation_config, hf_config_from_model
from hcx_megatron.convert.hf_writer import ShardedSafetensorsWriter, plan_shards

log = logging.getLogger("hcx.convert")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class ExportResult:
    out_dir: str
    num_shards: int
    weight_bytes: int
    seconds: float
    tokenizer: dict | None


def saved_model_config(reader: DistCheckpointReader) -> ModelConfig:
    fields = reader.config.get("model")
    if not isinstance(fields, dict):
        raise ValueError(f"{reader.path}/hcx_config.json has no 'model' section")
    known = set(ModelConfig.__dataclass_fields__)
    return ModelConfig(**{k: v for k, v in fields.items() if k in known})


def check_checkpoint_shapes(reader: DistCheckpointReader, m: ModelConfig, prefix: str) -> None:
    """Every tensor the export needs is present with the shape hcx_config.json implies."""
    shape = L.AttentionShape(m.num_attention_heads, m.num_query_groups, m.head_dim, m.hidden_size)
    h, f, n = m.hidden_size, m.ffn_hidden_size, m.num_layers
    expected = {
        L.mcore_key(L.INPUT_NORM, True, prefix): (n, h),
        L.mcore_key(L.QKV, True, prefix): (n, shape.qkv_rows, h),
        L.mcore_key(L.PROJ, True, prefix): (n, h, m.num_attention_heads * m.head_dim),
        L.mcore_key(L.PRE_MLP_NORM, True, prefix): (n, h),
        L.mcore_key(L.FC1, True, prefix): (n, 2 * f, h),
        L.mcore_key(L.FC2, True, prefix): (n, h, f),
        L.mcore_key(L.FINAL_NORM, prefix=prefix): (h,),
    }
    tensors = reader.tensors()
    for key, shp in expected.items():
        if key not in tensors:
            raise ValueError(f"{reader.path}: tensor {key} is missing (not an HCX GPT checkpoint?)")
        if tensors[key].shape != shp:
            raise ValueError(f"{reader.path}: {key} has shape {tensors[key].shape}, but hcx_config.json's model "
                             f"section implies {shp}")
    vocab_keys = [L.mcore_key(L.EMBEDDING, prefix=prefix)]
    if m.untie_embeddings_and_output_weights:
        vocab_keys.append(L.mcore_key(L.OUTPUT_LAYER, prefix=prefix))
    for key in vocab_keys:
        if key not in tensors:
            raise ValueError(f"{reader.path}: tensor {key} is missing")
        rows, cols = tensors[key].shape
        if cols != h or rows < m.vocab_size:
            raise ValueError(f"{reader.path}: {key} has shape {(rows, cols)}; expected (>= vocab_size "
                             f"{m.vocab_size}, {h})")


def hf_tensor_shapes(m: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) in the order the exporter produces them."""
    h, f, d = m.hidden_size, m.ffn_hidden_size, m.head_dim
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    per_layer = {"input_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "post_norm": (h,),
                 "gate": (f, h), "up": (f, h), "down": (h, f)}
    out = [(L.HF_EMBED, (m.vocab_size, h))]
    for i in range(m.num_layers):
        names = L.hf_layer_names(i)
        out += [(names[k], shp) for k, shp in per_layer.items()]
    out.append((L.HF_NORM, (h,)))
    if m.untie_embeddings_and_output_weights:
        out.append((L.HF_LM_HEAD, (m.vocab_size, h)))
    return out


def export_to_hf(load: str, save: str, tokenizer_dir: str | None = None, dtype: str | None = None,
                 max_shard_size: int = 5 * 10**9, progress: bool = True) -> ExportResult:
    """Write the HF directory `save` from the checkpoint `load` (a --save root or an iter_XXXXXXX dir).

    The directory is assembled in a temp sibling and renamed at the end, so a failed export leaves nothing
    half-written under `save`."""
    start = time.time()
    reader = DistCheckpointReader(load)
    m = saved_model_config(reader)
    prefix = L.detect_prefix(reader.tensors())
    check_checkpoint_shapes(reader, m, prefix)
    stored = reader.info(L.mcore_key(L.EMBEDDING, prefix=prefix)).dtype
    padded_rows = reader.info(L.mcore_key(L.EMBEDDING, prefix=prefix)).shape[0]
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype] if dtype else stored
    shape = L.AttentionShape(m.num_attention_heads, m.num_query_groups, m.head_dim, m.hidden_size)

    parent = os.path.dirname(os.path.abspath(save)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-hf-export-", dir=parent)
    try:
        tok_info = None
        if tokenizer_dir:
            from hcx_megatron.convert.tokenizer_export import export_tokenizer

            tok_info = export_tokenizer(tokenizer_dir, tmp, m.vocab_size)
        elem = torch.empty((), dtype=out_dtype).element_size()
        shapes = dict(hf_tensor_shapes(m))
        sizes = [(name, elem * math.prod(shp)) for name, shp in shapes.items()]
        plan = [[(name, shapes[name], out_dtype) for name in names] for names in plan_shards(sizes, max_shard_size)]
        writer = ShardedSafetensorsWriter(tmp, plan)

        def put(name: str, t: torch.Tensor) -> None:
            writer.add(name, t.to(out_dtype))

        put(L.HF_EMBED, L.cut_vocab(reader.read(L.mcore_key(L.EMBEDDING, prefix=prefix)), m.vocab_size))
        layer_keys = [L.mcore_key(k, True, prefix) for k in L.LAYER_KEYS]
        t0 = time.time()
        for i in range(m.num_layers):
            raw = reader.read_layer(layer_keys, i)
            layer = {k[len(L.mcore_key("", True, prefix)):]: v for k, v in raw.items()}
            for name, t in L.mcore_layer_to_hf(layer, i, shape, m.ffn_hidden_size).items():
                put(name, t)
            del raw, layer
            if progress and (i + 1 == m.num_layers or (i + 1) % max(1, m.num_layers // 10) == 0):
                rate = (i + 1) / max(1e-9, time.time() - t0)
                log.info("exported layer %d/%d (%.2f layers/s)", i + 1, m.num_layers, rate)
        put(L.HF_NORM, reader.read(L.mcore_key(L.FINAL_NORM, prefix=prefix)))
        if m.untie_embeddings_and_output_weights:
            put(L.HF_LM_HEAD, L.cut_vocab(reader.read(L.mcore_key(L.OUTPUT_LAYER, prefix=prefix)), m.vocab_size))
        writer.close()

        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_from_model(m, DTYPE_NAMES[out_dtype], has_hcx_tokenizer=tokenizer_dir is not None
                                           or _trained_with_hcx_tokenizer(reader)), f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config(tokenizer_dir is not None or _trained_with_hcx_tokenizer(reader)), f, indent=2)
        with open(os.path.join(tmp, "hcx_export.json"), "w", encoding="utf-8") as f:
            json.dump({"source_checkpoint": os.path.abspath(reader.path),
                       "iteration": reader.config.get("iteration"),
                       "source_parallel": reader.config.get("parallel"),
                       "model": reader.config.get("model"),
                       "padded_vocab_rows_dropped": padded_rows - m.vocab_size,
                       "dtype": DTYPE_NAMES[out_dtype]}, f, indent=2)
        if os.path.isdir(save):
            shutil.rmtree(save)
        os.replace(tmp, save)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weight_bytes = sum(n for _, n in sizes)
    return ExportResult(save, len(plan), weight_bytes, time.time() - start, tok_info)


def _trained_with_hcx_tokenizer(reader: DistCheckpointReader) -> bool:
    data = reader.config.get("data") or {}
    return bool(data.get("tokenizer_model"))
