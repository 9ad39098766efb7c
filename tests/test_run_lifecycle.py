"""The run lifecycle of hcx_megatron/training/loop.py: the one start-of-run rule, the task's set-up completing a
frozen config, checkpointables saved before the commit and loaded on resume, close() on every exit; and the
config pipeline around it (parse -> resolve -> validate once -> freeze), with the reward driver's checkpoint
shape validated after it is resolved."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from torchrun_utils import free_port

from hcx_megatron.config.args import ConfigError, explicit_model_flags, parse_config
from hcx_megatron.config.frozen import FrozenConfigError, freeze, is_frozen
from hcx_megatron.training.checkpoint import CONFIG_FILE, TRACKER_FILE, checkpoint_dir, read_latest_iteration

TINY = ["--device", "cpu", "--transformer-impl", "local", "--num-layers", "1", "--hidden-size", "32",
        "--ffn-hidden-size", "64", "--num-attention-heads", "2", "--num-query-groups", "1", "--vocab-size", "64",
        "--make-vocab-size-divisible-by", "64", "--seq-length", "16", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--lr", "1e-3"]


def fake_checkpoint(root, iteration: int = 3, **model) -> str:
    """A --save root whose tracker names a checkpoint directory with the run's config (no tensors)."""
    from hcx_megatron.config.model import get_preset

    ckpt = checkpoint_dir(str(root), iteration)
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(dataclasses.replace(get_preset("hcx-tiny"), **model))}, f)
    with open(os.path.join(str(root), TRACKER_FILE), "w") as f:
        f.write(str(iteration))
    return str(root)


# -- the one rule "am I resuming?" ----------------------------------------------------------------------------
def test_start_of_run_resume_init_scratch(tmp_path):
    from hcx_megatron.training.loop import InitFrom, RunStart, start_of_run

    own, sft, empty = fake_checkpoint(tmp_path / "own"), fake_checkpoint(tmp_path / "sft"), str(tmp_path / "empty")
    cfg = lambda *a: parse_config(["--mock-data", *a])[0]  # noqa: E731
    assert start_of_run(cfg()) == RunStart("scratch")
    assert start_of_run(cfg("--load", empty)) == RunStart("scratch")
    assert start_of_run(cfg("--load", own)) == RunStart("resume", own)
    # --pretrained-checkpoint (RM/PPO: --sft-checkpoint) only while --load holds nothing: a requeued job resumes.
    assert start_of_run(cfg("--load", empty, "--pretrained-checkpoint", sft)) == RunStart("init", sft)
    assert start_of_run(cfg("--load", own, "--pretrained-checkpoint", sft)) == RunStart("resume", own)
    # --load X --finetune: Megatron-LM's meaning, X's weights only, through the same rule.
    assert start_of_run(cfg("--load", own, "--finetune")) == RunStart("init", own)
    assert start_of_run(cfg(), InitFrom(sft, "--rm-checkpoint")) == RunStart("init", sft)
    with pytest.raises(FileNotFoundError, match="--finetune"):
        start_of_run(cfg("--load", empty, "--finetune"))
    with pytest.raises(FileNotFoundError, match="--pretrained-checkpoint"):
        start_of_run(cfg("--pretrained-checkpoint", empty))
    with pytest.raises(SystemExit):  # two starts from other runs' weights at once
        parse_config(["--mock-data", "--load", own, "--finetune", "--pretrained-checkpoint", sft])


# -- parse -> resolve -> validate once -> freeze -------------------------------------------------------------
def test_a_frozen_config_refuses_assignment_and_replace_makes_a_new_one():
    cfg, _ = parse_config(["--mock-data"])
    cfg.training.train_iters = 5  # the resolve step may still edit
    freeze(cfg)
    assert is_frozen(cfg) and is_frozen(cfg.model) and is_frozen(cfg.training)
    with pytest.raises(FrozenConfigError, match="vocab_size"):
        cfg.model.vocab_size = 10
    with pytest.raises(FrozenConfigError):
        cfg.training = cfg.training
    changed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=10))
    assert changed.model.vocab_size == 10 and cfg.model.vocab_size != 10 and not is_frozen(changed)


