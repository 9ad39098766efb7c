"""Command-line flags (Megatron-LM names) -> typed configs, validated before any process group exists.

Drivers (pretrain, SFT, reward, PPO) share this parser and add their own flags through `extra_args`. Each
driver's `main`: parse -> resolve (what the flags leave open, e.g. a checkpoint's model shape) -> validate once
-> `freeze` (hcx_megatron/config/frozen.py) -> run. Parsing reads only argv: the world size is an input (drivers
pass the launcher's, hcx_megatron.distributed.env.world_size_from_env).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from hcx_megatron.config.frozen import Freezable
from hcx_megatron.config.errors import ConfigError
from hcx_megatron.config.layout_rules import layout_errors, virtual_stages_from_layers_per_stage
from hcx_megatron.config.model import ModelConfig, get_preset, load_model_yaml


@dataclass
class ParallelConfig(Freezable):
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Uneven pipeline stages (Megatron-LM flags; megatron-core TransformerConfig num_layers_in_first/last_
    # pipeline_stage, account_for_embedding/loss_in_pipeline_split). The split: config/layout_rules.py.
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    # Megatron-FSDP (megatron.core.distributed.fsdp) instead of megatron DDP: parameters, gradients and optimizer
    # state sharded over data parallelism as --data-parallel-sharding-strategy says.
    use_megatron_fsdp: bool = False
    data_parallel_sharding_strategy: str = "no_shard"

    @property
    def distributed_optimizer(self) -> bool:
        """megatron-core's DistributedOptimizer: --use-distributed-optimizer, and always under Megatron-FSDP (its
        optimizer over FSDP's sharded buffers)."""
        return self.use_distributed_optimizer or self.use_megatron_fsdp


@dataclass
class TrainingConfig(Freezable):
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 10
    seq_length: int = 128
    # HCX: 4k context for the first 90% of training, 32k for the last 10%.
    long_context_seq_length: int | None = None
    long_context_start_fraction: float = 0.9
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    recompute_granularity: str | None = None  # None | "selective" | "full"
    recompute_method: str | None = None  # "uniform" | "block" (full only)
    recompute_num_layers: int | None = None
    eval_interval: int = 0
    eval_iters: int = 2
    exit_interval: int | None = None  # stop (after saving) at this iteration; used by resume tests
    variable_seq_lengths: bool = False  # set by drivers whose micro-batches differ in length (SFT)


@dataclass
class DataConfig(Freezable):
    data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    mock_data: bool = False
    tokenizer_type: str | None = None
    tokenizer_model: str | None = None
    fim_rate: float = 0.0
    fim_spm_rate: float = 0.5
    fim_split_unit: str = "char"  # "char" | "token"
    num_workers: int = 0  # loader worker processes (torch DataLoader workers, DALI parallel external_source)
    dataloader: str = "torch"  # "torch" | "dali"
    data_prefetch_depth: int = 2  # micro-batches queued ahead (per torch worker; DALI's prefetch queue)
    dali_num_threads: int = 2
    data_cache_path: str | None = None
    eod_mask_loss: bool = False


@dataclass
class CheckpointConfig(Freezable):
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    finetune: bool = False  # load --load's weights only; fresh optimizer, scheduler and iteration
    # Weights only, used only when --load holds no checkpoint (so a requeued job resumes its own run). RM/PPO:
    # --sft-checkpoint is the same flag. The rule: hcx_megatron.training.loop.start_of_run.
    pretrained_checkpoint: str | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False


@dataclass
class LoggingConfig(Freezable):
    log_interval: int = 1
    tensorboard_dir: str | None = None
    metrics_jsonl: str | None = None
    peak_tflops: float = 989.0  # H100 SXM dense bf16 (the MFU denominator of bf16/fp32 runs)
    fp8_peak_tflops: float = 1979.0  # H100 SXM dense FP8 (the MFU denominator of --fp8-format runs)


