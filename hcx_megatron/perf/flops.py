"""FLOP counts for HCX decoders (GQA attention, SwiGLU MLP, untied vocabulary projection).

Convention (Megatron-LM / PaLM): count 2 FLOPs per multiply-accumulate of every matmul, ignore
element-wise work (norms, activations, softmax, RoPE), and count the attention score and
attention-over-values matmuls over the FULL sequence by default (no causal halving), as Narayanan et al.
2021 and PaLM's "6N + 12·L·H·Q·T" do (see "Causal attention" below for NVIDIA's current convention). With

    h = hidden_size, L = num_layers, s = seq_length, V = padded vocabulary,
    a = num_attention_heads, g = num_query_groups, d = head dim (kv_channels),
    f = ffn_hidden_size, G = 2 for gated (SwiGLU) MLPs and 1 otherwise,

the forward FLOPs of ONE token are

    per layer  F_layer = 2·h·(a·d + 2·g·d)      QKV projection (GQA: g key/value heads)
                       + 4·s·a·d                  scores Q·K^T and probs·V over s keys
                       + 2·a·d·h                  attention output projection
                       + 2·h·G·f + 2·f·h          fc1 (gate and up for SwiGLU) and fc2
    logits     F_out   = 2·h·V

and the model FLOPs of one token for forward + backward (backward = 2 x forward) are

    model_flops_per_token = 3·(L·F_layer + F_out)

which is 6·N_matmul + 12·L·s·a·d with N_matmul the weights of every matmul (the input embedding
is a lookup and costs nothing). For GPT-3-style models (g = a, a·d = h, f = 4h, G = 1) it reduces
to Narayanan et al.'s 72·L·h²·(1 + s/(6h) + V/(12·L·h)) per token.

Causal attention: a causal mask makes half of the score and probs·V work unnecessary, and flash-attention
kernels skip it. NVIDIA's current published tables (Megatron-Bridge, NeMo performance docs; Megatron-LM's
`num_floating_point_operations`) count it half; `causal=True` does the same (core attention 2·s·a·d per token),
and training metrics report both figures so numbers compare with either convention. Heads: a reward or value
model has a hidden -> 1 projection instead of the vocabulary (`output_size=1`).

Hardware FLOPs add the recomputed forward work: full recompute re-runs F_layer for every
recomputed layer (4·L·F_layer + 3·F_out, Narayanan's 96·L·h²·(1 + s/(6h) + V/(16·L·h)) for GPT),
selective recompute re-runs the core attention only (4·s·a·d per layer). MFU uses model FLOPs;
"achieved TFLOP/s" in Narayanan et al. uses hardware FLOPs with full recompute.
"""

from __future__ import annotations

from hcx_megatron.config.model import ModelConfig

RECOMPUTE_CHOICES = (None, "selective", "full")


def _vocab(cfg: ModelConfig, padded_vocab: int | None) -> int:
    # The logits matmul runs over the padded vocabulary (padding rows are real matmul work).
    return padded_vocab if padded_vocab is not None else cfg.padded_vocab_size(1)


def _gated(cfg: ModelConfig) -> bool:
    return cfg.activation.lower() in ("swiglu", "geglu", "reglu")


def layer_forward_flops_per_token(cfg: ModelConfig, seq_length: int, *, causal: bool = False) -> dict[str, float]:
    """Forward FLOPs of one transformer layer for one token, by part (see module docstring).
    causal=True counts the core attention half (NVIDIA's convention for causal masks)."""
    h, d, a, g, f = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups, cfg.ffn_hidden_size
    gate = 2 if _gated(cfg) else 1
    return {
        "qkv": 2.0 * h * (a * d + 2 * g * d),
        "core_attention": (2.0 if causal else 4.0) * seq_length * a * d,
        "attn_proj": 2.0 * a * d * h,
        "mlp": 2.0 * h * gate * f + 2.0 * f * h,
    }


def forward_flops_per_token(cfg: ModelConfig, seq_length: int, *, padded_vocab: int | None = None,
                            causal: bool = False, output_size: int | None = None) -> float:
    """Forward FLOPs of the whole model for one token: L·F_layer + 2·h·V (V = output_size when given: 1 for a
    scalar reward/value head)."""
    per_layer = sum(layer_forward_flops_per_token(cfg, seq_length, causal=causal).values())
    out = output_size if output_size is not None else _vocab(cfg, padded_vocab)
    return cfg.num_layers * per_layer + 2.0 * cfg.hidden_size * out


