"""PPO driver: `python -m hcx_megatron.rlhf.ppo` (console script `hcx-ppo`): its flags, the config they resolve
to, and which process runs what. The models are defined once in ppo_models.py, the actor's Task once in
ppo_actor.py against `Peers` (where the other models live): ppo_colocated.py keeps them on the actor's ranks,
ppo_separate.py on their own rank partitions (placement.py chooses). docs/rlhf.md describes the whole.
"""

from __future__ import annotations

import dataclasses

from hcx_megatron.config.args import Config, ConfigError, explicit_model_flags, parse_config, validate_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.config.options import add_options, option, options_from_args
from hcx_megatron.inference.generate import add_generation_args
from hcx_megatron.rlhf import placement as ppo_placement
from hcx_megatron.rlhf.common import (apply_checkpoint_model_shape, reject_context_parallel,
                                      reject_pretraining_loader_flags)
from hcx_megatron.rlhf.ppo_actor import CriticTask, PPOActorTask, Schedule
from hcx_megatron.rlhf.ppo_models import critic_config, critic_init, read_prompts, rollout_settings
from hcx_megatron.training.loop import main_wrapper, run, start_of_run


@dataclasses.dataclass(frozen=True)
class PPOOptions:
    """PPO's own flags, defined once (config/options.py makes the argparse group and this typed, frozen value).
    Where the actor and reference start (--sft-checkpoint) is the shared cfg.checkpoint.pretrained_checkpoint."""

    prompt_data: str = option(help='JSONL of {"prompt": messages | "text"} (chat format) or {"prompt_ids": [...]}')
    rm_checkpoint: str | None = option(None, "reward model (frozen) and critic initialisation")
    rule_reward: str | None = option(None, "synthetic rule reward instead of a reward model, e.g. share:7-7")
    reward_clip: float | None = option(None, "override the reward model's stored clip")
    rollout_batch_size: int = option(16, "prompts per PPO iteration (all DP ranks)")
    ppo_epochs: int = option(2, "passes over each rollout batch")
    ppo_rollouts: int | None = option(None, "number of PPO iterations (sets --train-iters)")
    max_new_tokens: int = option(64)
    generation_kv_cache: bool = option(True, elsewhere=True)  # add_generation_args
    rollout_temperature: float = option(1.0, "sampling temperature, also of the log-probs of the ratio and KL")
    rollout_top_p: float = option(1.0, "< 1: the sampler differs from the temperature-scaled policy the ratio uses")
    stop_ids: tuple[int, ...] | None = option(None, "default: <|endofturn|> with an HCX tokenizer, eod otherwise")
    init_kl_coef: float = option(0.04)
    adaptive_kl: bool = option(False, "Ziegler et al. adaptive KL controller")
    kl_target: float = option(6.0)
    kl_horizon: int = option(10000)
    kl_estimator: str = option("k1", choices=("k1", "k3"))
    gamma: float = option(1.0)
    lam: float = option(0.95)
    clip_range: float = option(0.2)
    value_clip_range: float = option(0.2)
    critic_lr: float | None = option(None, "default: --lr")
    unlikelihood_weight: float = option(0.0, "sequence-level unlikelihood on repeated n-grams (0 = off)")
    repetition_ngram: int = option(2)
    async_rollouts: bool = option(False)
    max_staleness: int = option(1, "async: rollouts are sampled at most this many PPO iterations behind the learner")


def add_ppo_args(parser) -> None:
    g = parser.add_argument_group("ppo")
    add_options(g, PPOOptions)
    g.add_argument("--sft-checkpoint", dest="pretrained_checkpoint", default=None,
                   help="actor and reference initialisation (the same flag as --pretrained-checkpoint)")
    add_generation_args(g)
    ppo_placement.add_placement_args(parser)


