"""Where PPO's models run: all on the same ranks (colocated) or each on its own rank partition (separate).

Pure planning, called before any process group exists, so a bad layout fails with the flags it involves.

    separate:  [ actor | rollout (async only) | critic | reference | reward (not with --rule-reward) ]

Each partition is a megatron world of its own (hcx_megatron/distributed/partition.py) with its own TP x PP and
the data parallelism its rank count leaves:
- actor: the run's --tensor-model-parallel-size / --pipeline-model-parallel-size (/ virtual); trains the policy;
  in synchronous mode it also samples the rollouts.
- rollout (--async-rollouts only): samples rollout r+1.. while the actor trains on rollout r. By default a copy
  of the actor (same layout and size) that receives the actor's weights shard to shard; with
  --rollout-ranks / --rollout-tensor-model-parallel-size / --rollout-pipeline-model-parallel-size a layout of
  its own, loading each weights version resharded from a dist checkpoint the actor writes.
- critic, reference, reward: --{role}-ranks, --{role}-tensor-model-parallel-size,
  --{role}-pipeline-model-parallel-size (defaults: one model-parallel group of the actor's TP x PP).

--placement auto (the default) uses separate partitions when the world holds them with their default sizes
and the layouts validate, colocated otherwise; the run's first line says which, and why. Any partition flag
(--actor-ranks, --critic-ranks, ...) makes auto mean separate, so a bad partition layout is an error.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from hcx_megatron.config.args import Config, ConfigError, validate_config
from hcx_megatron.config.layout_rules import GBS, PP, TP, WORLD, layout_errors

FROZEN_AND_CRITIC = ("critic", "reference", "reward")
ORDER = ("actor", "rollout", "critic", "reference", "reward")


@dataclass(frozen=True)
class RoleLayout:
    ranks: int
    tp: int
    pp: int

    @property
    def dp(self) -> int:
        return self.ranks // (self.tp * self.pp)


@dataclass
class Placement:
    mode: str  # "colocated" | "separate"
    roles: dict[str, RoleLayout]  # separate only, in ORDER
    reason: str = ""
    # async with a rollout layout of its own: where the actor writes each weights version for it to load
    weights_dir: str | None = None

    def describe(self, cfg: Config | None = None) -> str:
        if self.mode == "colocated":
            if cfg is None:
                return f"colocated: actor, critic, reference and reward on the same ranks ({self.reason})"
            p = cfg.parallel
            return (f"actor, critic, reference and reward on the same {cfg.runtime.world_size} ranks ({self.reason}) "
                    f"(TP {p.tensor_model_parallel_size}, PP {p.pipeline_model_parallel_size}, "
                    f"DP {cfg.data_parallel_size})")
        parts, start = [], 0
        for name, r in self.roles.items():
            span = f"rank {start}" if r.ranks == 1 else f"ranks {start}-{start + r.ranks - 1}"
            parts.append(f"{name} {span} (TP {r.tp}, PP {r.pp}, DP {r.dp})")
            start += r.ranks
        return "separate partitions: " + ", ".join(parts)


def add_placement_args(parser) -> None:
    g = parser.add_argument_group("ppo placement")
    g.add_argument("--placement", choices=["auto", "colocated", "separate"], default="auto",
                   help="separate: each model on its own rank partition with its own TP/PP")
    g.add_argument("--actor-ranks", type=int, default=None, help="separate: default, the ranks left over")
    for role in FROZEN_AND_CRITIC + ("rollout",):
        g.add_argument(f"--{role}-ranks", type=int, default=None,
                       help=f"separate: ranks of the {role} partition (default: one TP x PP group"
                            + ("; rollout: the actor's ranks and layout" if role == "rollout" else "") + ")")
        g.add_argument(f"--{role}-tensor-model-parallel-size", type=int, default=None,
                       help="default: the actor's --tensor-model-parallel-size")
        g.add_argument(f"--{role}-pipeline-model-parallel-size", type=int, default=None,
                       help="default: the actor's --pipeline-model-parallel-size")
    g.add_argument("--rollout-weights-dir", default=None,
                   help="async with a rollout layout other than the actor's: where the actor writes each weights "
                        "version for the rollout partition to load (default SAVE/rollout_weights; must be visible "
                        "to both partitions)")


def _mirrors_actor(cfg: Config, layout: RoleLayout) -> bool:
    p = cfg.parallel
    return (layout.tp, layout.pp) == (p.tensor_model_parallel_size, p.pipeline_model_parallel_size)


def rollout_weight_transfer(placement: "Placement", cfg: Config) -> str | None:
    """How the async rollout partition gets the actor's weights: "p2p" (same layout and size: rank j sends its
    shards to rank j) or "checkpoint" (another layout: the actor writes each version with dist_checkpointing and
    the rollout partition loads it resharded, like any checkpoint). None without a rollout partition."""
    r = placement.roles.get("rollout")
    if r is None:
        return None
    return "p2p" if _mirrors_actor(cfg, r) and r.ranks == placement.roles["actor"].ranks else "checkpoint"


def _flag(role: str, what: str) -> str:
    return f"--{role}-{what}"


def role_config(cfg: Config, role: str, layout: RoleLayout, rollout_batch: int) -> Config:
    """The actor's config with this role's layout and world size (a new value: `cfg` may be frozen). Frozen
    roles only run forward passes over their share of a rollout batch, so their 'global batch' is the rollout
    batch."""
    c = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, world_size=layout.ranks))
    if role == "actor" or (role == "rollout" and _mirrors_actor(cfg, layout)):
        return c
    frozen_role = role != "critic"
    parallel = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=None,
        # The actor's uneven pipeline split is for its own PP; another layout splits evenly.
        decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None,
        sequence_parallel=cfg.parallel.sequence_parallel and layout.tp > 1,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer and not frozen_role)
    training = dataclasses.replace(cfg.training, global_batch_size=rollout_batch) if frozen_role else cfg.training
    return dataclasses.replace(c, parallel=parallel, training=training)


def _validate(cfg: Config, role: str, layout: RoleLayout, rollout_batch: int) -> None:
    rc = role_config(cfg, role, layout, rollout_batch)
    p = rc.parallel
    # The layout rules (config/layout_rules.py) under this partition's flags, for the rollout batch every role
    # splits over its data parallelism. VPP is left out here: the interleaved micro-batch grouping is a training
    # rule, checked on the training batch by validate_config below.
    own = {} if role == "actor" else {TP: _flag(role, "tensor-model-parallel-size"),
                                      PP: _flag(role, "pipeline-model-parallel-size")}
    errors = layout_errors(
        rc.model, world_size=layout.ranks, tp=layout.tp, pp=layout.pp, cp=p.context_parallel_size,
        first_stage_layers=p.decoder_first_pipeline_num_layers, last_stage_layers=p.decoder_last_pipeline_num_layers,
        account_for_embedding=p.account_for_embedding_in_pipeline_split,
        account_for_loss=p.account_for_loss_in_pipeline_split,
        micro_batch_size=rc.training.micro_batch_size, global_batch_size=rollout_batch,
        flags={WORLD: f"{role} partition size ({_flag(role, 'ranks')})", GBS: "--rollout-batch-size", **own})
    names = ("the actor's flags" if role == "actor" else
             f"{_flag(role, 'ranks')} {layout.ranks}, {_flag(role, 'tensor-model-parallel-size')} {layout.tp}, "
             f"{_flag(role, 'pipeline-model-parallel-size')} {layout.pp}")
    try:
        if errors:
            raise ConfigError("; ".join(errors))
        validate_config(rc)
    except ConfigError as exc:
        raise ConfigError(f"{role} partition ({names}, --rollout-batch-size {rollout_batch}): {exc}") from None


def plan_placement(args, cfg: Config, world_size: int) -> Placement:
    """Decide colocated vs separate and size the partitions. `args` carries the placement flags and
    --rule-reward / --async-rollouts / --rollout-batch-size."""
    p = cfg.parallel
    actor_mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    if args.placement == "colocated":
        return Placement("colocated", {}, "--placement colocated")
    # Partition flags under auto mean the user wants partitions: their errors are raised, not fallen back from.
    sized = FROZEN_AND_CRITIC + ("rollout",)
    explicit = args.placement == "separate" or args.actor_ranks is not None or any(
        getattr(args, f"{role}_{what}") is not None for role in sized
        for what in ("ranks", "tensor_model_parallel_size", "pipeline_model_parallel_size"))
    roles = ["critic", "reference"] + ([] if args.rule_reward else ["reward"])
    layouts: dict[str, RoleLayout] = {}
    for role in roles:
        tp = getattr(args, f"{role}_tensor_model_parallel_size") or p.tensor_model_parallel_size
        pp = getattr(args, f"{role}_pipeline_model_parallel_size") or p.pipeline_model_parallel_size
        layouts[role] = RoleLayout(getattr(args, f"{role}_ranks") or tp * pp, tp, pp)
    # The async rollout partition mirrors the actor unless it is given a layout or size of its own.
    own_rollout = args.async_rollouts and any(getattr(args, f"rollout_{w}") is not None for w in (
        "ranks", "tensor_model_parallel_size", "pipeline_model_parallel_size"))
    if own_rollout:
        tp = args.rollout_tensor_model_parallel_size or p.tensor_model_parallel_size
        pp = args.rollout_pipeline_model_parallel_size or p.pipeline_model_parallel_size
        layouts = {"rollout": RoleLayout(args.rollout_ranks or tp * pp, tp, pp), **layouts}
    copies = 2 if args.async_rollouts and not own_rollout else 1
    others = sum(r.ranks for r in layouts.values())
    actor_ranks = args.actor_ranks or (world_size - others) // copies
    try:
        if actor_ranks < actor_mp:
            raise ConfigError(f"world size {world_size} leaves {max(actor_ranks, 0)} actor ranks after critic, "
                              f"reference{', reward' if 'reward' in layouts else ''}"
                              f"{' and rollout' if copies == 2 else ''} partitions ({others} ranks); the actor needs "
                              f"TP x PP = {actor_mp} (--actor-ranks)")
        if copies * actor_ranks + others != world_size:
            raise ConfigError(f"partitions take {copies * actor_ranks + others} ranks (actor {actor_ranks}"
                              f"{f', rollout {actor_ranks}' if copies == 2 else ''}, "
                              + ", ".join(f"{k} {v.ranks}" for k, v in layouts.items())
                              + f"), the world has {world_size} (--actor-ranks, --*-ranks)")
        actor = RoleLayout(actor_ranks, p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
        out = {"actor": actor}
        if copies == 2:
            out["rollout"] = actor
        out.update(layouts)
        out = {name: out[name] for name in ORDER if name in out}  # rank order
        weights_dir = args.rollout_weights_dir or (
            os.path.join(cfg.checkpoint.save, "rollout_weights") if cfg.checkpoint.save else None)
        placement = Placement("separate", out, weights_dir=weights_dir)
        if rollout_weight_transfer(placement, cfg) == "checkpoint" and weights_dir is None:
            raise ConfigError("the rollout partition's layout differs from the actor's, so weights go through "
                              "dist checkpoints: give --save or --rollout-weights-dir (a directory both see)")
        for role, layout in out.items():
            _validate(cfg, role, layout, args.rollout_batch_size)
    except ConfigError as exc:
        if explicit:
            raise
        return Placement("colocated", {}, f"--placement auto: no separate layout ({exc})")
    return placement


__all__ = ["Placement", "RoleLayout", "add_placement_args", "plan_placement", "role_config", "ORDER",
           "rollout_weight_transfer"]
