"""Layer specs: Transformer Engine when importable, otherwise megatron-core local modules with
torch SDPA attention and a sequence-parallel-capable RMSNorm.

The local spec keeps megatron-core's TransformerLayer/SelfAttention/MLP and only swaps two submodules:
- core attention -> `SDPAAttention` (torch.nn.functional.scaled_dot_product_attention: flash/memory-efficient
  kernels on GPU, a fused kernel on CPU; `sdpa_call_plan` says which call each case gets), instead of megatron's
  DotProductAttention, which materialises the [b, n, s, s] score matrix;
- norms -> `RMSNorm`, which marks its weight `sequence_parallel` so megatron's finalize_model_grads
  all-reduces its gradient over the TP group (megatron's WrappedTorchNorm refuses sequence parallel);
- self attention -> `RotatedKeyCacheSelfAttention`, megatron's SelfAttention whose static inference KV cache
  holds keys with RoPE applied (KV-cached generation), identical outside inference.
- the layers' linears -> `NoGradColumnParallelLinear` / `NoGradRowParallelLinear`, megatron's own, which under
  torch.no_grad / inference_mode skip the autograd-Function plumbing (generation, PPO's scoring passes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig


def transformer_engine_import_error() -> str | None:
    """None when Transformer Engine and megatron-core's TE extension import; otherwise why not (the exception,
    e.g. TE missing, or present but built for another CUDA/torch), so callers can say it instead of guessing."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception as exc:  # ImportError, or TE present but broken for this CUDA (OSError, RuntimeError, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def transformer_engine_available() -> bool:
    return transformer_engine_import_error() is None


