"""Build HCX decoders on megatron-core: TransformerConfig from our typed config, one GPTModel per pipeline
stage (one per virtual stage with interleaving), layout-independent init, megatron DDP wrapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from hcx_megatron.config.args import Config
from hcx_megatron.model.init import initialize_model_chunk
from hcx_megatron.model.spec import final_norm_class, select_layer_spec


def _no_init(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def fused_kernel_settings(device: str, main_grads: bool = True) -> dict[str, bool]:
    """megatron-core's kernel-fusion switches for this device. CPU mode runs everything unfused (CPU results
    must not depend on fusion, and the fused kernels are CUDA ones). On CUDA:
    - bias_activation_fusion / bias_dropout_fusion: megatron's own fused SwiGLU and bias-dropout-add
      (torch.compile'd), available wherever CUDA is;
    - apply_rope_fusion: Transformer Engine's fused RoPE, when megatron found it (TE installed);
    - gradient_accumulation_fusion: weight gradients accumulated straight into DDP's fp32 main_grad buffers.
      Needs megatron's output layer (a plain ColumnParallelLinear, whatever the spec) to find apex's
      `fused_weight_gradient_mlp_cuda`, and main_grad buffers to exist (DDP-wrapped models that train);
    - masked_softmax_fusion / persist_layer_norm stay off: they serve megatron's DotProductAttention and apex
      LayerNorm, which neither of our specs uses (SDPA or TE attention; RMSNorm).
    """
    if device != "cuda":
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                    gradient_accumulation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False)
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import layers

    return dict(
        bias_activation_fusion=True,
        bias_dropout_fusion=True,
        apply_rope_fusion=rope_utils.fused_apply_rotary_pos_emb is not None,
        gradient_accumulation_fusion=main_grads and layers._grad_accum_fusion_available,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )


def transformer_config_from(cfg: Config, impl: str, device: str, main_grads: bool = True) -> TransformerConfig:
    """main_grads: the model will be DDP-wrapped (fp32 main_grad buffers exist for fused gradient accumulation)."""
    m, p, t = cfg.model, cfg.parallel, cfg.training
    dtype = torch.bfloat16 if t.bf16 else torch.float32
    kwargs = {}
    if cfg.runtime.fp8_format:
        kwargs.update(
            fp8=cfg.runtime.fp8_format,
            fp8_recipe="delayed" if cfg.runtime.fp8_recipe == "delayed" else "tensorwise",
            fp8_amax_history_len=cfg.runtime.fp8_amax_history_len,
            fp8_amax_compute_algo="max",
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # megatron-core's init pass must run, because it is also what tags parameters with their TP layout
        # (tensor_model_parallel / partition_dim, used by grad-norm and DDP); the values it would draw are
        # per-rank though, so it draws nothing (no-op init methods) and hcx_megatron.model.init then sets every
        # weight layout-independently.
        perform_initialization=True,
        init_method=_no_init,
        output_layer_init_method=_no_init,
        embedding_init_method=_no_init,
        use_cpu_initialization=False,
        # Per-token loss normalisation over micro-batches and DP ranks (must be set before DDP is built: it
        # decides DDP's gradient scaling).
        calculate_per_token_loss=True,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        # Uneven pipeline stages; validate_config checked them with config/layout_rules.py (megatron's own split).
        num_layers_in_first_pipeline_stage=p.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=p.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=p.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=p.account_for_loss_in_pipeline_split,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=t.bf16,
        autocast_dtype=dtype,
        **fused_kernel_settings(device, main_grads),
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers if t.recompute_granularity == "full" else None,
        # SFT micro-batches differ in length: pipeline p2p then exchanges shapes first. (megatron's MoE check
        # wants the alltoall dispatcher named whenever this is on; we have no experts.)
        variable_seq_lengths=t.variable_seq_lengths,
        moe_token_dispatcher_type="alltoall" if t.variable_seq_lengths else "allgather",
        # Freeing a stage's output right after its send is safe with NCCL (stream-ordered) but not with gloo,
        # whose isend may still be reading the buffer: the next stage then receives garbage. Seen here as a
        # PP=2 loss that differed from PP=1 at step 1 on CPU.
        deallocate_pipeline_outputs=device == "cuda",
        # Batched p2p posts "send to prev" and "send to next" in one batch. With PP=2 and interleaving, prev and
        # next are the same peer; gloo then pairs an activation with a gradient receive of the same shape (seen
        # here: PP2xVPP2 diverged from PP1 from the third micro-batch). megatron's unbatched path sends the two
        # directions over different groups, which keeps them apart.
        batch_p2p_comm=device == "cuda",
        **kwargs,
    )


ModelFactory = Callable[[TransformerConfig, object, bool, bool, Optional[int]], torch.nn.Module]


@dataclass
class BuiltModel:
    chunks: list  # DDP-wrapped (or bare) model chunks, one per virtual pipeline stage
    config: TransformerConfig
    impl: str  # "transformer_engine" | "local"


def gpt_factory(cfg: Config, impl: str, model_cls=GPTModel) -> ModelFactory:
    """Default factory: a GPTModel (or a subclass with another head, e.g. model/heads.py) for one (virtual)
    pipeline stage."""

    def build(tconfig: TransformerConfig, layer_spec, pre_process: bool, post_process: bool,
              vp_stage: Optional[int]) -> torch.nn.Module:
        return model_cls(
            config=tconfig,
            transformer_layer_spec=block_spec(tconfig, layer_spec, impl, vp_stage),
            vocab_size=cfg.padded_vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not cfg.model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=cfg.model.rotary_base,
            vp_stage=vp_stage,
        )

    return build


def block_spec(tconfig: TransformerConfig, layer_spec: ModuleSpec, impl: str, vp_stage: Optional[int]):
    """Decoder block spec: our layer spec for each local layer, and a final norm that supports SP."""
    n = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * n, layer_norm=final_norm_class(impl))


def build_model(cfg: Config, device: str, factory: ModelFactory | None = None, wrap_ddp: bool = True,
                initialize: bool = True) -> BuiltModel:
    """Build this rank's model chunks. Requires parallel_state to be initialised."""
    layer_spec, impl = select_layer_spec(cfg.runtime.transformer_impl, device)
    tconfig = transformer_config_from(cfg, impl, device, main_grads=wrap_ddp)
    factory = factory or gpt_factory(cfg, impl)
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    stages = list(range(vpp)) if vpp else [None]
    chunks = []
    for vp_stage in stages:
        pre = ps.is_pipeline_first_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=vpp is None, vp_stage=vp_stage)
        chunk = factory(tconfig, layer_spec, pre, post, vp_stage)
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        if device == "cuda":
            chunk.cuda(torch.cuda.current_device())
        if initialize:
            initialize_model_chunk(
                chunk, seed=cfg.training.seed, init_std=cfg.model.init_method_std, num_layers=cfg.model.num_layers,
                vocab_size=cfg.model.vocab_size, tp_rank=ps.get_tensor_model_parallel_rank(),
                tp_size=ps.get_tensor_model_parallel_world_size(),
            )
        chunks.append(chunk)
    if wrap_ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            overlap_param_gather=cfg.parallel.overlap_param_gather,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=True,
            # average_in_collective keeps the sum-then-divide order identical across DP sizes.
            average_in_collective=False,
            use_megatron_fsdp=cfg.parallel.use_megatron_fsdp,
            data_parallel_sharding_strategy=cfg.parallel.data_parallel_sharding_strategy,
        )
        if cfg.parallel.use_megatron_fsdp:
            # megatron-core's Megatron-FSDP adapter, wrapped per chunk as Megatron-LM's get_model does (its FSDP
            # units: TransformerLayer with optim_grads_params, the whole chunk otherwise).
            from megatron.core.distributed.fsdp import FullyShardedDataParallel

            from hcx_megatron.distributed.cpu_mode import cuda_ordinal

            where = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
            with cuda_ordinal():  # CPU mode: its constructor formats the CUDA ordinal into a device string
                chunks = [FullyShardedDataParallel(config=tconfig, ddp_config=ddp_config, module=c,
                                                   disable_bucketing=i > 0, device=where)
                          for i, c in enumerate(chunks)]
            # (No broadcast_params() there: it fails on FSDP's DTensor parameters, torch having no sharding rule
            # for c10d.broadcast_; Megatron-LM calls it only with --data-parallel-random-init.)
        else:
            chunks = [DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
                      for i, c in enumerate(chunks)]
            for c in chunks:
                c.broadcast_params()  # DP replicas start identical (they already are; this is megatron's contract)
    return BuiltModel(chunks=chunks, config=tconfig, impl=impl)


def _encoder_or_decoder():
    from megatron.core.enums import ModelType

    return ModelType.encoder_or_decoder


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def sync_params_before_read(chunks) -> None:
    """Complete the parameter all-gather that --overlap-param-gather defers, before weights are read outside a
    training forward pass (checkpoint and weights-only saves, weight transfers, generation, eval).

    With the distributed optimizer each DP rank updates only its own shard in optimizer.step(); with
    overlap_param_gather the all-gather of the other shards waits for the next forward's pre-hooks, so a direct
    read sees stale shards. This is megatron's forced synchronous gather (Megatron-LM's save path does the same
    via disable_forward_pre_hook(param_sync=True)). It leaves every bucket group dispatched with no handle
    pending, so the next forward's pre-hooks neither wait nor gather again; the next step's grad sync resets that
    flag. Collective over each chunk's DP group: every DP rank calls it, after optimizer.step(), never between
    the grad sync and the step. No-op for bare modules and when overlap_param_gather or the distributed
    optimizer is off (optimizer.step() then gathers synchronously itself)."""
    for chunk in chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer and ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)