def test_parsing_reads_argv_only(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert parse_config(["--mock-data"])[0].runtime.world_size == 1
    assert parse_config(["--mock-data"], world_size=4)[0].runtime.world_size == 4


def test_pretraining_data_is_a_pretraining_check():
    """The shared validation no longer asks reward/PPO/conversion for --data-path or --mock-data."""
    from hcx_megatron.pretrain import check_pretrain_config

    cfg, _ = parse_config(["--device", "cpu"])  # no data flag: valid for every driver but pretraining
    with pytest.raises(ConfigError, match="--data-path PREFIX"):
        check_pretrain_config(cfg)
    with pytest.raises(SystemExit):
        parse_config(["--device", "cpu"], extra_checks=check_pretrain_config)


def test_checkpoint_shape_differing_from_an_explicit_flag_is_an_error_naming_it(tmp_path):
    from hcx_megatron.rlhf.common import apply_checkpoint_model_shape

    ckpt = fake_checkpoint(tmp_path / "sft", num_layers=2)
    cfg, ns = parse_config(["--mock-data", "--num-layers", "3"])
    with pytest.raises(ConfigError, match=r"--num-layers 3 differs from the checkpoint .*num_layers=2"):
        apply_checkpoint_model_shape(cfg, ckpt, explicit_model_flags(ns))
    cfg, ns = parse_config(["--mock-data", "--num-layers", "2"])  # the same value: fine
    apply_checkpoint_model_shape(cfg, ckpt, explicit_model_flags(ns))
    cfg, ns = parse_config(["--mock-data"])  # no flag: the checkpoint's shape
    apply_checkpoint_model_shape(cfg, ckpt, explicit_model_flags(ns))
    assert cfg.model.num_layers == 2


def test_reward_validates_the_checkpoint_shape_it_resolved(tmp_path):
    """A checkpoint whose model has num_query_groups=1 cannot run at TP2: rejected before any process starts."""
    from hcx_megatron.rlhf.reward import resolve_reward_config
    from hcx_megatron.rlhf.synthetic import write_preference_jsonl

    prefs = str(tmp_path / "prefs.jsonl")
    write_preference_jsonl(prefs, 8, seed=0)
    argv = ["--device", "cpu", "--tokenizer-model", str(tmp_path), "--preference-data", prefs,
            "--global-batch-size", "4", "--tensor-model-parallel-size", "2"]
    cfg, opts = resolve_reward_config([*argv, "--sft-checkpoint", fake_checkpoint(tmp_path / "ok")], world_size=2)
    assert is_frozen(cfg) and cfg.checkpoint.pretrained_checkpoint == str(tmp_path / "ok")
    assert cfg.training.variable_seq_lengths and opts.preference_data == prefs
    bad = fake_checkpoint(tmp_path / "mqa", num_query_groups=1)
    with pytest.raises(SystemExit, match=r"--num-query-groups \(1\) must be divisible by "
                                         r"--tensor-model-parallel-size \(2\)"):
        resolve_reward_config([*argv, "--sft-checkpoint", bad], world_size=2)
    with pytest.raises(SystemExit, match=r"--num-query-groups \(1\) must be divisible"):  # resuming it: the same
        resolve_reward_config([*argv, "--load", bad], world_size=2)


# -- the lifecycle, in one process ------------------------------------------------------------------------------
class Recorder:
    """A checkpointable that writes one file into each checkpoint and records what the loop asked of it."""

    name = "recorder"

    def __init__(self, calls: list):
        self.calls = calls

    def save(self, ckpt_tmp_dir: str, iteration: int) -> None:
        root = os.path.dirname(ckpt_tmp_dir)
        # Before the commit: the directory is still the .tmp one and the tracker does not name it yet.
        assert ckpt_tmp_dir.endswith(".tmp") and read_latest_iteration(root) != iteration
        with open(os.path.join(ckpt_tmp_dir, "recorder.json"), "w") as f:
            json.dump({"iteration": iteration}, f)
        self.calls.append(("save", iteration))

    def load(self, ckpt_dir: str, iteration: int) -> None:
        with open(os.path.join(ckpt_dir, "recorder.json")) as f:
            assert json.load(f) == {"iteration": iteration}
        self.calls.append(("load", iteration))


class TinyTask:
    @staticmethod
    def make(calls: list, fail_at: int | None = None, preempt_at: int | None = None):
        from hcx_megatron.pretrain import lm_loss_func
        from hcx_megatron.training.loop import StepBatches, TaskBase, TaskSetup

        class Task(TaskBase):
            metric_keys = ["lm loss"]
            iteration_done = 0

            def setup(self, cfg, device):
                calls.append(("setup", cfg.model.vocab_size))
                return TaskSetup(vocab_size=48)  # what a tokenizer would say

            def train_batches(self, iteration):
                if iteration == fail_at:
                    raise RuntimeError("data error")
                calls.append(("batch", iteration))
                g = torch.Generator().manual_seed(iteration)
                tokens = torch.randint(0, 48, (2, 17), generator=g)
                mb = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(2, 16),
                      "position_ids": torch.arange(16).expand(2, 16)}
                return StepBatches([mb], 16, 2, 32)

            def forward_step(self, data_iterator, model):
                from functools import partial

                b = next(data_iterator)
                return model(b["tokens"], b["position_ids"], None, labels=b["labels"]), \
                    partial(lm_loss_func, b["loss_mask"])

            def checkpointables(self):
                return [Recorder(calls)]

            def agree_stop(self, preempted):
                return preempted or self.iteration_done == preempt_at

            def on_step(self, ctx, record):
                self.iteration_done = ctx.iteration

            def after_train(self, ctx, code):
                calls.append(("after_train", ctx.iteration, ctx.cfg.model.vocab_size, code))
                with pytest.raises(FrozenConfigError):
                    ctx.cfg.training.train_iters = 1

            def close(self):
                calls.append(("close",))

        return Task()


