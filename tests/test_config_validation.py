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
