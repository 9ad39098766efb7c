"""Config errors are raised from the flags alone, before any process group exists, naming the flags."""

import subprocess
import sys

import pytest

from hcx_megatron.config.args import ConfigError, build_parser, config_from_args, validate_config
from torchrun_utils import REPO


def make(argv, world_size):
    cfg = config_from_args(build_parser().parse_args(["--mock-data", "--device", "cpu", *argv]), world_size)
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("argv,world,flags", [
    (["--num-attention-heads", "6", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     ["--num-attention-heads", "--tensor-model-parallel-size"]),
    (["--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     ["--num-query-groups", "--tensor-model-parallel-size"]),
    (["--num-layers", "6", "--pipeline-model-parallel-size", "4"], 4,
     ["--num-layers", "--pipeline-model-parallel-size"]),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "4"], 2,
     ["--num-layers", "--virtual-pipeline-model-parallel-size"]),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2,
     ["--global-batch-size", "--micro-batch-size", "data-parallel size"]),
    (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 6,
     ["world size 6", "--tensor-model-parallel-size"]),
    (["--seq-length", "4096"], 1, ["--seq-length", "--max-position-embeddings"]),
    (["--context-parallel-size", "2"], 2, ["--context-parallel-size"]),
    (["--fp8-format", "hybrid"], 1, ["--fp8-format"]),
])
def test_bad_layouts_name_their_flags(argv, world, flags):
    with pytest.raises(ConfigError) as err:
        make(argv, world)
    for flag in flags:
        assert flag in str(err.value), (flag, str(err.value))


def test_good_layout_derives_dp_and_microbatches():
    cfg = make(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                "--global-batch-size", "16", "--micro-batch-size", "2"], 8)
    assert cfg.data_parallel_size == 2 and cfg.num_microbatches == 4
    assert cfg.padded_vocab_size % (128 * 2) == 0


def test_model_yaml_and_flags_override_preset(tmp_path):
    y = tmp_path / "m.yaml"
    y.write_text("preset: hcx-s\nnum_layers: 8\n")
    cfg = make(["--model-config", str(y), "--hidden-size", "1024", "--num-attention-heads", "8",
                "--num-query-groups", "8", "--ffn-hidden-size", "2816", "--seq-length", "128"], 1)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.rotary_base) == (8, 1024, 500_000)
    y.write_text("num_layerz: 8\n")
    with pytest.raises(ValueError, match="num_layerz"):
        make(["--model-config", str(y)], 1)


