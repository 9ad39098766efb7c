"""FLOP formulas: hand-computed cases and the Megatron-LM closed forms (Narayanan et al. 2021)."""

import pytest

from hcx_megatron.config.model import ModelConfig, count_parameters, get_preset
from hcx_megatron.perf import flops


def _gpt(h, layers, heads, vocab=51200):
    # GPT-3 style: multi-head attention (g = a), GELU MLP with f = 4h, tied embeddings.
    return ModelConfig(name="gpt", num_layers=layers, hidden_size=h, ffn_hidden_size=4 * h,
                       num_attention_heads=heads, num_query_groups=heads, vocab_size=vocab,
                       make_vocab_size_divisible_by=128, activation="gelu",
                       untie_embeddings_and_output_weights=False)


@pytest.mark.timeout(10)
def test_hand_computed_tiny_case():
    # h=8, 2 heads of d=4, 1 KV group, f=16 SwiGLU, 1 layer, V=128, s=10.
    cfg = ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2, num_query_groups=1,
                      vocab_size=128, make_vocab_size_divisible_by=128)
    qkv = 2 * 8 * (8 + 2 * 4)          # 256
    core = 4 * 10 * 2 * 4              # 320
    proj = 2 * 8 * 8                   # 128
    mlp = 2 * 8 * 2 * 16 + 2 * 16 * 8  # 768
    logits = 2 * 8 * 128               # 2048
    fwd = qkv + core + proj + mlp + logits
    assert flops.forward_flops_per_token(cfg, 10) == fwd
    assert flops.model_flops_per_token(cfg, 10) == 3 * fwd
    assert flops.hardware_flops_per_token(cfg, 10, "full") == 3 * fwd + (qkv + core + proj + mlp)
    assert flops.hardware_flops_per_token(cfg, 10, "selective") == 3 * fwd + core
    assert flops.hardware_flops_per_token(cfg, 10, None) == 3 * fwd


@pytest.mark.timeout(10)
@pytest.mark.parametrize("h,layers,heads", [(2304, 24, 24), (12288, 96, 96), (25600, 128, 160)])
def test_reduces_to_narayanan_closed_forms(h, layers, heads):
    s, V = 2048, 51200
    cfg = _gpt(h, layers, heads, V)
    no_rc = 72 * layers * h**2 * (1 + s / (6 * h) + V / (12 * layers * h))
    full = 96 * layers * h**2 * (1 + s / (6 * h) + V / (16 * layers * h))
    assert flops.model_flops_per_token(cfg, s) == pytest.approx(no_rc, rel=1e-12)
    assert flops.hardware_flops_per_token(cfg, s, "full") == pytest.approx(full, rel=1e-12)


@pytest.mark.timeout(10)
def test_six_n_plus_attention_for_hcx_presets():
    # 6·N_matmul + 12·L·s·a·d where N_matmul excludes the input embedding (a lookup) and the norms.
    for name in ("hcx-tiny", "hcx-s", "hcx-l"):
        cfg = get_preset(name)
        V = cfg.padded_vocab_size(1)
        n_total = count_parameters(cfg, V)
        norms = cfg.num_layers * 2 * cfg.hidden_size + cfg.hidden_size
        n_matmul = n_total - norms - V * cfg.hidden_size  # untied: drop the embedding table only
        s = 4096
        expected = 6 * n_matmul + 12 * cfg.num_layers * s * cfg.num_attention_heads * cfg.head_dim
        assert flops.model_flops_per_token(cfg, s) == pytest.approx(expected, rel=1e-12)


@pytest.mark.timeout(10)
def test_block_recompute_counts_only_checkpointed_layers():
    cfg = get_preset("hcx-tiny")
    per_layer = sum(flops.layer_forward_flops_per_token(cfg, 128).values())
    base = flops.model_flops_per_token(cfg, 128)
    got = flops.hardware_flops_per_token(cfg, 128, "full", recompute_method="block", recompute_num_layers=1,
                                         pipeline_model_parallel_size=2)
    assert got == pytest.approx(base + 2 * per_layer)


@pytest.mark.timeout(10)
def test_step_helpers_and_mfu():
    cfg = get_preset("hcx-s")
    per_step = flops.model_flops_per_step(cfg, 4096, 256)
    assert per_step == flops.model_flops_per_token(cfg, 4096) * 4096 * 256
    t = per_step / 1e12 / (8 * 400.0)  # a step that runs at exactly 400 TFLOP/s on 8 GPUs
    assert flops.tflops_per_gpu(cfg, 4096, 256, t, 8) == pytest.approx(400.0)
    assert flops.mfu(cfg, 4096, 256, t, 8, 989.0) == pytest.approx(400.0 / 989.0)
    with pytest.raises(ValueError):
        flops.tflops_per_gpu(cfg, 4096, 256, 0.0, 8)
    with pytest.raises(ValueError):
        flops.hardware_flops_per_token(cfg, 4096, "bogus")
