"""Converter pieces that need no processes: tensor layouts, HF config mapping and its errors, shard planning,
bad-input errors of the reader / importer / tokenizer export."""

from __future__ import annotations

import json
import os

import pytest
import torch

from hcx_megatron.config.model import ModelConfig
from hcx_megatron.convert import layout as L
from hcx_megatron.convert.hf_config import UnsupportedModelError, hf_config_from_model, model_config_from_hf
from hcx_megatron.convert.hf_writer import parse_size, plan_shards


def _llama_cfg(**over):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
           "head_dim": 16, "vocab_size": 500, "rms_norm_eps": 1e-6, "max_position_embeddings": 512,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "tie_word_embeddings": False}
    cfg.update(over)
    return cfg


@pytest.mark.timeout(30)
def test_qkv_split_follows_megatron_group_layout():
    """Rows of the fused tensor tagged by (group, slot, dim): q heads of a group, then its k, then its v."""
    shape = L.AttentionShape(num_heads=8, num_groups=2, head_dim=3, hidden_size=5)
    rows = []
    for g in range(2):
        for slot in range(4 + 2):  # 4 query heads per group, then k, then v
            for d in range(3):
                rows.append([g * 100 + slot * 10 + d] * 5)
    fused = torch.tensor(rows, dtype=torch.float32)
    q, k, v = L.split_qkv(fused, shape)
    assert q.shape == (8 * 3, 5) and k.shape == (2 * 3, 5) and v.shape == (2 * 3, 5)
    # HF query head j (rows j*3..j*3+2) belongs to group j // 4, slot j % 4.
    for j in range(8):
        assert q[j * 3, 0] == (j // 4) * 100 + (j % 4) * 10
    assert k[:, 0].tolist() == [40, 41, 42, 140, 141, 142]
    assert v[:, 0].tolist() == [50, 51, 52, 150, 151, 152]
    assert torch.equal(L.merge_qkv(q, k, v, shape), fused)


@pytest.mark.timeout(30)
def test_fc1_vocab_and_errors():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = L.merge_fc1(gate, up)
    g2, u2 = L.split_fc1(fused, 6)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    with pytest.raises(ValueError, match="2 x ffn_hidden_size"):
        L.split_fc1(fused, 5)
    emb = torch.randn(10, 4)
    padded = L.pad_vocab(emb, 16)
    assert padded.shape == (16, 4) and not padded[10:].any() and torch.equal(L.cut_vocab(padded, 10), emb)
    with pytest.raises(ValueError, match="fewer than the model's vocab_size"):
        L.cut_vocab(emb, 11)
    with pytest.raises(ValueError, match="expected"):
        L.split_qkv(torch.randn(7, 5), L.AttentionShape(8, 2, 3, 5))


@pytest.mark.timeout(30)
def test_checkpoint_key_prefix_detection():
    assert L.detect_prefix(["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]) == ""
    assert L.detect_prefix(["module.embedding.word_embeddings.weight"]) == "module."  # DDP-wrapped keys
    with pytest.raises(ValueError, match="not a GPT checkpoint"):
        L.detect_prefix(["optimizer.state.exp_avg"])
    assert L.mcore_key(L.QKV, True, "module.") == "module.decoder.layers.self_attention.linear_qkv.weight"


@pytest.mark.timeout(30)
def test_hf_config_round_trip():
    m = model_config_from_hf(_llama_cfg())
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels, m.rotary_base) == (8, 2, 16, 500000)
    assert m.untie_embeddings_and_output_weights and m.norm_epsilon == 1e-6
    back = hf_config_from_model(m, "float32")
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert back[k] == _llama_cfg()[k], k
    # transformers 4.x style (rope_theta at top level, no rope_parameters) is read too.
    old = _llama_cfg(rope_theta=10000.0)
    del old["rope_parameters"]
    assert model_config_from_hf(old).rotary_base == 10000
    # transformers itself accepts what we write.
    from transformers import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in back.items() if k not in ("architectures", "model_type")})
    assert hf.num_key_value_heads == 2 and hf.head_dim == 16


@pytest.mark.timeout(30)
@pytest.mark.parametrize("over, match", [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type 'linear'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type='mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"num_key_value_heads": 3}, "not a multiple"),
])
def test_unsupported_hf_configs_are_named(over, match):
    with pytest.raises(UnsupportedModelError, match=match):
        model_config_from_hf(_llama_cfg(**over), where="x/config.json")


@pytest.mark.timeout(30)
def test_shard_plan_and_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size("123") == 123
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("five gigs")
    plan = plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8)
    assert plan == [["a", "b"], ["c"], ["d"]]  # order kept; an oversized tensor gets its own shard