def resolve_ppo_config(argv, world_size: int) -> tuple[Config, PPOOptions, ppo_placement.Placement]:
    """parse -> resolve (the model shape of the checkpoint the run starts from, --train-iters from
    --ppo-rollouts, the placement) -> validate once (per partition when the models get their own) -> freeze."""
    cfg, ns = parse_config(argv, extra_args=add_ppo_args, description="HCX PPO (RLHF)", world_size=world_size,
                           validate=False)
    opts = options_from_args(ns, PPOOptions)
    reject_context_parallel(cfg, "hcx-ppo")
    reject_pretraining_loader_flags(cfg, "hcx-ppo")
    if bool(opts.rm_checkpoint) == bool(opts.rule_reward):
        raise SystemExit("hcx-ppo: give exactly one of --rm-checkpoint or --rule-reward")
    t = cfg.training
    if opts.rollout_batch_size % t.global_batch_size:
        raise SystemExit(f"hcx-ppo: --rollout-batch-size {opts.rollout_batch_size} must be a multiple of "
                         f"--global-batch-size {t.global_batch_size}")
    if opts.async_rollouts and opts.max_staleness < 1:
        raise SystemExit("hcx-ppo: --max-staleness must be >= 1 with --async-rollouts")
    spr = opts.ppo_epochs * (opts.rollout_batch_size // t.global_batch_size)
    if opts.ppo_rollouts:
        t.train_iters = opts.ppo_rollouts * spr
    elif t.train_iters % spr:
        raise SystemExit(f"hcx-ppo: --train-iters {t.train_iters} is not a whole number of PPO iterations "
                         f"({spr} steps each); use --ppo-rollouts")
    try:
        shape_from = start_of_run(cfg).path or opts.rm_checkpoint
        if shape_from:
            apply_checkpoint_model_shape(cfg, shape_from, explicit_model_flags(ns))
        placement = ppo_placement.plan_placement(ns, cfg, world_size)
        if placement.mode == "colocated":
            validate_config(cfg)
            dp, p = cfg.data_parallel_size, cfg.parallel
            if opts.rollout_batch_size % (dp * t.micro_batch_size):
                raise SystemExit(f"hcx-ppo: --rollout-batch-size {opts.rollout_batch_size} must be a multiple of "
                                 f"data-parallel size {dp} x --micro-batch-size {t.micro_batch_size}")
            if opts.async_rollouts and (p.tensor_model_parallel_size > 1 or p.pipeline_model_parallel_size > 1):
                raise SystemExit("hcx-ppo: --async-rollouts with colocated models needs --tensor-model-parallel-size "
                                 "1 and --pipeline-model-parallel-size 1 (the producer thread runs no collectives); "
                                 "with --placement separate a rollout partition samples under any layout")
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"hcx-ppo: {exc}") from None
    return freeze(cfg), opts, placement


def run_ppo(cfg: Config, opts: PPOOptions, placement: ppo_placement.Placement) -> int:
    """What this process runs: with colocated models the actor and its in-process peers; with partitions, its
    partition's role. Every process of the job calls this; returns its exit code."""
    from hcx_megatron.rlhf.ppo_colocated import LocalPeers
    from hcx_megatron.rlhf import ppo_separate as sep

    t, sft = cfg.training, cfg.checkpoint.pretrained_checkpoint
    mpe = opts.rollout_batch_size // t.global_batch_size
    schedule = Schedule(opts.ppo_epochs * mpe, mpe, t.train_iters // (opts.ppo_epochs * mpe), t.seed,
                        t.micro_batch_size)
    if placement.mode == "colocated":
        return run(cfg, PPOActorTask(opts, schedule, LocalPeers(opts, schedule, sft), placement))
    part = sep.start_partition(cfg, placement)
    rcfg = ppo_placement.role_config(cfg, part.name, placement.roles[part.name], opts.rollout_batch_size)
    transfer = ppo_placement.rollout_weight_transfer(placement, cfg)
    if part.name == "actor":
        peers = sep.PartitionPeers(part, opts, schedule, transfer, placement.weights_dir)
        return run(rcfg, PPOActorTask(opts, schedule, peers, placement))
    if part.name == "critic":
        return run(critic_config(rcfg, opts), sep.CriticPartitionTask(opts, part, schedule, rcfg),
                   init_from=critic_init(opts, sft))
    return sep.serve_role(part, rcfg, opts, schedule, transfer, sft)


def main(argv=None) -> int:
    from hcx_megatron.distributed.env import world_size_from_env

    return run_ppo(*resolve_ppo_config(argv, world_size_from_env()))


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["PPOActorTask", "CriticTask", "PPOOptions", "add_ppo_args", "read_prompts",
           "rollout_settings", "resolve_ppo_config", "run_ppo", "main"]