@pytest.mark.timeout(120)
def test_driver_rejects_before_any_process_group():
    """The driver exits with a usage error naming the flag; no rendezvous is attempted (no MASTER_ADDR server
    exists, so reaching init_process_group would hang or fail differently)."""
    env = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    import os

    proc = subprocess.run([sys.executable, "-m", "hcx_megatron.pretrain", "--mock-data", "--device", "cpu",
                           "--tensor-model-parallel-size", "4", "--num-query-groups", "2"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--num-query-groups (2) must be divisible by --tensor-model-parallel-size (4)" in proc.stderr
    assert "init_process_group" not in proc.stderr


# --- the one layout-rule module (hcx_megatron/config/layout_rules.py) -------------------------------------------

def _megatron_layer_ranges(num_layers, pp, vpp, first, last, embedding, loss):
    """megatron-core 0.16.1's own answer: TransformerConfig's checks, then get_num_layers_to_build and
    get_transformer_layer_offset per (pp_rank, virtual stage); an exception where megatron would fail."""
    import types

    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    kw = dict(num_layers=num_layers, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
              num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
              account_for_embedding_in_pipeline_split=embedding, account_for_loss_in_pipeline_split=loss)
    TransformerConfig(hidden_size=8, num_attention_heads=1, pipeline_dtype=torch.float32, **kw)
    cfg = types.SimpleNamespace(pipeline_model_parallel_layout=None, **kw)
    out = []
    for rank in range(pp):
        row = []
        for v in (range(vpp) if vpp else [None]):
            n = get_num_layers_to_build(cfg, vp_stage=v, pp_rank=rank)
            offset = get_transformer_layer_offset(cfg, vp_stage=v, pp_rank=rank)
            row.append(range(offset, offset + n))
        out.append(row)
    if sorted(i for row in out for r in row for i in r) != list(range(num_layers)):
        raise ValueError(f"not a split of the layers: {out}")  # megatron would build a wrong model
    return out


def test_pipeline_split_is_megatrons_own():
    """pipeline_layer_ranges == megatron-core's layer counts and offsets wherever megatron builds a model, and a
    ConfigError wherever megatron raises or would build overlapping/missing layers (PP >= 2: at PP 1 the uneven
    flags are refused outright, where megatron accepts meaningless values)."""
    import itertools

    from hcx_megatron.config.layout_rules import pipeline_layer_ranges

    agree = refused = 0
    for L, pp, vpp, first, last, emb, loss in itertools.product(
            range(1, 11), (2, 3, 4), (None, 2), (None, 1, 2, 4), (None, 1, 2, 4), (False, True), (False, True)):
        try:
            ours = pipeline_layer_ranges(L, pp, vpp, first, last, emb, loss)
        except ConfigError:
            ours = None
        try:
            theirs = _megatron_layer_ranges(L, pp, vpp, first, last, emb, loss)
        except (AssertionError, ValueError, ZeroDivisionError):
            theirs = None
        assert ours == theirs, (L, pp, vpp, first, last, emb, loss, ours, theirs)
        agree += ours is not None
        refused += ours is None
    assert agree > 100 and refused > 100  # both kinds of case are exercised
    # megatron-core 0.16.1 divides by the number of middle stages in interleaved uneven offsets
    with pytest.raises(ZeroDivisionError):
        _megatron_layer_ranges(4, 2, 2, 2, 2, False, False)
    with pytest.raises(ConfigError, match="--decoder-last-pipeline-num-layers together need"):
        pipeline_layer_ranges(4, 2, 2, 2, 2)


def test_126_layers_at_pp8():
    """Llama-3.1-405B's 126 layers at PP 8 (issue 14): rejected evenly with a pointer to the uneven flags,
    accepted with Megatron-LM's uneven-stage flags, split as megatron does."""
    from hcx_megatron.config.layout_rules import pipeline_layer_split

    base = ["--model-preset", "hcx-l", "--num-layers", "126", "--pipeline-model-parallel-size", "8",
            "--global-batch-size", "16"]
    with pytest.raises(ConfigError) as err:
        make(base, 8)
    assert "--num-layers (126)" in str(err.value) and "--decoder-first-pipeline-num-layers" in str(err.value)
    cfg = make(base + ["--decoder-first-pipeline-num-layers", "15", "--decoder-last-pipeline-num-layers", "15"], 8)
    assert (cfg.parallel.decoder_first_pipeline_num_layers, cfg.parallel.decoder_last_pipeline_num_layers) == (15, 15)
    assert pipeline_layer_split(126, 8, None, 15, 15) == [[15]] + [[16]] * 6 + [[15]]
    cfg = make(base + ["--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split"], 8)
    assert cfg.parallel.account_for_embedding_in_pipeline_split and cfg.parallel.account_for_loss_in_pipeline_split
    assert pipeline_layer_split(126, 8, None, account_for_embedding=True, account_for_loss=True) == \
        [[15]] + [[16]] * 6 + [[15]]
    # and the TransformerConfig the builder makes carries them (no process group needed)
    from hcx_megatron.model.builder import transformer_config_from

    tc = transformer_config_from(make(base + ["--decoder-first-pipeline-num-layers", "14"], 8), "local", "cpu")
    assert (tc.num_layers_in_first_pipeline_stage, tc.num_layers_in_last_pipeline_stage) == (14, None)


@pytest.mark.parametrize("argv,world,flags", [
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "5"], 2,
     ["--decoder-first-pipeline-num-layers (5)", "--num-layers (4)"]),
    (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
      "--account-for-loss-in-pipeline-split"], 2,
     ["--decoder-first-pipeline-num-layers", "--account-for-loss-in-pipeline-split"]),
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
      "--decoder-last-pipeline-num-layers", "1"], 2,
     ["--decoder-last-pipeline-num-layers (1)", "--virtual-pipeline-model-parallel-size (2)"]),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--decoder-first-pipeline-num-layers", "2"], 2,
     ["--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank"]),
    (["--decoder-first-pipeline-num-layers", "2"], 1, ["--pipeline-model-parallel-size >= 2"]),
    (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"], 2,
     ["--num-layers (4) + 1 (--account-for-embedding-in-pipeline-split)"]),
    # interleaving runs micro-batches in groups of PP (megatron's schedule raises otherwise): 3 micro-batches
    (["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
      "--global-batch-size", "3"], 2, ["--global-batch-size (3)", "--virtual-pipeline-model-parallel-size 2"]),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "351"], 2,
     ["--ffn-hidden-size (351)", "--tensor-model-parallel-size (2)"]),
    (["--data-parallel-sharding-strategy", "optim"], 2, ["--data-parallel-sharding-strategy needs"]),
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim", "--pretrained-checkpoint", "/tmp/x"], 2,
     ["--pretrained-checkpoint"]),
    (["--use-megatron-fsdp"], 1, ["--use-megatron-fsdp needs data-parallel x --context-parallel-size >= 2"]),
    (["--use-megatron-fsdp", "--pipeline-model-parallel-size", "2"], 4,
     ["--use-megatron-fsdp needs --pipeline-model-parallel-size 1"]),
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim", "--tensor-model-parallel-size", "2"], 4,
     ["--use-megatron-fsdp with --tensor-model-parallel-size 2 needs Transformer Engine", "CPU mode"]),
    # megatron-core 0.16.1 fails in its synchronous parameter sync for unsharded weights (seen on gloo)
    (["--use-megatron-fsdp", "--data-parallel-sharding-strategy", "no_shard"], 2,
     ["--data-parallel-sharding-strategy no_shard needs --overlap-param-gather"]),
])
def test_bad_uneven_fsdp_and_schedule_layouts_name_their_flags(argv, world, flags):
    with pytest.raises(ConfigError) as err:
        make(argv, world)
    for flag in flags:
        assert flag in str(err.value), (flag, str(err.value))


