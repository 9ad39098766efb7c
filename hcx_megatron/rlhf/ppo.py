"""PPO driver: `python -m hcx_megatron.rlhf.ppo` (console script `hcx-ppo`): its flags, the config they resolve
to, and which process runs what. The models are defined once in ppo_models.py, the actor's Task once in
ppo_actor.py against `Peers` (where the other models live): ppo_colocated.py keeps them on the actor's ranks,
ppo_separate.py on their own rank partitions (placement.py chooses). docs/rlhf.md describes the whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from hcx_megatron.config.args import Config, ConfigError, explicit_model_flags, parse_config, validate_config
from hcx_megatron.config.frozen import freeze
from hcx_megatron.inference.generate import add_generation_args
from hcx_megatron.rlhf import placement as ppo_placement
from hcx_megatron.rlhf.common import (apply_checkpoint_model_shape, reject_context_parallel,
                                      reject_pretraining_loader_flags)
from hcx_megatron.rlhf.ppo_actor import CriticTask, PPOActorTask, Schedule
from hcx_megatron.rlhf.ppo_models import critic_config, critic_init, read_prompts, rollout_settings
from hcx_megatron.training.loop import main_wrapper, run, start_of_run


def add_ppo_args(parser) -> None:
    g = parser.add_argument_group("ppo")
    g.add_argument("--prompt-data", required=True,
                   help='JSONL of {"prompt": messages | "text"} (chat format) or {"prompt_ids": [...]}')
    g.add_argument("--sft-checkpoint", dest="pretrained_checkpoint", default=None,
                   help="actor and reference initialisation (the same flag as --pretrained-checkpoint)")
    g.add_argument("--rm-checkpoint", default=None, help="reward model (frozen) and critic initialisation")
    g.add_argument("--rule-reward", default=None,
                   help="synthetic rule reward instead of a reward model, e.g. share:7-7")
    g.add_argument("--reward-clip", type=float, default=None, help="override the reward model's stored clip")
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per PPO iteration (all DP ranks)")
    g.add_argument("--ppo-epochs", type=int, default=2, help="passes over each rollout batch")
    g.add_argument("--ppo-rollouts", type=int, default=None, help="number of PPO iterations (sets --train-iters)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    add_generation_args(g)
    g.add_argument("--rollout-temperature", type=float, default=1.0,
                   help="sampling temperature; log-probs for the ratio and KL are computed at the same one")
    g.add_argument("--rollout-top-p", type=float, default=1.0,
                   help="< 1 makes the sampler differ from the temperature-scaled policy the ratio uses")
    g.add_argument("--stop-ids", type=int, nargs="*", default=None,
                   help="default: <|endofturn|> with an HCX tokenizer, eod otherwise")
    g.add_argument("--init-kl-coef", type=float, default=0.04)
    g.add_argument("--adaptive-kl", action="store_true", help="Ziegler et al. adaptive KL controller")
    g.add_argument("--kl-target", type=float, default=6.0)
    g.add_argument("--kl-horizon", type=int, default=10000)
    g.add_argument("--kl-estimator", choices=["k1", "k3"], default="k1")
    g.add_argument("--gamma", type=float, default=1.0)
    g.add_argument("--lam", type=float, default=0.95)
    g.add_argument("--clip-range", type=float, default=0.2)
    g.add_argument("--value-clip-range", type=float, default=0.2)
    g.add_argument("--critic-lr", type=float, default=None, help="default: --lr")
    g.add_argument("--unlikelihood-weight", type=float, default=0.0,
                   help="sequence-level unlikelihood on repeated n-grams (0 = off)")
    g.add_argument("--repetition-ngram", type=int, default=2)
    g.add_argument("--async-rollouts", action="store_true")
    g.add_argument("--max-staleness", type=int, default=1,
                   help="async: a rollout is sampled at most this many PPO iterations behind the learner")
    ppo_placement.add_placement_args(parser)


@dataclasses.dataclass(frozen=True)
class PPOOptions:
    """PPO's own flags as one typed, frozen value (like SFT's `SFTOptions`); add_ppo_args holds the defaults.
    Where the actor and reference start (--sft-checkpoint) is the shared cfg.checkpoint.pretrained_checkpoint."""

    prompt_data: str
    rm_checkpoint: str | None  # frozen reward model; also the critic's initialisation
    rule_reward: str | None
    reward_clip: float | None  # None: the reward model's stored clip
    rollout_batch_size: int
    ppo_epochs: int
    ppo_rollouts: int | None
    max_new_tokens: int
    generation_kv_cache: bool
    rollout_temperature: float
    rollout_top_p: float
    stop_ids: tuple[int, ...] | None
    init_kl_coef: float
    adaptive_kl: bool
    kl_target: float
    kl_horizon: int
    kl_estimator: str
    gamma: float
    lam: float
    clip_range: float
    value_clip_range: float
    critic_lr: float | None  # None: --lr
    unlikelihood_weight: float
    repetition_ngram: int
    async_rollouts: bool
    max_staleness: int


def ppo_options_from_args(ns: argparse.Namespace) -> PPOOptions:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(PPOOptions)}
    return PPOOptions(**{**values, "stop_ids": None if ns.stop_ids is None else tuple(ns.stop_ids)})


def resolve_ppo_config(argv, world_size: int) -> tuple[Config, PPOOptions, ppo_placement.Placement]:
    """parse -> resolve (the model shape of the checkpoint the run starts from, --train-iters from
    --ppo-rollouts, the placement) -> validate once (per partition when the models get their own) -> freeze."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, ns = parse_config(argv, extra_args=add_ppo_args, description="HCX PPO (RLHF)", world_size=world_size,
                           validate=False)
    opts = ppo_options_from_args(ns)
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
    except (ConfigError, FileNotFoundError) as exc:
        raise SystemExit(f"hcx-ppo: {exc}") from None
    if placement.mode == "colocated":
        dp, p = cfg.data_parallel_size, cfg.parallel
        if opts.rollout_batch_size % (dp * t.micro_batch_size):
            raise SystemExit(f"hcx-ppo: --rollout-batch-size {opts.rollout_batch_size} must be a multiple of "
                             f"data-parallel size {dp} x --micro-batch-size {t.micro_batch_size}")
        if opts.async_rollouts and (p.tensor_model_parallel_size > 1 or p.pipeline_model_parallel_size > 1):
            raise SystemExit("hcx-ppo: --async-rollouts with colocated models needs --tensor-model-parallel-size 1 "
                             "and --pipeline-model-parallel-size 1 (the producer thread runs no collectives); "
                             "with --placement separate a rollout partition samples under any layout")
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
    role = part.name
    rcfg = ppo_placement.role_config(cfg, role, placement.roles[role], opts.rollout_batch_size)
    transfer = ppo_placement.rollout_weight_transfer(placement, cfg)
    if role == "actor":
        peers = sep.PartitionPeers(part, opts, schedule, transfer, placement.weights_dir)
        return run(rcfg, PPOActorTask(opts, schedule, peers, placement))
    if role == "critic":
        return run(critic_config(rcfg, opts), sep.CriticPartitionTask(opts, part, schedule, rcfg),
                   init_from=critic_init(opts, sft))
    return sep.serve_role(part, rcfg, opts, schedule, transfer, sft)


def main(argv=None) -> int:
    from hcx_megatron.distributed.env import world_size_from_env

    world_size = world_size_from_env()
    return run_ppo(*resolve_ppo_config(argv, world_size))


if __name__ == "__main__":  # the dist-checkpoint writer spawns processes: keep this guard
    main_wrapper(main)


__all__ = ["PPOActorTask", "CriticTask", "PPOOptions", "ppo_options_from_args", "add_ppo_args", "read_prompts",
           "rollout_settings", "resolve_ppo_config", "run_ppo", "main"]
