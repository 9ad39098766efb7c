"""GPU-path settings that CPU can check: FP8 without Transformer Engine is an error naming the flag, a TE import
failure is shown instead of swallowed, fused kernels are on for CUDA and off in CPU mode, and MFU follows NVIDIA's
convention (causal attention counted half, FP8 runs against the FP8 peak, scalar heads without an LM head)."""

from __future__ import annotations

import pytest

from hcx_megatron.config.args import ConfigError, build_parser, config_from_args, validate_config
from hcx_megatron.model.spec import select_layer_spec

from conftest import SIMULATED_TE_IMPORT_ERROR as TE_ERROR

# The no-TE paths run everywhere: the fixture makes TE's import fail as on a machine without it.
needs_no_te = pytest.mark.usefixtures("without_transformer_engine")


def config(argv, world_size=1):
    return config_from_args(build_parser().parse_args(["--mock-data", *argv]), world_size)


@needs_no_te
def test_fp8_without_te_is_an_error_naming_the_flag_and_the_import_failure():
    cfg = config(["--device", "cuda", "--fp8-format", "hybrid", "--bf16"])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert "--fp8-format hybrid" in message and "Transformer Engine" in message
    assert TE_ERROR in message  # the actual import error, not a guess
    # Without --fp8-format the same CUDA config is valid (the local spec trains in bf16).
    validate_config(config(["--device", "cuda", "--bf16"]))


@needs_no_te
def test_te_import_failure_is_reported(capsys):
    with pytest.raises(RuntimeError, match="Transformer Engine does not import") as err:
        select_layer_spec("transformer_engine", "cuda")
    assert TE_ERROR in str(err.value)
    _, impl = select_layer_spec("auto", "cuda")
    assert impl == "local"
    assert TE_ERROR in capsys.readouterr().out  # the fallback says why
    _, impl = select_layer_spec("auto", "cpu")
    assert impl == "local" and capsys.readouterr().out == ""  # CPU never wants TE: nothing to report


def test_fused_kernels_on_for_cuda_off_for_cpu():
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers

    from hcx_megatron.model.builder import fused_kernel_settings, transformer_config_from

    cfg = config(["--device", "cpu"])
    cpu = transformer_config_from(cfg, "local", "cpu")
    names = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion")
    assert not any(getattr(cpu, n) for n in names)
    # megatron's TransformerConfig validates these in __post_init__: the CUDA config must construct.
    cuda = transformer_config_from(cfg, "local", "cuda")
    assert cuda.bias_activation_fusion and cuda.bias_dropout_fusion
    assert cuda.apply_rope_fusion == (rope_utils.fused_apply_rotary_pos_emb is not None)
    assert cuda.gradient_accumulation_fusion == layers._grad_accum_fusion_available
    # No main_grad buffers (inference-only builds): never fuse gradient accumulation.
    assert not fused_kernel_settings("cuda", main_grads=False)["gradient_accumulation_fusion"]


def test_mfu_counts_causal_attention_half_and_keeps_the_full_figure():
    from hcx_megatron.training.metrics import step_throughput

    cfg = config(["--device", "cpu", "--model-preset", "hcx-s", "--seq-length", "4096"])
    m, s = cfg.model, 4096
    tokens, seconds, gpus = 8 * s, 2.0, 8
    r = step_throughput(cfg, s, tokens, seconds, gpus)
    per_gpu = tokens / seconds / gpus
    assert r["tokens_per_sec_per_gpu"] == pytest.approx(per_gpu)
    # full - causal = forward+backward (x3) of half the score and probs.V matmuls (2 s a d per layer and token)
    half_attention = 3 * m.num_layers * 2 * s * m.num_attention_heads * m.head_dim
    assert (r["tflops_per_gpu_full_attention"] - r["tflops_per_gpu"]) * 1e12 == pytest.approx(half_attention * per_gpu)
    assert r["mfu"] == pytest.approx(r["tflops_per_gpu"] / 989.0)
    assert r["mfu_full_attention"] == pytest.approx(r["tflops_per_gpu_full_attention"] / 989.0)


def test_fp8_runs_divide_by_the_fp8_peak():
    from hcx_megatron.training.metrics import step_throughput

    bf16 = config(["--device", "cpu", "--seq-length", "128"])
    fp8 = config(["--device", "cpu", "--seq-length", "128", "--fp8-format", "hybrid", "--fp8-peak-tflops", "1500"])
    a, b = step_throughput(bf16, 128, 1024, 1.0, 1), step_throughput(fp8, 128, 1024, 1.0, 1)
    assert a["tflops_per_gpu"] == b["tflops_per_gpu"]  # same model work
    assert a["peak_tflops"] == 989.0 and b["peak_tflops"] == 1500.0
    assert b["mfu"] == pytest.approx(a["tflops_per_gpu"] / 1500.0)


def test_scalar_heads_are_not_credited_with_an_lm_head():
    from hcx_megatron.model.heads import ScalarHeadGPT
    from hcx_megatron.training.metrics import step_throughput

    cfg = config(["--device", "cpu", "--seq-length", "128"])
    lm = step_throughput(cfg, 128, 1024, 1.0, 1)
    head = step_throughput(cfg, 128, 1024, 1.0, 1, output_size=ScalarHeadGPT.output_size)
    missing = 3 * 2 * cfg.model.hidden_size * (cfg.padded_vocab_size - 1) * 1024
    assert (lm["tflops_per_gpu"] - head["tflops_per_gpu"]) * 1e12 == pytest.approx(missing)


@needs_no_te
def test_dry_run_plans_fp8_jobs_on_a_node_without_te():
    """A login node has no TE: the dry run checks the layout only; the ranks check TE where they train."""
    from launch.layout import parallel_layout_from_argv

    layout = parallel_layout_from_argv(["--mock-data", "--fp8-format", "hybrid", "--bf16",
                                        "--tensor-model-parallel-size", "2"], world_size=8)
    assert (layout.tp, layout.dp) == (2, 4)