class RMSNorm(torch.nn.Module):
    """RMSNorm usable under sequence parallelism (the gradient is all-reduced by megatron over TP)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron-core's finalize_model_grads looks for this attribute on replicated params.
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# SDPA kernels by the names the probe (hcx_megatron/model/attention_probe.py) reports for the aten ops it sees.
FLASH, EFFICIENT, CUDNN, FLASH_CPU, MATH = "flash", "efficient", "cudnn", "flash_cpu", "math"
FLASH_MAX_HEAD_DIM = 256  # torch's CUDA flash kernel refuses larger heads (sdp_utils.cpp, check_head_dim_size_flash)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_EFFICIENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # CUDA memory-efficient kernel on sm80+


@dataclass(frozen=True)
class SDPACallPlan:
    expand_kv: bool  # repeat K/V heads to the query heads before the call
    enable_gqa: bool  # let SDPA read the K/V groups in place
    kernels: tuple[str, ...]  # what torch may select for this call (cuDNN where the torch build ranks it first)


def sdpa_call_plan(dtype: torch.dtype, has_mask: bool, gqa: bool, device_type: str,
                   head_dim: int = 128) -> SDPACallPlan:
    """How SDPAAttention calls torch SDPA so that the call lands on a fused kernel, never the math one.

    torch 2.5-2.13 on CUDA (sdp_utils.cpp): flash takes fp16/bf16, no mask, head_dim <= 256, and K/V groups with
    `enable_gqa`; memory-efficient takes fp16/bf16/fp32 and masks but not GQA; cuDNN (ranked first on some
    GPUs/torch builds) takes fp16/bf16, masks and GQA. An explicit mask or fp32 therefore rules flash out, and with
    `enable_gqa=True` nothing fused is left: SDPA falls to math, which materialises [b, n, s, s] scores. Those cases
    expand K/V heads instead (O(s) extra memory, exactly what SDPA's own GQA does inside the math kernel).

    | case (GQA)                          | CUDA call        | CUDA kernel          | CPU call   | CPU kernel |
    |-------------------------------------|------------------|----------------------|------------|------------|
    | (a) causal, no mask, bf16/fp16      | enable_gqa       | flash (or cuDNN)     | enable_gqa | flash_cpu  |
    | (b) causal, no mask, fp32           | expand K/V       | efficient            | enable_gqa | flash_cpu  |
    | (c) block-causal mask, bf16/fp16    | expand K/V       | efficient (or cuDNN) | enable_gqa | flash_cpu  |
    | (d) block-causal mask, fp32         | expand K/V       | efficient            | enable_gqa | flash_cpu  |
    | (e) no GQA (heads == groups)        | plain            | as the GQA row       | plain      | flash_cpu  |

    head_dim > 256 in bf16/fp16 without a mask is handled like (b). CPU's fused kernel takes every float dtype,
    masks and GQA, but not dropout (attention dropout > 0 in training runs math on CPU). Devices other than CPU
    get the CUDA call, which is correct everywhere; fp64 on CUDA has no fused kernel at all.
    """
    if device_type == "cpu":
        return SDPACallPlan(expand_kv=False, enable_gqa=gqa, kernels=(FLASH_CPU,))
    if dtype in _HALF_DTYPES and not has_mask and head_dim <= FLASH_MAX_HEAD_DIM:
        return SDPACallPlan(expand_kv=False, enable_gqa=gqa, kernels=(CUDNN, FLASH))
    if dtype in _EFFICIENT_DTYPES:
        kernels = (CUDNN, EFFICIENT) if dtype in _HALF_DTYPES else (EFFICIENT,)
        return SDPACallPlan(expand_kv=gqa, enable_gqa=False, kernels=kernels)
    return SDPACallPlan(expand_kv=False, enable_gqa=gqa, kernels=(MATH,))


class SDPAAttention(MegatronModule):
    """Core attention over torch SDPA with GQA; same call signature as megatron's DotProductAttention.

    Inputs are [s, b, heads, head_dim]; `attention_mask` follows megatron's convention (True = masked out),
    or None with a causal `attn_mask_type`. Packed documents (SFT) pass an explicit block-causal mask.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **_unused,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention (--transformer-impl "
                             "transformer_engine); the local SDPA spec supports --context-parallel-size 1 only")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise ValueError("packed sequences (PackedSeqParams) need Transformer Engine attention; on the local "
                             "spec pass a block-causal attention_mask instead")
        mask_type = attn_mask_type or self.attn_mask_type
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = q.shape[1] != k.shape[1]
        if attention_mask is None:
            is_causal, mask = mask_type == AttnMaskType.causal, None
            q_len, k_len = q.shape[2], k.shape[2]
            if is_causal and q_len != k_len:
                # Queries are the LAST q_len positions of the keys (KV-cached inference). SDPA's is_causal aligns
                # its mask top-left, which would hide the cache from them: align it bottom-right instead.
                is_causal = False
                if q_len > 1:
                    mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
        else:
            is_causal, mask = False, ~attention_mask  # SDPA: True = attend
        plan = sdpa_call_plan(q.dtype, mask is not None, gqa, q.device.type, q.shape[-1])
        if plan.expand_kv:
            # megatron lays query heads out group by group (q1 q2 k1 v1 | q3 q4 k2 v2 | ...): head h reads group
            # h // heads_per_group, which is what repeat_interleave (and SDPA's own enable_gqa) produces.
            heads_per_group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(heads_per_group, dim=1), v.repeat_interleave(heads_per_group, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout_p if self.training else 0.0, scale=self.softmax_scale,
            enable_gqa=plan.enable_gqa,
        )
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


class RotatedKeyCacheSelfAttention(SelfAttention):
    """megatron-core's SelfAttention, except that its static-batching inference KV cache holds keys with RoPE applied.

    megatron-core 0.16.1 caches keys before RoPE and, at every inference step, re-applies RoPE to the whole cache
    (`Attention._adjust_key_value_for_inference` slices the key embedding to [:sequence_end]): per layer and decode
    step, cos/sin and multiplies over every cached position, a cost that grows with the sequence (and with the batch)
    and dominated long decodes here. Its pre-rotated alternative, flash-decode, needs flash_attn (its fallback
    without it is wrong). So RoPE is applied here to the step's own queries and keys, at their positions, before
    megatron stores them; megatron then sees no rotary embedding to apply. Same elementwise ops on the same values:
    the attention inputs are bitwise those of megatron's path. Training and every other case are megatron's."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        if (inference_context is None or rotary_pos_emb is None or self.config.flash_decode
                or not inference_context.is_static_batching()):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        q_pos_emb, k_pos_emb = rotary_pos_emb  # [max_sequence_length, 1, 1, rotary dim] each
        start = inference_context.sequence_len_offset
        end = start + key.size(0)
        rope = dict(config=self.config, mscale=_yarn_get_concentration_factor_from_config(self.config),
                    cp_group=self.pg_collection.cp)
        if q_pos_emb is not None and q_pos_emb is k_pos_emb:
            # One RoPE call over the query and key heads together: per element the same ops as two calls (cos/sin
            # broadcast over heads), one set of cos/sin and Python dispatch fewer per layer and step.
            both = apply_rotary_pos_emb(torch.cat((query, key), dim=2), q_pos_emb[start:end], **rope)
            query, key = both.split((query.size(2), key.size(2)), dim=2)
        else:
            if q_pos_emb is not None:
                query = apply_rotary_pos_emb(query, q_pos_emb[start:end], **rope)
            if k_pos_emb is not None:
                key = apply_rotary_pos_emb(key, k_pos_emb[start:end], **rope)
        return super()._adjust_key_value_for_inference(inference_context, query, key, value, None, *args, **kwargs)


def _no_grad_direct_ok(linear) -> bool:
    """Whether a megatron linear's forward may run as a plain matmul: no autograd graph is being recorded, and none
    of the features whose forward is not just matmul (+ bias) (+ megatron's TP collective) is on."""
    config = linear.config
    return (not torch.is_grad_enabled() and not linear.sequence_parallel and not linear.explicit_expert_comm
            and not config.defer_embedding_wgrad_compute and config._cpu_offloading_context is None)


class NoGradColumnParallelLinear(ColumnParallelLinear):
    """megatron-core's ColumnParallelLinear; without autograd (torch.no_grad / inference_mode) the forward is the
    same matmul (+ bias) megatron's linear Function computes, called directly, and megatron's all-gather when the
    output is gathered over TP > 1. Why: at decode steps of small models the ~4 autograd Function.apply per linear
    (copy-to-TP-region, the linear Function, ...) cost more than the matmul. Same parameters, same values
    (tests/test_generate.py compares log-probs bitwise); with autograd on, megatron's forward unchanged."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is not None or not _no_grad_direct_ok(self):
            return super().forward(input_, weight, runtime_gather_output)
        output = torch.matmul(input_, self.weight.t())  # LinearWithGradAccumulationAndAsyncCommunication.forward
        if self.bias is not None and not self.skip_bias_add:
            output = output + self.bias
        gather = self.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_group.size() > 1:
            output = gather_from_tensor_model_parallel_region(output, group=self.tp_group)
        return output, (self.bias if self.skip_bias_add else None)


class NoGradRowParallelLinear(RowParallelLinear):
    """megatron-core's RowParallelLinear; without autograd, the matmul called directly, then megatron's all-reduce
    over TP > 1 and the bias (see NoGradColumnParallelLinear)."""

    def forward(self, input_):
        if not self.input_is_parallel or not _no_grad_direct_ok(self):
            return super().forward(input_)
        output = torch.matmul(input_, self.weight.t())
        if self.tp_group.size() > 1:
            output = reduce_from_tensor_model_parallel_region(output, group=self.tp_group)
        if self.skip_bias_add:
            return output, self.bias
        return (output + self.bias if self.bias is not None else output), None


def local_layer_spec() -> ModuleSpec:
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    sub.self_attention.module = RotatedKeyCacheSelfAttention
    sub.self_attention.submodules.core_attention = SDPAAttention
    sub.self_attention.submodules.linear_qkv = NoGradColumnParallelLinear
    sub.self_attention.submodules.linear_proj = NoGradRowParallelLinear
    sub.mlp.submodules.linear_fc1 = NoGradColumnParallelLinear
    sub.mlp.submodules.linear_fc2 = NoGradRowParallelLinear
    return spec


def te_layer_spec() -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def select_layer_spec(transformer_impl: str, device: str) -> tuple[ModuleSpec, str]:
    """Returns (spec, impl name). 'auto' takes TE on GPU when importable."""
    if transformer_impl == "local" or (transformer_impl == "auto" and device != "cuda"):
        return local_layer_spec(), "local"
    error = transformer_engine_import_error()
    if error is None:
        return te_layer_spec(), "transformer_engine"
    if transformer_impl == "transformer_engine":
        raise RuntimeError(f"--transformer-impl transformer_engine but Transformer Engine does not import ({error}); "
                           "pip install .[gpu] inside a CUDA environment")
    # auto on CUDA: the local spec still trains correctly (bf16, SDPA attention), but say why TE is not used.
    # FP8 never gets here: validate_config rejects --fp8-format without an importable TE.
    _say_te_fallback(error)
    return local_layer_spec(), "local"


@functools.lru_cache(maxsize=None)
def _say_te_fallback(error: str) -> None:
    """Print the reason once per process (the spec is selected once per model built)."""
    print(f"[hcx] --transformer-impl auto: Transformer Engine does not import ({error}); using the local spec",
          flush=True)


def final_norm_class(impl: str):
    """Final layernorm of the decoder block for the chosen impl."""
    if impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm
