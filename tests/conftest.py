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