@dataclass
class RuntimeConfig(Freezable):
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    transformer_impl: str = "auto"  # "auto" | "transformer_engine" | "local"
    fp8_format: str | None = None  # None | "e4m3" | "hybrid"
    fp8_recipe: str = "delayed"  # "delayed" | "tensorwise" (current scaling)
    fp8_amax_history_len: int = 1024
    distributed_timeout_minutes: int = 30
    world_size: int = 1


@dataclass
class Config(Freezable):
    model: ModelConfig
    parallel: ParallelConfig
    training: TrainingConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    runtime: RuntimeConfig

    @property
    def data_parallel_size(self) -> int:
        p = self.parallel
        return self.runtime.world_size // (
            p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
        )

    @property
    def num_microbatches(self) -> int:
        t = self.training
        return t.global_batch_size // (t.micro_batch_size * self.data_parallel_size)

    @property
    def padded_vocab_size(self) -> int:
        return self.model.padded_vocab_size(self.parallel.tensor_model_parallel_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_MODEL_FLAGS = {
    # flag dest -> ModelConfig field
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "vocab_size": "vocab_size",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rotary_base",
    "norm_epsilon": "norm_epsilon",
    "init_method_std": "init_method_std",
}


def build_parser(description: str = "hcx_megatron training") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--model-preset", default="hcx-tiny", help="hcx-tiny | hcx-s | hcx-l (s and l shapes are assumed)")
    g.add_argument("--model-config", default=None, help="YAML of ModelConfig fields (applied after the preset)")
    for dest in _MODEL_FLAGS:
        kind = float if dest in ("norm_epsilon", "init_method_std") else int
        g.add_argument("--" + dest.replace("_", "-"), dest=dest, type=kind, default=None)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron-LM compatibility; GQA is always on")
    g.add_argument("--untie-embeddings-and-output-weights", dest="untie", action="store_true", default=None)
    g.add_argument("--tie-embeddings-and-output-weights", dest="untie", action="store_false")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--virtual-pipeline-model-parallel-size", "--num-virtual-stages-per-pipeline-rank",
                   dest="virtual_pipeline_model_parallel_size", type=int, default=None,
                   help="virtual stages (model chunks) per pipeline rank: the interleaved 1F1B schedule")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="transformer layers on the first pipeline stage (default: an even split)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="transformer layers on the last pipeline stage (default: an even split)")
    g.add_argument("--account-for-embedding-in-pipeline-split", action="store_true",
                   help="count the embedding as one layer of the first stage when splitting layers")
    g.add_argument("--account-for-loss-in-pipeline-split", action="store_true",
                   help="count the output layer + loss as one layer of the last stage when splitting layers")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--use-megatron-fsdp", action="store_true",
                   help="data parallelism with Megatron-FSDP (megatron.core.distributed.fsdp) instead of DDP")
    g.add_argument("--data-parallel-sharding-strategy", default="no_shard",
                   choices=["no_shard", "optim", "optim_grads", "optim_grads_params"],
                   help="with --use-megatron-fsdp: what is sharded over DP (optim_grads_params: ZeRO-3)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, default=10)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--long-context-seq-length", type=int, default=None,
                   help="switch to this sequence length for the last part of training (HCX: 32768)")
    g.add_argument("--long-context-start-fraction", type=float, default=0.9)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", default="cosine", choices=["constant", "linear", "cosine", "WSD"])
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--recompute-granularity", choices=["selective", "full"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=2)
    g.add_argument("--exit-interval", type=int, default=None)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=[], help="Megatron blend: [w1] prefix1 [w2] prefix2 ...")
    g.add_argument("--valid-data-path", nargs="*", default=[])
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--tokenizer-type", default=None, help="HCXTokenizer (default when --tokenizer-model is given), "
                   "HuggingFaceTokenizer (an open model's tokenizer.json directory) or NullTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="directory written by tools/train_tokenizer.py")
    g.add_argument("--fim-rate", type=float, default=0.0)
    g.add_argument("--fim-spm-rate", type=float, default=0.5)
    g.add_argument("--fim-split-unit", choices=["char", "token"], default="char")
    g.add_argument("--num-workers", type=int, default=0,
                   help="pretraining loader worker processes (torch DataLoader workers; DALI Python workers)")
    g.add_argument("--dataloader", choices=["torch", "dali"], default="torch",
                   help="pretraining micro-batch loader; both yield bitwise the same batches (data/loaders.py)")
    g.add_argument("--data-prefetch-depth", type=int, default=2,
                   help="micro-batches prepared ahead: per worker for torch (its prefetch_factor; needs "
                        "--num-workers > 0), the pipeline's prefetch_queue_depth for DALI")
    g.add_argument("--dali-num-threads", type=int, default=2, help="DALI pipeline CPU threads")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eod-mask-loss", action="store_true")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--finetune", action="store_true", help="load only the weights of --load; start at iteration 0")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="start from this checkpoint's weights when --load holds no checkpoint (Megatron-LM's flag)")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None)
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU dense bf16 peak, the MFU denominator of bf16 runs (H100 SXM: 989)")
    g.add_argument("--fp8-peak-tflops", type=float, default=1979.0,
                   help="per-GPU dense FP8 peak, the MFU denominator of --fp8-format runs (H100 SXM: 1979)")

    g = p.add_argument_group("runtime")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--transformer-impl", choices=["auto", "transformer_engine", "local"], default="auto")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None)
    g.add_argument("--fp8-recipe", choices=["delayed", "tensorwise"], default="delayed",
                   help="delayed scaling or per-tensor current scaling")
    g.add_argument("--fp8-amax-history-len", type=int, default=1024)
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)
    return p


