"""PPO placement without processes: partition planning and its errors, the whole-batch row exchange between
partitions of different data-parallel sizes, the async sampler's in-flight schedule, and the leader/pair
bridge on a real 3-process gloo world (mp spawn)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.multiprocessing as mp

from hcx_megatron.config.args import ConfigError, parse_config
from hcx_megatron.distributed.partition import block_of, layout_blocks
from hcx_megatron.rlhf.placement import add_placement_args, plan_placement
from hcx_megatron.rlhf.ppo_separate import async_in_flight, sampler_version
from hcx_megatron.rlhf.rollout import assemble_rows, build_sequences, dp_rows, take_rows
from test_run_lifecycle import TINY, one_process_launch  # noqa: F401  (a one-process world in this process)

pytestmark = pytest.mark.timeout(60)


def _parse(flags, world=1):
    argv = ["--mock-data", "--num-layers", "4", "--num-attention-heads", "4", "--num-query-groups", "2",
            "--hidden-size", "64", "--ffn-hidden-size", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--seq-length", "32", "--device", "cpu", *flags]
    return parse_config(argv, extra_args=add_placement_args, world_size=world, validate=False)


def _cfg(flags):
    return _parse(flags)[0]


def _options(*flags):
    from hcx_megatron.config.options import options_from_args
    from hcx_megatron.rlhf.ppo import PPOOptions, add_ppo_args

    ns = parse_config(["--mock-data", "--prompt-data", "p", "--rule-reward", "share:1-2", *flags],
                      extra_args=add_ppo_args, validate=False)[1]
    return options_from_args(ns, PPOOptions)


def _plan(world, flags=(), rule=True, async_=False, rollout_batch=8):
    cfg, a = _parse(flags, world)
    ns = argparse.Namespace(**vars(a), rule_reward="share:1-2" if rule else None, async_rollouts=async_,
                            rollout_batch_size=rollout_batch)
    return plan_placement(ns, cfg, world)


def test_auto_placement_separates_when_the_world_holds_the_models():
    p = _plan(4)  # rule reward: actor, critic, reference; the actor gets what is left
    assert p.mode == "separate"
    assert {k: (v.ranks, v.tp, v.pp, v.dp) for k, v in p.roles.items()} == {
        "actor": (2, 1, 1, 2), "critic": (1, 1, 1, 1), "reference": (1, 1, 1, 1)}
    assert p.describe().startswith("separate partitions: actor ranks 0-1 (TP 1, PP 1, DP 2), critic rank 2")
    two = _plan(2)
    assert two.mode == "colocated" and "no separate layout" in two.reason and "--actor-ranks" in two.reason
    with pytest.raises(ConfigError, match="--actor-ranks"):  # a partition flag under auto: separate, or an error
        _plan(2, ["--critic-ranks", "1"])
    assert _plan(4, ["--placement", "colocated"]).mode == "colocated"


def test_per_model_layouts_and_async_rollout_partition():
    p = _plan(10, ["--tensor-model-parallel-size", "2", "--critic-pipeline-model-parallel-size", "2",
                   "--critic-tensor-model-parallel-size", "1", "--reference-ranks", "2",
                   "--reference-tensor-model-parallel-size", "1", "--reward-tensor-model-parallel-size", "2"],
              rule=False, async_=True)
    assert p.mode == "separate"
    assert {k: (v.ranks, v.tp, v.pp) for k, v in p.roles.items()} == {
        "actor": (2, 2, 1), "rollout": (2, 2, 1), "critic": (2, 1, 2), "reference": (2, 1, 1),
        "reward": (2, 2, 1)}
    assert list(p.roles) == ["actor", "rollout", "critic", "reference", "reward"]  # rank order
    from hcx_megatron.rlhf.placement import rollout_weight_transfer

    assert rollout_weight_transfer(p, _cfg(["--tensor-model-parallel-size", "2"])) == "p2p"  # a mirror of the actor
    # A rollout partition with a layout of its own: weights go through dist checkpoints, which need a directory.
    own = ["--tensor-model-parallel-size", "2", "--rollout-tensor-model-parallel-size", "1", "--save", "/tmp/x"]
    q = _plan(7, own, async_=True)
    assert {k: (v.ranks, v.tp) for k, v in q.roles.items()} == {
        "actor": (2, 2), "rollout": (1, 1), "critic": (2, 2), "reference": (2, 2)}
    assert rollout_weight_transfer(q, _cfg(own)) == "checkpoint"
    with pytest.raises(ConfigError, match="--rollout-weights-dir"):
        _plan(7, own[:-2], async_=True)


@pytest.mark.parametrize("world,flags,needle", [
    (3, ["--placement", "separate", "--critic-ranks", "2"], "--actor-ranks"),
    (4, ["--placement", "separate", "--critic-ranks", "1", "--critic-tensor-model-parallel-size", "2"],
     "--critic-ranks"),
    (5, ["--placement", "separate", "--reference-pipeline-model-parallel-size", "3", "--reference-ranks", "3"],
     "--reference-pipeline-model-parallel-size 3"),  # 4 layers % PP 3
    (5, ["--placement", "separate", "--actor-ranks", "3"], "--rollout-batch-size 8"),  # DP 3 does not split 8
    (6, ["--placement", "separate", "--actor-ranks", "2"], "the world has 6"),
])
def test_bad_separate_layouts_name_their_flags(world, flags, needle):
    with pytest.raises(ConfigError) as info:
        _plan(world, flags)
    assert needle in str(info.value), str(info.value)


def test_driver_rejects_a_bad_placement_before_any_process_group(monkeypatch, tmp_path):
    import torch.distributed as dist

    from hcx_megatron.rlhf import ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt_ids": [1, 2]}\n')
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as info:
        ppo.main(["--device", "cpu", "--mock-data", "--vocab-size", "64", "--prompt-data", str(prompts),
                  "--rule-reward", "share:1-2", "--placement", "separate", "--rollout-batch-size", "8",
                  "--global-batch-size", "8", "--micro-batch-size", "4"])
    assert "--actor-ranks" in str(info.value.code)
    assert not dist.is_initialized()


def test_one_critic_path_rule_reads_load_and_writes_save(tmp_path):
    """Both placements build the critic's config with ppo_models.critic_config: with --load A --save B it resumes
    A/critic at A's iteration and saves to B/critic; a --load without a checkpoint starts a new critic."""
    from hcx_megatron.rlhf.ppo_models import critic_config

    a, b = tmp_path / "A", tmp_path / "B"
    (a / "iter_0000006").mkdir(parents=True)
    (a / "latest_checkpointed_iteration.txt").write_text("6")
    opts = _options("--critic-lr", "1e-5")
    c = critic_config(_cfg(["--load", str(a), "--save", str(b), "--lr", "1e-4"]), opts).checkpoint
    assert (c.load, c.save) == (str(a / "critic" / "iter_0000006"), str(b / "critic"))
    fresh = critic_config(_cfg(["--load", str(b), "--save", str(b)]), opts)
    assert fresh.checkpoint.load is None and fresh.training.lr == 1e-5 and fresh.logging.metrics_jsonl is None


