"""Shared session fixtures: a tiny tokenizer and an indexed dataset built from examples/data.

Other areas' tests use these; keep them fast (a few seconds on 2 cores).
"""

from __future__ import annotations

import os
import warnings

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_DATA = os.path.join(REPO, "examples", "data")
EXAMPLE_FILES = [os.path.join(EXAMPLE_DATA, f"{lang}.jsonl") for lang in ("ko", "en", "code")]
TINY_VOCAB = 2048

MARKERS = {
    "unit": "in-process tests (seconds); `make test-fast` runs only these",
    "dist": "starts real processes (torchrun/gloo worlds, launcher or MPI runs)",
    "slurm": "starts a real single-node Slurm cluster and submits the sbatch scripts",
}


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


# Session fixtures that train models: under pytest-xdist every file using them goes to one worker (one group), so
# they are trained once.
TRAINED_MODEL_FIXTURES = {"trained_reward_model", "ppo_small_vocab"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Files and tests that start processes say so (`pytestmark = pytest.mark.dist`, `@pytest.mark.dist`); every
    other test is a unit test, so a new in-process test needs no marker to be in the fast target."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in ("dist", "slurm")):
            item.add_marker(pytest.mark.unit)
    if config.pluginmanager.hasplugin("xdist"):
        add_xdist_groups(items)


def add_xdist_groups(items) -> None:
    """For `pytest -n N --dist loadgroup`: a whole file runs on one worker (its module fixtures are built once);
    the Slurm files share one worker (one machine's Slurm daemons and network namespaces at a time), and so do the
    files that use TRAINED_MODEL_FIXTURES."""
    group_of_file: dict[str, str] = {}
    for item in items:
        path = str(item.path)
        if item.get_closest_marker("slurm"):
            group_of_file[path] = "slurm"
        elif TRAINED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) and group_of_file.get(path) != "slurm":
            group_of_file[path] = "trained_models"
        else:
            group_of_file.setdefault(path, os.path.basename(path))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(group_of_file[str(item.path)]))


@pytest.fixture(scope="session")
def example_jsonl_files() -> list[str]:
    return list(EXAMPLE_FILES)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    """hf-backend HCX tokenizer (vocab 2048, morpheme-aware) trained on examples/data."""
    from hcx_megatron.data.jsonl import iter_texts
    from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

    out = str(tmp_path_factory.mktemp("tiny_tokenizer") / "tok")
    texts = (t for d in iter_texts(EXAMPLE_FILES) for t in d.texts)
    train_tokenizer(texts, out, TrainConfig(vocab_size=TINY_VOCAB, backend="hf"), inputs=EXAMPLE_FILES)
    return out


@pytest.fixture(scope="session")
def tiny_indexed_dataset(tiny_tokenizer_dir, tmp_path_factory) -> str:
    """Prefix (…/demo_text_document) of examples/data preprocessed with tiny_tokenizer_dir, eod appended."""
    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess

    prefix = str(tmp_path_factory.mktemp("tiny_indexed") / "demo")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = preprocess(PreprocessConfig(inputs=EXAMPLE_FILES, output_prefix=prefix, tokenizer_model=tiny_tokenizer_dir,
                                        append_eod=True, workers=1, progress=False))
    return s.outputs[0]


@pytest.fixture(scope="session")
def trained_reward_model(tmp_path_factory, tiny_tokenizer_dir, tiny_indexed_dataset):
    """A Bradley-Terry reward model (TP2 + SP, 1 epoch) on the synthetic "apple" preference task, from a pretrain
    checkpoint standing in for SFT. Its test checks what it learnt; PPO tests score with it."""
    from types import SimpleNamespace

    from hcx_megatron.rlhf.synthetic import write_preference_jsonl
    from torchrun_utils import torchrun

    root = tmp_path_factory.mktemp("reward_model")
    sft = str(root / "sft")
    proc = torchrun("hcx_megatron.pretrain", nproc=1, check=False, args=[
        "--device", "cpu", "--model-preset", "hcx-tiny", "--tokenizer-model", tiny_tokenizer_dir,
        "--data-path", tiny_indexed_dataset, "--split", "100,0,0", "--seq-length", "64", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "2", "--save", sft], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    prefs = str(root / "prefs.jsonl")
    write_preference_jsonl(prefs, 600, seed=0)
    rm, metrics = str(root / "rm"), str(root / "rm.jsonl")
    proc = torchrun("hcx_megatron.rlhf.reward", nproc=2, check=False, args=[
        "--device", "cpu", "--tokenizer-model", tiny_tokenizer_dir, "--sft-checkpoint", sft,
        "--preference-data", prefs, "--valid-fraction", "0.1", "--global-batch-size", "16",
        "--micro-batch-size", "4", "--seq-length", "64", "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-warmup-iters", "3", "--eval-interval", "11", "--tensor-model-parallel-size", "2",
        "--sequence-parallel", "--save", rm, "--metrics-jsonl", metrics, "--log-interval", "10"], timeout=300)
    return SimpleNamespace(proc=proc, sft=sft, rm=rm, metrics=metrics, tokenizer=tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def ppo_small_vocab(tmp_path_factory):
    """An 'SFT' checkpoint (a few pretraining steps on mock data, vocabulary 64) and id prompts for PPO."""
    from hcx_megatron.rlhf.synthetic import write_prompt_ids_jsonl
    from torchrun_utils import torchrun

    root = tmp_path_factory.mktemp("ppo_small")
    sft = str(root / "sft")
    proc = torchrun("hcx_megatron.pretrain", nproc=1, check=False, args=[
        "--device", "cpu", "--mock-data", "--vocab-size", "64", "--make-vocab-size-divisible-by", "64",
        "--num-layers", "2", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "3", "--save", sft, "--log-interval", "100"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n" + proc.stderr[-6000:]
    prompts = str(root / "prompts.jsonl")
    write_prompt_ids_jsonl(prompts, 64, vocab=63, length=4, seed=0)
    return root, sft, prompts


SIMULATED_TE_IMPORT_ERROR = "ImportError: No module named 'transformer_engine' (simulated by the test)"


@pytest.fixture
def without_transformer_engine(monkeypatch) -> str:
    """Transformer Engine's import fails as on a machine without it, whether or not TE is installed here, so the
    no-TE paths are tested everywhere (every caller asks hcx_megatron.model.spec.transformer_engine_import_error)."""
    import hcx_megatron.model.spec as spec

    monkeypatch.setattr(spec, "transformer_engine_import_error", lambda: SIMULATED_TE_IMPORT_ERROR)
    return SIMULATED_TE_IMPORT_ERROR
