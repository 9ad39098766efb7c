"""HCX tokenizer: morpheme-aware byte-level BPE (training), fixed special-token ids, megatron-core glue."""

from __future__ import annotations

from hcx_megatron.tokenizer.special_tokens import SPECIAL_TOKENS, special_token_id  # noqa: F401


def load_tokenizer(path: str):
    """Load a tokenizer directory written by tools/train_tokenizer.py (either backend)."""
    from hcx_megatron.tokenizer.hcx_tokenizer import HCXTokenizer

    return HCXTokenizer(path)


def build_tokenizer(tokenizer_type: str | None, tokenizer_model: str | None, vocab_size: int | None = None):
    """--tokenizer-type / --tokenizer-model -> tokenizer.

    None or "HCXTokenizer": load the directory --tokenizer-model.  "HuggingFaceTokenizer": an open model's own
    tokenizer directory (tokenizer.json; eod = its eos).  "NullTokenizer": mock-data tokenizer with `vocab_size`
    ids (needs no files).
    """
    if tokenizer_type in (None, "HCXTokenizer"):
        if not tokenizer_model:
            raise ValueError("--tokenizer-model DIR is required for --tokenizer-type HCXTokenizer")
        return load_tokenizer(tokenizer_model)
    if tokenizer_type == "HuggingFaceTokenizer":
        from hcx_megatron.tokenizer.hf_tokenizer import HuggingFaceTokenizer

        if not tokenizer_model:
            raise ValueError("--tokenizer-model DIR (with tokenizer.json) is required for --tokenizer-type "
                             "HuggingFaceTokenizer")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        from hcx_megatron.tokenizer.null_tokenizer import NullTokenizer

        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; expected HCXTokenizer, HuggingFaceTokenizer "
                     "or NullTokenizer")


def __getattr__(name: str):
    # Lazy: importing megatron-core (torch) costs seconds; `import hcx_megatron.tokenizer` must not.
    if name == "HCXTokenizer":
        from hcx_megatron.tokenizer.hcx_tokenizer import HCXTokenizer

        return HCXTokenizer
    if name == "HuggingFaceTokenizer":
        from hcx_megatron.tokenizer.hf_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer
    if name == "NullTokenizer":
        from hcx_megatron.tokenizer.null_tokenizer import NullTokenizer

        return NullTokenizer
    raise AttributeError(name)


__all__ = ["load_tokenizer", "build_tokenizer", "HCXTokenizer", "HuggingFaceTokenizer", "SPECIAL_TOKENS", "special_token_id"]
