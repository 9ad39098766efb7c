"""Pretraining loaders (`--dataloader torch|dali`, `--num-workers`): bitwise the same micro-batches as the
synchronous reference for every step, restarts included; exact resume through real torchrun runs; flag checks.

DALI is installed by the test install (requirements-dev.txt pulls the `dali` extra); without it these tests fail.
"""

import dataclasses

import pytest
import torch

from hcx_megatron.config.args import ConfigError, build_parser, config_from_args, validate_config
from hcx_megatron.data.gpt_datasets import build_gpt_datasets, collate, microbatch_indices, sample_counts
from hcx_megatron.data.loaders import DaliStepLoader, TorchStepLoader, build_step_loader, dali_import_error
from torchrun_utils import pretrain, read_metrics

GBS, MBS, STEPS, SEQ = 8, 2, 5, 64


def make_config(argv, world_size=1):
    return config_from_args(build_parser().parse_args(argv), world_size)


def reference_step(dataset, step, dp_rank, dp_size):
    """What the synchronous GlobalBatchIterator reads for this rank at `step` (its own expression)."""
    return [collate([dataset[i % len(dataset)] for i in idx])
            for idx in microbatch_indices(step * GBS, GBS, MBS, dp_rank, dp_size)]


@pytest.fixture(scope="module")
def blend_fim_dataset(tiny_tokenizer_dir, tiny_indexed_dataset):
    """A weighted BlendedDataset of two GPTDatasets with FIM, as the pretraining driver builds it."""
    from hcx_megatron.pretrain import load_run_tokenizer

    cfg = make_config(["--tokenizer-model", tiny_tokenizer_dir, "--data-path", "0.7", tiny_indexed_dataset, "0.3",
                       tiny_indexed_dataset, "--split", "90,10,0", "--fim-rate", "0.5", "--fim-spm-rate", "0.5",
                       "--seq-length", str(SEQ), "--micro-batch-size", str(MBS), "--global-batch-size", str(GBS),
                       "--train-iters", str(STEPS), "--device", "cpu"])
    train, _, _ = build_gpt_datasets(cfg, load_run_tokenizer(cfg), SEQ, sample_counts(cfg, STEPS))
    assert type(train).__name__ == "BlendedDataset"
    return cfg, train


@pytest.mark.parametrize("dataloader,num_workers", [("torch", 0), ("torch", 2), ("dali", 0), ("dali", 2)])
def test_loaders_match_the_reference_bitwise(blend_fim_dataset, dataloader, num_workers):
    cfg, dataset = blend_fim_dataset
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dataloader=dataloader, num_workers=num_workers))
    dp_rank, dp_size = 1, 2  # rank 1 of DP 2: the per-rank deal of Megatron's order
    loader = build_step_loader(cfg, dataset, STEPS, "cpu", dp_rank, dp_size)
    assert isinstance(loader, DaliStepLoader if dataloader == "dali" else TorchStepLoader)
    # In order, then a jump back (a resume) and one forward: each jump restarts the queue at that step.
    order = [0, 1, 2, 4, 1, 2]
    try:
        for step in order:
            got, expected = loader.step(step), reference_step(dataset, step, dp_rank, dp_size)
            assert len(got) == len(expected) == GBS // (MBS * dp_size)
            for g, e in zip(got, expected):
                # the BlendedDataset's scalar dataset_id travels too
                assert sorted(g) == sorted(e) == ["dataset_id", "labels", "loss_mask", "position_ids", "tokens"]
                for key in e:
                    assert g[key].dtype == e[key].dtype and g[key].shape == e[key].shape, key
                    assert torch.equal(g[key], e[key]), (dataloader, num_workers, step, key)
        assert loader.restarts == 3
        with pytest.raises(IndexError):
            loader.step(STEPS)
    finally:
        loader.close()


def test_dali_imports_here():
    # CI installs the `dali` extra; a missing DALI is a failure, not a skip.
    assert dali_import_error() is None


@pytest.mark.parametrize("argv,flag", [
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--data-prefetch-depth", "0"], "--data-prefetch-depth must be >= 1"),
    (["--dataloader", "dali", "--dali-num-threads", "0"], "--dali-num-threads must be >= 1"),
])
def test_bad_loader_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        validate_config(make_config(["--mock-data", "--device", "cpu", *argv]))


def test_dali_without_dali_names_the_flag_and_the_import_error(monkeypatch):
    import hcx_megatron.data.dali_probe as dali_probe

    validate_config(make_config(["--mock-data", "--device", "cpu", "--dataloader", "dali", "--num-workers", "2"]))
    monkeypatch.setattr(dali_probe, "dali_import_error", lambda: "ModuleNotFoundError: No module named 'nvidia'")
    with pytest.raises(ConfigError, match=r"--dataloader dali needs NVIDIA DALI.*No module named 'nvidia'"):
        validate_config(make_config(["--mock-data", "--device", "cpu", "--dataloader", "dali"]))


def test_sft_rejects_the_pretraining_loader_flags(tmp_path):
    from hcx_megatron.sft import SFTOptions, add_sft_args, check_sft_config, options_from_args

    parser = build_parser()
    add_sft_args(parser)
    for extra in (["--dataloader", "dali"], ["--num-workers", "2"]):
        ns = parser.parse_args(["--data-path", str(tmp_path / "chat.jsonl"), "--tokenizer-model", "tok", *extra])
        with pytest.raises(ValueError, match="SFT builds its micro-batches in the training process"):
            check_sft_config(config_from_args(ns, 1), options_from_args(ns, SFTOptions))


@pytest.mark.dist
@pytest.mark.timeout(600)
def test_resume_is_exact_with_worker_and_dali_loaders(tmp_path, tiny_tokenizer_dir, tiny_indexed_dataset):
    """A blend with FIM and a sequence-length switch at step 2. Straight through with the torch loader (0 workers)
    == one run stopped and resumed twice: DALI (2 workers) to step 1, torch (2 workers) resumed to step 3 across the
    switch, DALI resumed mid-phase to step 4. Each resume restarts the loader's queue at the resumed step."""
    args = ["--model-preset", "hcx-tiny", "--tokenizer-model", tiny_tokenizer_dir, "--data-path", "0.7",
            tiny_indexed_dataset, "0.3", tiny_indexed_dataset, "--split", "90,10,0", "--fim-rate", "0.5",
            "--seq-length", "64", "--long-context-seq-length", "128", "--long-context-start-fraction", "0.5",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--lr", "2e-3", "--seed", "7"]
    straight, chained, ckpt = tmp_path / "straight.jsonl", tmp_path / "chained.jsonl", tmp_path / "ckpt"
    pretrain([*args, "--metrics-jsonl", str(straight)], nproc=1)
    resumable = [*args, "--metrics-jsonl", str(chained), "--save", str(ckpt), "--load", str(ckpt)]
    dali, torch_workers = ["--dataloader", "dali", "--num-workers", "2"], ["--num-workers", "2"]
    pretrain([*resumable, *dali, "--exit-interval", "1"], nproc=1)
    pretrain([*resumable, *torch_workers, "--exit-interval", "3"], nproc=1)
    pretrain([*resumable, *dali], nproc=1)
    a, b = read_metrics(str(straight)), read_metrics(str(chained))
    assert [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert [r["seq_length"] for r in b] == [64, 64, 128, 128]
    # Same batches and same restored state: the per-iteration losses agree bitwise.
    assert [r["lm_loss"] for r in b] == [r["lm_loss"] for r in a]