@pytest.fixture
def one_process_launch(monkeypatch):
    """The launcher's environment for a 1-process world; processes are started (and shut down) by run() itself."""
    import torch.distributed as dist

    import hcx_megatron.pretrain  # noqa: F401  (megatron's models are imported before CPU mode patches torch)
    from hcx_megatron.distributed import cpu_mode
    from hcx_megatron.distributed.initialize import shutdown
    from hcx_megatron.training import signals

    assert not dist.is_initialized(), "a process group already exists in this process"
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(signals, "install_handlers", lambda *a, **k: None)  # keep pytest's own handlers
    was_active, threads = cpu_mode.is_active(), torch.get_num_threads()

    def new_launch():  # a fresh rendezvous port for each run
        monkeypatch.setenv("MASTER_PORT", str(free_port()))

    try:
        yield new_launch
    finally:
        shutdown()
        torch.set_num_threads(threads)
        if not was_active:
            cpu_mode.deactivate()


def test_run_saves_checkpointables_before_commit_resumes_them_and_always_closes(tmp_path, one_process_launch):
    from hcx_megatron.training.loop import run

    save = str(tmp_path / "ckpt")
    metrics = str(tmp_path / "m.jsonl")

    def config(*extra):
        one_process_launch()
        return freeze(parse_config([*TINY, "--mock-data", "--save", save, "--load", save, "--metrics-jsonl", metrics,
                                    *extra])[0])

    calls: list = []
    assert run(config("--train-iters", "2"), TinyTask.make(calls)) == 0
    assert calls == [("setup", 64), ("batch", 0), ("batch", 1), ("save", 2), ("after_train", 2, 48, 0), ("close",)]
    assert read_latest_iteration(save) == 2 and os.path.exists(os.path.join(checkpoint_dir(save, 2), "recorder.json"))

    calls.clear()  # auto-resume (--save D --load D): the checkpointable is loaded, steps continue at 2
    assert run(config("--train-iters", "3"), TinyTask.make(calls)) == 0
    assert calls == [("setup", 64), ("load", 2), ("batch", 2), ("save", 3), ("after_train", 3, 48, 0), ("close",)]

    calls.clear()  # a failing step: close() still runs, nothing is committed
    with pytest.raises(RuntimeError, match="data error"):
        run(config("--train-iters", "5"), TinyTask.make(calls, fail_at=3))
    assert calls == [("setup", 64), ("load", 3), ("close",)] and read_latest_iteration(save) == 3
    events = [json.loads(line) for line in open(metrics) if '"event"' in line]
    assert [(e["event"], e.get("start"), e["iteration"]) for e in events if e["event"] == "load"] == [
        ("load", "resume", 2), ("load", "resume", 3)]

    calls.clear()  # preempted after step 4: saved, then after_train hears 17, then close
    assert run(config("--train-iters", "6"), TinyTask.make(calls, preempt_at=4)) == 17
    assert calls == [("setup", 64), ("load", 3), ("batch", 3), ("save", 4), ("after_train", 4, 48, 17), ("close",)]
    assert read_latest_iteration(save) == 4