def test_rows_round_trip_between_data_parallel_sizes():
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11], [12, 13]]
    responses = [[20, 21], [22, 23, 24, 25], [26], [27, 28], [29, 30, 31], [32]]
    whole = build_sequences(prompts, responses, pad_id=0, multiple=1, ngram=2)
    # An actor with DP 2 builds its rows per rank, padded to each rank's own length ...
    parts = []
    for rank in range(2):
        rows = dp_rows(6, rank, 2)
        own = build_sequences([prompts[i] for i in rows], [responses[i] for i in rows], 0, 1, 2)
        parts.append((rows, own))
    full = assemble_rows(parts, 6, pad={"tokens": 0})
    # ... the leader's whole batch equals building all rows at once ...
    for name in ("tokens", "labels", "mask", "ul_negative", "lengths", "response_length"):
        assert torch.equal(full[name], whole[name]), name
    # ... and a DP-3 partition's rank takes exactly the rows (and padded length) it would have built itself.
    for rank in range(3):
        rows = dp_rows(6, rank, 3)
        mine = take_rows(full, rows, multiple=4)
        own = build_sequences([prompts[i] for i in rows], [responses[i] for i in rows], 0, 4, 2)
        for name in ("tokens", "mask", "lengths"):
            assert torch.equal(mine[name], own[name]), (rank, name)
    with pytest.raises(RuntimeError, match="came from no rank"):
        assemble_rows(parts[:1], 6)


def test_async_sampler_schedule_and_in_flight_rollouts():
    # Staleness 1 from version 0: rollouts 0 and 1 use the initial weights, rollout r >= 1 uses r - 1.
    assert [sampler_version(r, 0, 1) for r in range(5)] == [0, 0, 1, 2, 3]
    assert [sampler_version(r, 3, 2) for r in range(3, 8)] == [3, 3, 3, 4, 5]
    # Finished normally: nothing left in flight.
    assert list(async_in_flight(0, 0, consumed=10, completed=10, total=10, staleness=1)) == []
    # Stopped after 6 steps of 4-step iterations: rollout 1 half trained (consumed 2, completed 1). Version 1 was
    # published, so the sampler has sent rollout 2 (version 1) and waits for version 2 before rollout 3.
    assert list(async_in_flight(0, 0, consumed=2, completed=1, total=10, staleness=1)) == [2]
    assert list(async_in_flight(0, 0, consumed=2, completed=2, total=10, staleness=2)) == [2, 3, 4]
    # Near the end the sampler stops at the last rollout; versions past total - s - 1 are never published.
    assert list(async_in_flight(0, 0, consumed=9, completed=9, total=10, staleness=1)) == [9]
    # Resumed from version 4 at rollout 5 (a half-trained rollout 4 restored from its buffer), stopped at once.
    assert list(async_in_flight(4, 5, consumed=5, completed=4, total=10, staleness=1)) == [5]