def _write_hf(tmp_path, cfg: dict, tensors: dict) -> str:
    from safetensors.torch import save_file

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "model.safetensors"))
    return str(d)


def _llama_tensors(m: ModelConfig) -> dict:
    from hcx_megatron.convert.importer import expected_hf_shapes

    return {k: torch.zeros(s) for k, s in expected_hf_shapes(m).items()}


@pytest.mark.timeout(30)
def test_importer_input_errors(tmp_path):
    from hcx_megatron.convert.importer import HFWeights, check_hf_weights

    cfg = _llama_cfg()
    m = model_config_from_hf(cfg)
    tensors = _llama_tensors(m)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 161)
    hf = _write_hf(tmp_path, cfg, tensors)
    with pytest.raises(UnsupportedModelError, match="bias tensors"):
        check_hf_weights(HFWeights(hf), m)
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    os.remove(os.path.join(hf, "model.safetensors"))
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(hf, "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \(64, 161\)"):
        check_hf_weights(HFWeights(hf), m)
    # A sharded directory whose index names a file that is not there.
    json.dump({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}},
              open(os.path.join(hf, "model.safetensors.index.json"), "w"))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        HFWeights(hf)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        HFWeights(str(empty))


@pytest.mark.timeout(60)
def test_tokenizer_larger_than_model_vocab_is_rejected(tiny_tokenizer_dir, tmp_path):
    from hcx_megatron.convert.tokenizer_export import export_tokenizer

    with pytest.raises(ValueError, match="exceeds the model's vocab_size 1000"):
        export_tokenizer(tiny_tokenizer_dir, str(tmp_path), model_vocab_size=1000)


@pytest.mark.timeout(60)
def test_reader_rejects_incomplete_checkpoints(tmp_path):
    """A torch_dist directory whose shard file is gone, and one in another backend, fail with the file named."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    from hcx_megatron.convert.dist_reader import DistCheckpointReader

    d = tmp_path / "iter_0000001"
    save({"decoder.final_layernorm.weight": torch.ones(4)}, storage_writer=FileSystemWriter(str(d)),
         no_dist=True)
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (d / "hcx_config.json").write_text(json.dumps({"model": {}}))
    r = DistCheckpointReader(str(d))
    assert torch.equal(r.read("decoder.final_layernorm.weight"), torch.ones(4))
    with pytest.raises(KeyError, match="no tensor"):
        r.read("output_layer.weight")
    shard = next(p for p in os.listdir(d) if p.endswith(".distcp"))
    os.remove(d / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        DistCheckpointReader(str(d))
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ValueError, match="zarr"):
        DistCheckpointReader(str(d))


@pytest.mark.timeout(30)
def test_streaming_safetensors_writer(tmp_path):
    from safetensors.torch import load_file

    from hcx_megatron.convert.hf_writer import ShardedSafetensorsWriter

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.float32), "c": torch.randn(4, 2).bfloat16()}
    plan = [[("a", (3, 5), torch.float32), ("b", (7,), torch.float32)], [("c", (4, 2), torch.bfloat16)]]
    w = ShardedSafetensorsWriter(str(tmp_path), plan)
    with pytest.raises(RuntimeError, match="expected a"):
        w.add("b", tensors["b"])  # out of plan order
    for name in ("a", "b", "c"):
        w.add(name, tensors[name])
    w.close()
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["weight_map"] == {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                                   "c": "model-00002-of-00002.safetensors"}
    loaded = {**load_file(str(tmp_path / "model-00001-of-00002.safetensors")),
              **load_file(str(tmp_path / "model-00002-of-00002.safetensors"))}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    w2 = ShardedSafetensorsWriter(str(tmp_path / "x"), plan)
    with pytest.raises(RuntimeError, match="never added"):
        w2.close()


@pytest.mark.timeout(60)
def test_import_rejects_a_layout_the_model_cannot_take(tmp_path):
    """Validated before any process group exists, with this tool's flag names."""
    from hcx_megatron.config.args import ConfigError
    from hcx_megatron.convert.importer import import_from_hf

    cfg = _llama_cfg()
    hf = _write_hf(tmp_path, cfg, _llama_tensors(model_config_from_hf(cfg)))
    with pytest.raises(ConfigError, match=r"--num-query-groups \(2\) must be divisible by --target-tensor-parallel-size \(4\)"):
        import_from_hf(hf, str(tmp_path / "out"), tp=4)
    with pytest.raises(ConfigError, match=r"--target-pipeline-parallel-size \(3\)"):
        import_from_hf(hf, str(tmp_path / "out"), pp=3)
    assert not os.path.exists(tmp_path / "out")