def _model_from_args(a: argparse.Namespace) -> ModelConfig:
    model = get_preset(a.model_preset)
    if a.model_config:
        model = load_model_yaml(a.model_config, base=model)
    overrides = {f: getattr(a, d) for d, f in _MODEL_FLAGS.items() if getattr(a, d) is not None}
    if a.untie is not None:
        overrides["untie_embeddings_and_output_weights"] = a.untie
    return dataclasses.replace(model, **overrides)


def explicit_model_flags(a: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """The model-shape flags given on the command line: {flag: (ModelConfig field, value)}."""
    out = {"--" + d.replace("_", "-"): (f, getattr(a, d)) for d, f in _MODEL_FLAGS.items() if getattr(a, d) is not None}
    if a.untie is not None:
        flag = "--untie-embeddings-and-output-weights" if a.untie else "--tie-embeddings-and-output-weights"
        out[flag] = ("untie_embeddings_and_output_weights", a.untie)
    return out


def config_from_args(a: argparse.Namespace, world_size: int = 1) -> Config:
    model = _model_from_args(a)
    vpp = a.virtual_pipeline_model_parallel_size
    if a.num_layers_per_virtual_pipeline_stage is not None:
        vpp = virtual_stages_from_layers_per_stage(
            model.num_layers, a.pipeline_model_parallel_size, a.num_layers_per_virtual_pipeline_stage,
            uneven=a.decoder_first_pipeline_num_layers is not None or a.decoder_last_pipeline_num_layers is not None,
            account_for_embedding=a.account_for_embedding_in_pipeline_split,
            account_for_loss=a.account_for_loss_in_pipeline_split)
    cfg = Config(
        model=model,
        parallel=ParallelConfig(
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            pipeline_model_parallel_size=a.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=vpp,
            context_parallel_size=a.context_parallel_size,
            sequence_parallel=a.sequence_parallel,
            use_distributed_optimizer=a.use_distributed_optimizer,
            overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather,
            decoder_first_pipeline_num_layers=a.decoder_first_pipeline_num_layers,
            decoder_last_pipeline_num_layers=a.decoder_last_pipeline_num_layers,
            account_for_embedding_in_pipeline_split=a.account_for_embedding_in_pipeline_split,
            account_for_loss_in_pipeline_split=a.account_for_loss_in_pipeline_split,
            use_megatron_fsdp=a.use_megatron_fsdp,
            data_parallel_sharding_strategy=a.data_parallel_sharding_strategy,
        ),
        training=TrainingConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainingConfig)
                                   if hasattr(a, f.name)}),
        data=DataConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(DataConfig)}),
        checkpoint=CheckpointConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(CheckpointConfig)}),
        logging=LoggingConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(LoggingConfig)}),
        runtime=RuntimeConfig(
            device=a.device,
            transformer_impl=a.transformer_impl,
            fp8_format=a.fp8_format,
            fp8_recipe=a.fp8_recipe,
            fp8_amax_history_len=a.fp8_amax_history_len,
            distributed_timeout_minutes=a.distributed_timeout_minutes,
            world_size=world_size,
        ),
    )
    return cfg


