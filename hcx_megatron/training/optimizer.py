"""megatron-core Adam (optionally the distributed optimizer) and OptimizerParamScheduler from our config."""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from hcx_megatron.config.args import Config


def build_optimizer(cfg: Config, chunks):
    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=t.bf16,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    return optimizer, build_scheduler(cfg, optimizer)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Warmup then decay; counted in samples like Megatron-LM (step(increment=global_batch_size))."""
    t = cfg.training
    gbs = t.global_batch_size
    decay_iters = t.lr_decay_iters or t.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.lr_warmup_iters else t.lr,
        max_lr=t.lr,
        min_lr=min(t.min_lr, t.lr),
        lr_warmup_steps=t.lr_warmup_iters * gbs,
        lr_decay_steps=max(decay_iters * gbs, t.lr_warmup_iters * gbs + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=(decay_iters * gbs) // 10 if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="cosine" if t.lr_decay_style == "WSD" else None,
    )