def test_blocks():
    blocks = layout_blocks([("actor", 2), ("critic", 1), ("reference", 1)])
    assert [(b.name, b.start, b.size) for b in blocks] == [("actor", 0, 2), ("critic", 2, 1), ("reference", 3, 1)]
    assert block_of(blocks, 1).name == "actor" and block_of(blocks, 3).name == "reference"
    with pytest.raises(ValueError):
        block_of(blocks, 4)


def _bridge_worker(rank: int, port: int, out):
    from hcx_megatron.distributed.env import DistEnv
    from hcx_megatron.distributed.partition import init_partitions

    env = DistEnv(rank, 3, rank, "127.0.0.1", port, "single")
    part = init_partitions(env, layout_blocks([("a", 2), ("b", 1)]), "gloo")
    import torch.distributed as dist

    got = {"name": part.name, "world": dist.get_world_size(), "local": part.local_rank}
    if part.name == "a":
        msg = part.broadcast(part.recv("b", 5) if part.is_leader else None)  # leader receives, block shares
        got["msg"] = msg["x"].tolist()
        gathered = part.gather(part.local_rank * 10)
        if part.is_leader:
            part.send("b", 6, gathered)
    else:
        part.send("a", 5, {"x": torch.arange(3)})
        got["gathered"] = part.recv("a", 6)
    part.job_barrier()
    out.put((rank, got))
    dist.destroy_process_group()


@pytest.mark.dist
def test_partition_bridge_on_real_gloo_processes():
    from torchrun_utils import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # rank 0 serves the store, as under srun/mpirun
    port = free_port()
    procs = [ctx.Process(target=_bridge_worker, args=(r, port, out)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=50) for _ in range(3))
    for p in procs:
        p.join(timeout=20)
        assert p.exitcode == 0
    assert results[0] == {"name": "a", "world": 2, "local": 0, "msg": [0, 1, 2]}
    assert results[1] == {"name": "a", "world": 2, "local": 1, "msg": [0, 1, 2]}
    assert results[2] == {"name": "b", "world": 1, "local": 0, "gathered": [0, 10]}



def test_colocated_critic_leaves_the_process_rng_and_a_half_trained_rollout_commits_with_its_checkpoint(
        one_process_launch, tmp_path):
    """The colocated critic is set up beside the actor without reseeding the process's RNGs (so a resumed actor
    keeps the states it restored, whichever model is set up last), and the loop writes a half-trained rollout
    into the checkpoint directory it commits (nothing beside it), from which a resumed actor reads it back."""
    import random

    import numpy as np

    from hcx_megatron.config.frozen import freeze
    from hcx_megatron.config.options import options_from_args
    from hcx_megatron.rlhf.ppo import PPOOptions, add_ppo_args
    from hcx_megatron.rlhf.ppo_actor import PPOActorTask, Schedule
    from hcx_megatron.rlhf.ppo_colocated import LocalPeers
    from hcx_megatron.training.checkpoint import checkpoint_dir
    from hcx_megatron.training.loop import save, setup

    prompts, ckpt = tmp_path / "p.jsonl", str(tmp_path / "ckpt")
    prompts.write_text('{"prompt_ids": [1, 2, 3]}\n{"prompt_ids": [4, 5]}\n')
    cfg, ns = parse_config([*TINY, "--prompt-data", str(prompts), "--rule-reward", "share:1-2", "--save", ckpt,
                            "--rollout-batch-size", "2", "--max-new-tokens", "2"], extra_args=add_ppo_args,
                           validate=False)
    opts, schedule = options_from_args(ns, PPOOptions), Schedule(2, 2, 1, 1234, 2)  # 2 steps per PPO iteration

    def rng_states():
        return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()

    one_process_launch()
    peers = LocalPeers(opts, schedule, None)
    actor = PPOActorTask(opts, schedule, peers, placement=None)
    ctx = setup(freeze(cfg), actor)
    torch.manual_seed(99), random.seed(99), np.random.seed(99)  # as an actor resumed with its RNG states
    before = rng_states()
    peers.start(ctx, actor.tokenizer, actor.prompts, first_rollout=0)
    after = rng_states()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]

    actor.rollout = peers.rollout(0, kl_coef=0.04)
    ctx.iteration = 1  # in the middle of PPO iteration 1
    save(ctx, actor)
    assert os.path.isfile(os.path.join(checkpoint_dir(ckpt, 1), "ppo_rollout_rank_00000.pt"))
    assert sorted(os.listdir(ckpt)) == ["critic", "iter_0000001", "latest_checkpointed_iteration.txt"]
    resumed = PPOActorTask(opts, schedule, LocalPeers(opts, schedule, None), placement=None)
    resumed.load(checkpoint_dir(ckpt, 1), 1)
    assert resumed.rollout.index == 0 and torch.equal(resumed.rollout.tokens, actor.rollout.tokens)
    assert torch.equal(resumed.rollout.advantages, actor.rollout.advantages)
