"""Which SDPA kernel serves the local spec's attention, observed rather than assumed.

`probe_attention_kernels` runs `SDPAAttention` forward and backward for the cases the local spec meets (causal
pretraining; packed SFT with a block-causal mask; both with GQA, and in fp32 when asked) and reads the aten op
that torch dispatched to from torch.profiler. Compare each row's `kernel` with `expected_kernels`
(`sdpa_call_plan`, hcx_megatron/model/spec.py): a `math` row means the O(s^2)-memory kernel ran.

    from hcx_megatron.model.attention_probe import probe_attention_kernels
    for row in probe_attention_kernels("cuda", torch.bfloat16, 8192, 32, 8, 128, include_fp32=True):
        print(row["case"], row["dtype"], row["kernel"], row["peak_memory_bytes"], row["ok"])
"""

from __future__ import annotations

import time
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.profiler import ProfilerActivity, profile

from hcx_megatron.data.sft_dataset import block_causal_mask
from hcx_megatron.model.spec import CUDNN, EFFICIENT, FLASH, FLASH_CPU, MATH, SDPAAttention, sdpa_call_plan

# The op each SDPA backend dispatches to; its backward is the same name + "_backward" (math has none: autograd
# runs through its bmm/softmax, so a math forward implies a math backward).
KERNEL_OF_OP = {
    "aten::_scaled_dot_product_flash_attention": FLASH,
    "aten::_scaled_dot_product_efficient_attention": EFFICIENT,
    "aten::_scaled_dot_product_cudnn_attention": CUDNN,
    "aten::_scaled_dot_product_flash_attention_for_cpu": FLASH_CPU,
    "aten::_scaled_dot_product_attention_math": MATH,
    "aten::_scaled_dot_product_attention_math_for_mps": MATH,
}
NO_KERNEL = "none"  # no SDPA op seen (e.g. the profiler missed it)
DOCUMENTS_PER_ROW = 3  # packed case: each row holds this many documents of (about) equal length


def kernels_in(op_names) -> tuple[str, str]:
    """(forward kernel, backward kernel) among profiled op names; several kernels are joined with '+'."""
    forward = sorted({KERNEL_OF_OP[n] for n in op_names if n in KERNEL_OF_OP})
    backward = sorted({KERNEL_OF_OP[n[: -len("_backward")]] for n in op_names
                       if n.endswith("_backward") and n[: -len("_backward")] in KERNEL_OF_OP})
    if not backward and forward == [MATH]:
        backward = [MATH]
    return "+".join(forward) or NO_KERNEL, "+".join(backward) or NO_KERNEL


def sdpa_attention_module(dtype: torch.dtype, num_heads: int, num_query_groups: int, head_dim: int,
                          mask_type: AttnMaskType) -> SDPAAttention:
    # SDPAAttention only reads the head geometry and dropout from the config; no process groups are needed.
    config = TransformerConfig(
        num_layers=1, hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
        num_query_groups=num_query_groups, kv_channels=head_dim, attention_dropout=0.0, hidden_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
    )
    return SDPAAttention(config, layer_number=1, attn_mask_type=mask_type, attention_type="self")


def packed_block_causal_mask(batch: int, seq_length: int, device) -> torch.Tensor:
    """[batch, 1, s, s] megatron mask (True = masked) of rows packed with DOCUMENTS_PER_ROW documents."""
    doc_ids = (torch.arange(seq_length) * DOCUMENTS_PER_ROW // seq_length).expand(batch, seq_length)
    return block_causal_mask(doc_ids).to(device)


def _probe_case(case: str, device: torch.device, dtype: torch.dtype, seq_length: int, num_heads: int,
                num_query_groups: int, head_dim: int, batch: int) -> dict:
    packed = case == "packed"
    module = sdpa_attention_module(dtype, num_heads, num_query_groups, head_dim,
                                   AttnMaskType.padding if packed else AttnMaskType.causal)
    mask = packed_block_causal_mask(batch, seq_length, device) if packed else None
    gen = torch.Generator(device="cpu").manual_seed(0)

    def leaf(heads: int) -> torch.Tensor:  # megatron's [s, b, heads, head_dim]
        t = torch.randn(seq_length, batch, heads, head_dim, generator=gen, dtype=torch.float32)
        return t.to(device=device, dtype=dtype).requires_grad_()

    q, k, v = leaf(num_heads), leaf(num_query_groups), leaf(num_query_groups)
    grad_out = torch.randn(seq_length, batch, num_heads * head_dim, generator=gen).to(device=device, dtype=dtype)

    def call():
        module(q, k, v, mask).backward(grad_out)
        q.grad = k.grad = v.grad = None

    # First call under the profiler (it also warms up kernel selection and library handles); the second one,
    # unprofiled, is timed and measured.
    # The aten ops are host-side events, so CPU activity suffices on CUDA too (no CUPTI needed).
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    forward_kernel, backward_kernel = kernels_in({event.name for event in prof.events()})

    peak: Optional[int] = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    wall = time.perf_counter() - start

    gqa = num_heads != num_query_groups
    plan = sdpa_call_plan(dtype, packed, gqa, device.type, head_dim)
    return {
        "case": f"{case}_{'gqa' if gqa else 'mha'}",
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "seq_length": seq_length, "batch": batch, "num_heads": num_heads, "num_query_groups": num_query_groups,
        "head_dim": head_dim, "has_mask": packed,
        "expand_kv": plan.expand_kv, "enable_gqa": plan.enable_gqa, "expected_kernels": list(plan.kernels),
        "kernel": forward_kernel, "backward_kernel": backward_kernel,
        "ok": forward_kernel in plan.kernels and backward_kernel in plan.kernels,
        "peak_memory_bytes": peak, "wall_s": wall,
    }


def probe_attention_kernels(device, dtype: torch.dtype, seq_length: int, num_heads: int, num_query_groups: int,
                            head_dim: int, batch: int = 1, include_fp32: bool = False) -> list[dict]:
    """One row per case: causal (no mask) and packed (block-causal mask of DOCUMENTS_PER_ROW documents), in
    `dtype` and, with include_fp32, in fp32 too. Each row: the call SDPAAttention made (expand_kv, enable_gqa),
    the kernels that call should get (expected_kernels), the kernels that served forward and backward (kernel,
    backward_kernel: flash, efficient, cudnn, flash_cpu, math, or none), ok (both among the expected),
    peak_memory_bytes (CUDA: forward+backward peak above what was allocated before; None elsewhere) and wall_s
    (forward+backward, second call)."""
    device = torch.device(device)
    dtypes = [dtype] + ([torch.float32] if include_fp32 and dtype != torch.float32 else [])
    return [_probe_case(case, device, dt, seq_length, num_heads, num_query_groups, head_dim, batch)
            for dt in dtypes for case in ("causal", "packed")]