def resolve_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_config(cfg: Config, check_installed: bool = True) -> None:
    """Every check that can fail before torch.distributed starts. Messages name the flags.
    check_installed=False skips the checks of what this machine has installed (TE for FP8, DALI): a dry run plans
    on a login node, and the job's own ranks run those checks where they train."""
    m, p, t, d = cfg.model, cfg.parallel, cfg.training, cfg.data
    tp, pp, cp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.context_parallel_size, p.virtual_pipeline_model_parallel_size)
    ws = cfg.runtime.world_size
    for name, v in (("--train-iters", t.train_iters), ("--seq-length", t.seq_length)):
        if v < 1:
            raise ConfigError(f"{name} must be >= 1, got {v}")
    # The layout rules (divisibility, pipeline split, batch, sequence multiples): one module shared with the perf
    # model and PPO placement.
    errors = layout_errors(
        m, world_size=ws, tp=tp, pp=pp, cp=cp, vpp=vpp,
        first_stage_layers=p.decoder_first_pipeline_num_layers, last_stage_layers=p.decoder_last_pipeline_num_layers,
        account_for_embedding=p.account_for_embedding_in_pipeline_split,
        account_for_loss=p.account_for_loss_in_pipeline_split,
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        seq_lengths={"--seq-length": t.seq_length, "--long-context-seq-length": t.long_context_seq_length},
        sequence_parallel=p.sequence_parallel, fp8=bool(cfg.runtime.fp8_format), use_megatron_fsdp=p.use_megatron_fsdp,
        fsdp_sharding_strategy=p.data_parallel_sharding_strategy, overlap_param_gather=p.overlap_param_gather)
    if errors:
        raise ConfigError("; ".join(errors))
    if p.data_parallel_sharding_strategy != "no_shard" and not p.use_megatron_fsdp:
        raise ConfigError("--data-parallel-sharding-strategy needs --use-megatron-fsdp")
    if p.use_megatron_fsdp:
        if tp > 1:
            # megatron-core 0.16.1's adapter tests isinstance(module, TELinear) for TP > 1 (mcore_fsdp_adapter.py:184),
            # a TypeError when Transformer Engine does not import (TELinear is None), whatever the layer spec.
            from hcx_megatron.model.spec import transformer_engine_import_error

            reason = ("CPU mode has no Transformer Engine" if resolve_device(cfg.runtime.device) == "cpu" else
                      transformer_engine_import_error() if check_installed else None)
            if reason:
                raise ConfigError(f"--use-megatron-fsdp with --tensor-model-parallel-size {tp} needs Transformer "
                                  f"Engine ({reason}): megatron-core 0.16.1's Megatron-FSDP adapter checks for TE "
                                  "linear layers when TP > 1; use TP 1 or a GPU node with TE")
        if getattr(cfg.checkpoint, "pretrained_checkpoint", None):
            # --save/--load work (fsdp_dtensor format, training/checkpoint.py); starting from another run's weights
            # would need resharding them into FSDP's DTensors, which hcx_megatron does not do.
            raise ConfigError("--use-megatron-fsdp cannot be combined with --pretrained-checkpoint: Megatron-FSDP "
                              "runs save and resume (--save/--load, fsdp_dtensor format) but do not start from "
                              "another run's weights; use --use-distributed-optimizer without --use-megatron-fsdp")
    if not 0.0 < t.long_context_start_fraction < 1.0:
        raise ConfigError("--long-context-start-fraction must be in (0, 1)")
    if t.recompute_granularity == "full" and t.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform|block")
    if t.recompute_method is not None and t.recompute_granularity != "full":
        raise ConfigError("--recompute-method only applies with --recompute-granularity full")
    if d.data_path and not d.tokenizer_model:
        raise ConfigError("--data-path needs --tokenizer-model (the tokenizer the data was preprocessed with)")
    if not 0.0 <= d.fim_rate <= 1.0 or not 0.0 <= d.fim_spm_rate <= 1.0:
        raise ConfigError("--fim-rate and --fim-spm-rate must be in [0, 1]")
    if d.fim_rate > 0 and not d.tokenizer_model:
        raise ConfigError("--fim-rate needs --tokenizer-model (FIM uses its <|fim_*|> special tokens)")
    if cfg.checkpoint.save_interval is not None and cfg.checkpoint.save_interval < 1:
        raise ConfigError("--save-interval must be >= 1")
    if cfg.checkpoint.save_interval and not cfg.checkpoint.save:
        raise ConfigError("--save-interval needs --save DIR")
    if cfg.checkpoint.finetune and cfg.checkpoint.pretrained_checkpoint:
        raise ConfigError("--finetune (weights of --load) and --pretrained-checkpoint are two starts from another "
                          "run's weights: give one (--pretrained-checkpoint also lets a requeued job resume --load)")

    device = resolve_device(cfg.runtime.device)
    if device == "cpu":
        if cp > 1:
            raise ConfigError("--context-parallel-size > 1 needs GPUs with Transformer Engine attention; "
                              "CPU mode supports only 1")
        if cfg.runtime.fp8_format:
            raise ConfigError("--fp8-format needs GPUs with Transformer Engine; not available in CPU mode")
        if cfg.runtime.transformer_impl == "transformer_engine":
            raise ConfigError("--transformer-impl transformer_engine is not available in CPU mode")
    for name, v, low in (("--num-workers", d.num_workers, 0), ("--data-prefetch-depth", d.data_prefetch_depth, 1),
                         ("--dali-num-threads", d.dali_num_threads, 1)):
        if v < low:
            raise ConfigError(f"{name} must be >= {low}, got {v}")
    if d.dataloader == "dali" and check_installed:
        from hcx_megatron.data.dali_probe import dali_import_error

        error = dali_import_error()
        if error is not None:
            raise ConfigError(f"--dataloader dali needs NVIDIA DALI, which does not import here ({error}); "
                              "install it (pip install .[dali]) or use --dataloader torch")
    if cfg.runtime.fp8_format and cfg.runtime.transformer_impl == "local":
        raise ConfigError("--fp8-format needs --transformer-impl transformer_engine (or auto with TE installed)")
    if cfg.runtime.fp8_format and device == "cuda" and check_installed:
        # Without TE, megatron's FP8 context is a null context and the local spec would train in bf16 while the
        # user asked for FP8: refuse, and say why TE does not import.
        from hcx_megatron.model.spec import transformer_engine_import_error

        error = transformer_engine_import_error()
        if error is not None:
            raise ConfigError(f"--fp8-format {cfg.runtime.fp8_format} needs Transformer Engine, which does not import "
                              f"here ({error}); install it (pip install .[gpu]) or drop --fp8-format")


def parse_config(
    argv: Sequence[str] | None = None,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str = "hcx_megatron training",
    world_size: int = 1,
    validate: bool = True,
    extra_checks: Callable[[Config], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse and validate. Returns the typed config (not yet frozen: the driver resolves, then freezes) and the
    raw namespace (for driver-specific flags). world_size: the launcher's, which drivers read with
    hcx_megatron.distributed.env.world_size_from_env (1: one process, as tools and tests parse).
    validate=False: the caller validates (PPO validates each rank partition's config once it has sized them).
    extra_checks: the driver's own checks (e.g. pretraining's data flags), run after validate_config; a
    ConfigError they raise is reported like the parser's own errors."""
    parser = build_parser(description)
    if extra_args is not None:
        extra_args(parser)
    a = parser.parse_args(argv)
    try:
        cfg = config_from_args(a, world_size)
        if validate:
            validate_config(cfg)
            if extra_checks is not None:
                extra_checks(cfg)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg, a
