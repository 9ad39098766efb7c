"""SDPA kernel choice of the local spec's attention (hcx_megatron/model/spec.py, sdpa_call_plan / SDPAAttention)
and the kernel probe (hcx_megatron/model/attention_probe.py).

CUDA kernel selection cannot run here; its plan is checked against torch's selection rules (sdp_utils.cpp), and
the CUDA call (K/V expanded) is run on CPU to prove it computes the same attention. tools/gpu_check.py runs the
probe on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from torch.nn.attention import SDPBackend, sdpa_kernel

from hcx_megatron.model import spec
from hcx_megatron.model.attention_probe import (
    packed_block_causal_mask,
    probe_attention_kernels,
    sdpa_attention_module,
)
from hcx_megatron.model.spec import CUDNN, EFFICIENT, FLASH, FLASH_CPU, MATH, sdpa_call_plan

SEQ, BATCH, HEAD_DIM = 48, 2, 16
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def reference_attention(q, k, v, attention_mask, scale):
    """softmax(QK^T * scale + mask) V in float64 from megatron's [s, b, heads, d] tensors; query head h reads
    K/V group h // (heads / groups) (megatron's grouped head layout). attention_mask: True = masked; None =
    causal."""
    s, b, n, _ = q.shape
    per_group = n // k.shape[2]
    q, k, v = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    k = torch.stack([k[:, h // per_group] for h in range(n)], dim=1)
    v = torch.stack([v[:, h // per_group] for h in range(n)], dim=1)
    blocked = attention_mask if attention_mask is not None else ~torch.ones(s, s, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(blocked, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.permute(2, 0, 1, 3).reshape(s, b, n * out.shape[-1])


def _inputs(heads, groups, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SEQ, BATCH, h, HEAD_DIM, generator=gen).to(dtype).requires_grad_()
            for h in (heads, groups, groups)]


@pytest.fixture
def cuda_call_on_cpu(monkeypatch):
    """SDPAAttention makes the call it would make on CUDA (the plan for device 'cuda'), run on CPU; records what
    reached torch SDPA."""
    calls = []
    plan_for = spec.sdpa_call_plan
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        calls.append({"key_heads": k.shape[1], "query_heads": q.shape[1], "enable_gqa": kwargs["enable_gqa"]})
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(spec, "sdpa_call_plan",
                        lambda dtype, has_mask, gqa, _device, head_dim: plan_for(dtype, has_mask, gqa, "cuda",
                                                                                 head_dim))
    monkeypatch.setattr(spec.F, "scaled_dot_product_attention", recording_sdpa)
    return calls


CASES = [  # (heads, groups, packed)
    (8, 2, False),  # causal GQA
    (8, 2, True),  # packed (block-causal mask) GQA
    (4, 4, False),  # causal, no GQA
    (4, 4, True),  # packed, no GQA
]


def _check_against_reference(heads, groups, packed, dtype, tol):
    module = sdpa_attention_module(dtype, heads, groups, HEAD_DIM,
                                   AttnMaskType.padding if packed else AttnMaskType.causal)
    mask = packed_block_causal_mask(BATCH, SEQ, "cpu") if packed else None
    q, k, v = _inputs(heads, groups, dtype)
    out = module(q, k, v, mask)
    qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(qr, kr, vr, mask, module.softmax_scale)
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(grad_out.to(dtype))
    ref.backward(grad_out)
    for got, want in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,groups,packed", CASES)
@pytest.mark.parametrize("dtype,tol", [(FP32, 2e-5), (BF16, 3e-2)])
def test_cpu_call_matches_reference(heads, groups, packed, dtype, tol):
    _check_against_reference(heads, groups, packed, dtype, tol)


@pytest.mark.parametrize("heads,groups,packed", CASES)
@pytest.mark.parametrize("dtype,tol", [(FP32, 2e-5), (BF16, 3e-2)])
def test_cuda_call_matches_reference(cuda_call_on_cpu, heads, groups, packed, dtype, tol):
    _check_against_reference(heads, groups, packed, dtype, tol)
    (call,) = cuda_call_on_cpu
    # Masked or fp32 GQA reaches SDPA with K/V expanded (the memory-efficient kernel has no GQA); bf16 causal GQA
    # keeps its groups for flash.
    expanded = heads != groups and (packed or dtype == FP32)
    assert call["key_heads"] == (heads if expanded else groups)
    assert call["enable_gqa"] == (heads != groups and not expanded)


@pytest.mark.parametrize("dtype,has_mask,gqa,expand_kv,enable_gqa,kernels", [
    (BF16, False, True, False, True, {FLASH, CUDNN}),  # (a) causal GQA: flash reads the groups in place
    (FP16, False, True, False, True, {FLASH, CUDNN}),
    (FP32, False, True, True, False, {EFFICIENT}),  # (b) flash is half-precision only
    (BF16, True, True, True, False, {EFFICIENT, CUDNN}),  # (c) flash takes no mask, efficient no GQA
    (FP32, True, True, True, False, {EFFICIENT}),  # (d)
    (BF16, False, False, False, False, {FLASH, CUDNN}),  # (e) no GQA
    (BF16, True, False, False, False, {EFFICIENT, CUDNN}),
    (FP32, True, False, False, False, {EFFICIENT}),
])
def test_cuda_plan_per_case(dtype, has_mask, gqa, expand_kv, enable_gqa, kernels):
    plan = sdpa_call_plan(dtype, has_mask, gqa, "cuda", head_dim=128)
    assert (plan.expand_kv, plan.enable_gqa, set(plan.kernels)) == (expand_kv, enable_gqa, kernels)


def test_no_cuda_plan_leaves_a_grouped_call_without_flash():
    """The math fallback happens exactly when enable_gqa is passed to a call flash cannot take; no training dtype
    gets such a plan (head_dim 512 is beyond flash's 256 limit)."""
    for dtype, has_mask, gqa, head_dim in itertools.product((BF16, FP16, FP32), (False, True), (False, True),
                                                           (64, 128, 512)):
        plan = sdpa_call_plan(dtype, has_mask, gqa, "cuda", head_dim)
        flash_possible = dtype != FP32 and not has_mask and head_dim <= 256
        assert MATH not in plan.kernels
        assert not (plan.enable_gqa and not flash_possible), (dtype, has_mask, gqa, head_dim)
        assert plan.expand_kv == (gqa and not flash_possible)


def test_cpu_plan_keeps_groups():
    # torch's CPU flash kernel takes masks, every float dtype and GQA (sdp_utils_cpp.cpp), so nothing is copied.
    for dtype, has_mask, gqa in itertools.product((BF16, FP32), (False, True), (False, True)):
        plan = sdpa_call_plan(dtype, has_mask, gqa, "cpu", 128)
        assert (plan.expand_kv, plan.enable_gqa, plan.kernels) == (False, gqa, (FLASH_CPU,))


def test_probe_on_cpu_sees_the_fused_cpu_kernel():
    # Observed with torch 2.13 CPU: every case, fp32 and bf16, masked or not, GQA or not, forward and backward,
    # runs _scaled_dot_product_flash_attention_for_cpu (the math kernel only with dropout > 0).
    rows = probe_attention_kernels("cpu", BF16, 64, 8, 2, HEAD_DIM, batch=2, include_fp32=True)
    assert [(r["case"], r["dtype"]) for r in rows] == [
        ("causal_gqa", "bfloat16"), ("packed_gqa", "bfloat16"), ("causal_gqa", "float32"), ("packed_gqa", "float32")]
    for row in rows:
        assert (row["kernel"], row["backward_kernel"], row["ok"]) == (FLASH_CPU, FLASH_CPU, True), row
        assert row["peak_memory_bytes"] is None and row["wall_s"] > 0


def test_probe_reports_the_math_fallback():
    # The probe must be able to say "math": with only the math backend allowed, it does, and flags the row.
    with sdpa_kernel([SDPBackend.MATH]):
        rows = probe_attention_kernels("cpu", FP32, 32, 4, 2, HEAD_DIM)
    for row in rows:
        assert (row["kernel"], row["backward_kernel"], row["ok"]) == (MATH, MATH, False), row