def test_megatron_fsdp_runs_in_cpu_mode():
    """A valid FSDP layout (DP2) passes validation in CPU mode (its gloo heap corruption is fixed in cpu_mode.py;
    training runs: tests/test_pretrain_layouts.py, tests/test_pretrain_checkpoint.py)."""
    make(["--device", "cpu", "--use-megatron-fsdp", "--data-parallel-sharding-strategy", "optim_grads_params"], 2)
    make(["--device", "cpu", "--use-megatron-fsdp", "--overlap-param-gather"], 2)  # no_shard, the default


def test_driver_and_perf_model_apply_the_same_rules():
    """validate_config (the driver) and perf Layout.check (the planner) accept exactly the same layouts. Before
    layout_rules they disagreed: the driver lacked ffn_hidden_size % TP and the interleaved micro-batch rule, the
    planner lacked heads % query groups, hidden % heads and the FP8/SP-with-CP sequence multiple, and refused
    sequence parallelism at TP 1, which the driver (like Megatron-LM) ignores."""
    import itertools

    from hcx_megatron.config.model import get_preset
    from hcx_megatron.perf.layout import Layout, Workload

    model = get_preset("hcx-tiny")
    accepted = rejected = 0
    for tp, pp, dp, vpp, mbs, gbs, sp, first, seq in itertools.product(
            (1, 2, 4), (1, 2, 4), (1, 2), (None, 2), (1, 2), (4, 6), (False, True), (None, 1, 3), (64, 66)):
        argv = ["--mock-data", "--device", "cuda", "--tensor-model-parallel-size", str(tp),
                "--pipeline-model-parallel-size", str(pp), "--micro-batch-size", str(mbs),
                "--global-batch-size", str(gbs), "--seq-length", str(seq)]
        argv += ["--virtual-pipeline-model-parallel-size", str(vpp)] if vpp else []
        argv += ["--sequence-parallel"] if sp else []
        argv += ["--decoder-first-pipeline-num-layers", str(first)] if first else []
        try:
            validate_config(config_from_args(build_parser().parse_args(argv), tp * pp * dp), check_installed=False)
            driver = True
        except ConfigError:
            driver = False
        lay = Layout(tp=tp, pp=pp, dp=dp, vpp=vpp, micro_batch_size=mbs, sequence_parallel=sp,
                     num_layers_in_first_pipeline_stage=first)
        problems = lay.check(Workload(model=model, seq_length=seq, global_batch_size=gbs))
        assert driver == (not problems), (argv, problems)
        accepted += driver
        rejected += not driver
    assert accepted > 50 and rejected > 50


def test_driver_options_are_defined_once_as_typed_frozen_values():
    """config/options.py: each field of an options dataclass is one flag (type from its annotation, aliases,
    choices, a required flag when it has no default), and the parsed value comes back typed and frozen."""
    import argparse
    import dataclasses

    from hcx_megatron.config.options import add_options, option, options_from_args

    @dataclasses.dataclass(frozen=True)
    class Opts:
        data: str = option(help="required: no default")
        ids: tuple[int, ...] | None = option(None)
        rate: float = option(0.5, flag="--my-rate", aliases=("--rate",))
        kind: str = option("a", choices=("a", "b"))
        on: bool = option(False)
        kv: bool = option(True, elsewhere=True)

    parser = argparse.ArgumentParser()
    add_options(parser.add_argument_group("t"), Opts)
    parser.add_argument("--no-kv", dest="kv", action="store_false")
    got = options_from_args(parser.parse_args(["--data", "x", "--ids", "3", "4", "--rate", "2", "--on", "--no-kv"]),
                            Opts)
    assert got == Opts(data="x", ids=(3, 4), rate=2.0, kind="a", on=True, kv=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.rate = 1.0
    assert options_from_args(parser.parse_args(["--data", "y"]), Opts) == Opts(data="y")
    for bad in (["--ids", "1"], ["--data", "x", "--kind", "c"], ["--data", "x", "--rate", "fast"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