def model_flops_per_token(cfg: ModelConfig, seq_length: int, *, padded_vocab: int | None = None,
                          causal: bool = False, output_size: int | None = None) -> float:
    """Forward + backward MODEL FLOPs for one token, without recomputation (the MFU numerator).

    = 3·(L·F_layer + 2·h·V), F_layer as in the module docstring. `padded_vocab` defaults to the
    vocabulary padded for TP=1 (pass the run's padded size for exactness when TP > 1). `causal` and
    `output_size` as in forward_flops_per_token.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    return 3.0 * forward_flops_per_token(cfg, seq_length, padded_vocab=padded_vocab, causal=causal,
                                         output_size=output_size)


def recomputed_layers(num_layers: int, recompute_granularity: str | None, recompute_method: str | None = None,
                      recompute_num_layers: int | None = None, pipeline_model_parallel_size: int = 1) -> int:
    """How many of the model's layers re-run their forward under full recompute.

    Megatron's `uniform` method recomputes every layer (checkpointing groups of
    recompute_num_layers); `block` recomputes the first recompute_num_layers layers of EACH
    pipeline stage and keeps the rest.
    """
    if recompute_granularity != "full":
        return 0
    if recompute_method == "block" and recompute_num_layers is not None:
        per_stage = num_layers // pipeline_model_parallel_size
        return min(recompute_num_layers, per_stage) * pipeline_model_parallel_size
    return num_layers


def hardware_flops_per_token(cfg: ModelConfig, seq_length: int, recompute_granularity: str | None = None, *,
                             recompute_method: str | None = None, recompute_num_layers: int | None = None,
                             pipeline_model_parallel_size: int = 1, padded_vocab: int | None = None) -> float:
    """FLOPs the GPUs actually execute for one token, recomputation included.

    full: + F_layer per recomputed layer; selective: + 4·s·a·d per layer (core attention).
    """
    if recompute_granularity not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute_granularity must be one of {RECOMPUTE_CHOICES}, got {recompute_granularity!r}")
    flops = model_flops_per_token(cfg, seq_length, padded_vocab=padded_vocab)
    parts = layer_forward_flops_per_token(cfg, seq_length)
    if recompute_granularity == "full":
        n = recomputed_layers(cfg.num_layers, "full", recompute_method, recompute_num_layers,
                              pipeline_model_parallel_size)
        flops += n * sum(parts.values())
    elif recompute_granularity == "selective":
        flops += cfg.num_layers * parts["core_attention"]
    return flops


def model_flops_per_step(cfg: ModelConfig, seq_length: int, global_batch_size: int, *,
                         padded_vocab: int | None = None) -> float:
    """Model FLOPs of one optimizer step (global_batch_size sequences of seq_length tokens)."""
    return model_flops_per_token(cfg, seq_length, padded_vocab=padded_vocab) * seq_length * global_batch_size


def model_tflop_per_step(cfg: ModelConfig, seq_length: int, global_batch_size: int, *,
                         padded_vocab: int | None = None) -> float:
    """model_flops_per_step in TFLOP (1e12)."""
    return model_flops_per_step(cfg, seq_length, global_batch_size, padded_vocab=padded_vocab) / 1e12


def tflops_per_gpu(cfg: ModelConfig, seq_length: int, global_batch_size: int, step_time_s: float, num_gpus: int, *,
                   padded_vocab: int | None = None) -> float:
    """Achieved model TFLOP/s per GPU for one step that took step_time_s on num_gpus GPUs."""
    if step_time_s <= 0 or num_gpus < 1:
        raise ValueError(f"need step_time_s > 0 and num_gpus >= 1, got {step_time_s}, {num_gpus}")
    return model_tflop_per_step(cfg, seq_length, global_batch_size, padded_vocab=padded_vocab) / step_time_s / num_gpus


def mfu(cfg: ModelConfig, seq_length: int, global_batch_size: int, step_time_s: float, num_gpus: int,
        peak_tflops: float, *, padded_vocab: int | None = None) -> float:
    """Model FLOPs utilisation: achieved model TFLOP/s per GPU over the GPU's dense peak."""
    return tflops_per_gpu(cfg, seq_length, global_batch_size, step_time_s, num_gpus,
                          padded_vocab=padded_vocab) / peak_tflops


__all__ = [
    "layer_forward_flops_per_token",
    "forward_flops_per_token",
    "model_flops_per_token",
    "hardware_flops_per_token",
    "recomputed_layers",
    "model_flops_per_step",
    "model_tflop_per_step",
    "tflops_per_gpu",
    "mfu",
]
