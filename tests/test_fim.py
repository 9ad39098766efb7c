"""Fill-in-the-middle transform and FIMGPTDataset built through megatron-core's dataset builder."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from hcx_megatron.data.fim import FIMTokens, apply_fim, apply_fim_to_sample, fim_rng

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = FIMTokens(prefix=1, middle=2, suffix=3, pad=4)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from hcx_megatron.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def docs(tok):
    texts = []
    for lang in ("ko", "en", "code"):
        with open(os.path.join(REPO, "examples", "data", f"{lang}.jsonl")) as f:
            texts += [json.loads(line)["text"][:600] for line in f][:6]
    return texts


def _split_psm(out: np.ndarray, mode: str):
    """Parse a FIM sequence (the mode is needed: PSM with an empty prefix looks like SPM)."""
    out = out.tolist()
    assert out[0] == IDS.prefix
    if mode == "spm":  # <pre><suf> S <mid> P M
        assert out[1] == IDS.suffix
        mid = out.index(IDS.middle)
        return "spm", None, out[2:mid], out[mid + 1:]
    suf, mid = out.index(IDS.suffix), out.index(IDS.middle)
    return "psm", out[1:suf], out[suf + 1:mid], out[mid + 1:]


@pytest.mark.timeout(60)
def test_token_mode_reassembles_document():
    doc = np.arange(100, 160)
    for i in range(200):
        r = apply_fim(doc, fim_rng(7, i), fim_rate=1.0, spm_rate=0.5, split_unit="token", ids=IDS)
        assert r.mode in ("psm", "spm") and r.unit == "token"
        assert np.concatenate([r.prefix, r.middle, r.suffix]).tolist() == doc.tolist()
        mode, p, s, tail = _split_psm(r.tokens, r.mode)
        if mode == "psm":
            assert p == r.prefix.tolist() and s == r.suffix.tolist() and tail == r.middle.tolist()
        else:
            assert s == r.suffix.tolist() and tail == r.prefix.tolist() + r.middle.tolist()
        assert r.tokens.size == doc.size + 3


@pytest.mark.timeout(120)
def test_char_mode_reassembles_text(tok, docs):
    ids = FIMTokens.from_tokenizer(tok)
    for i, text in enumerate(docs):
        doc = tok.tokenize(text)
        r = apply_fim(doc, fim_rng(3, i), fim_rate=1.0, spm_rate=0.5, split_unit="char", ids=ids, tokenizer=tok)
        assert r.unit == "char"
        assert tok.detokenize(r.prefix) + tok.detokenize(r.middle) + tok.detokenize(r.suffix) == text
        body = [t for t in r.tokens.tolist() if t not in (ids.prefix, ids.middle, ids.suffix)]
        assert sorted(body) == sorted(r.prefix.tolist() + r.middle.tolist() + r.suffix.tolist())
    # A fragment that starts inside a UTF-8 character has no character form: falls back to token cuts.
    lead_byte = tok.vocab["\u00ec"]  # byte 0xEC (first byte of 한) in the byte-level alphabet
    doc = [lead_byte] + tok.tokenize("abc def")
    r = apply_fim(doc, fim_rng(0, 0), fim_rate=1.0, spm_rate=0.0, split_unit="char", ids=ids, tokenizer=tok)
    assert r.unit == "token"
    assert np.concatenate([r.prefix, r.middle, r.suffix]).tolist() == doc


@pytest.mark.timeout(60)
def test_rates_within_statistical_bounds():
    n, fim_rate, spm_rate = 6000, 0.4, 0.3
    doc = np.arange(20, 60)
    counts = {"plain": 0, "psm": 0, "spm": 0}
    for i in range(n):
        counts[apply_fim(doc, fim_rng(11, i), fim_rate=fim_rate, spm_rate=spm_rate, split_unit="token",
                         ids=IDS).mode] += 1
    expect = {"plain": 1 - fim_rate, "psm": fim_rate * (1 - spm_rate), "spm": fim_rate * spm_rate}
    for mode, p in expect.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[mode] - n * p) < 5 * sigma, (mode, counts, expect)
    # Rates 0 and 1 are exact.
    assert all(apply_fim(doc, fim_rng(1, i), fim_rate=0.0, spm_rate=0.5, split_unit="token", ids=IDS).mode == "plain"
               for i in range(200))
    assert all(apply_fim(doc, fim_rng(1, i), fim_rate=1.0, spm_rate=1.0, split_unit="token", ids=IDS).mode == "spm"
               for i in range(200))


@pytest.mark.timeout(60)
def test_sample_length_preserved_and_separators_kept(tok, docs):
    ids = FIMTokens.from_tokenizer(tok)
    eod, pad = tok.eod, tok.pad
    parts = []
    for text in docs[:5]:
        parts += tok.tokenize(text) + [eod]
    for length in (len(parts), 257, 31):
        sample = np.asarray(parts[:length], dtype=np.int64)
        for i in range(30):
            modes = []
            out = apply_fim_to_sample(sample, fim_rng(5, i), fim_rate=1.0, spm_rate=0.5, split_unit="char",
                                      ids=ids, separators=[eod, pad], tokenizer=tok, modes_out=modes)
            assert out.shape == sample.shape and out.dtype == sample.dtype
            assert modes and all(m in ("psm", "spm") for m in modes)
            assert out[0] == ids.prefix
    # Three short documents: FIM adds 3 sentinels each, so the tail is truncated ...
    sample = np.asarray([10, 11, 12, eod, 13, 14, eod, 15, 16, 17], dtype=np.int64)
    out = apply_fim_to_sample(sample, fim_rng(0, 0), fim_rate=1.0, spm_rate=0.0, split_unit="token", ids=ids,
                              separators=[eod, pad])
    assert out.size == sample.size and out[0] == ids.prefix
    # ... while plain documents are untouched and trailing dataset padding stays in place.
    sample = np.asarray([10, 11, eod, pad, pad], dtype=np.int64)
    out = apply_fim_to_sample(sample, fim_rng(0, 0), fim_rate=0.0, spm_rate=0.0, split_unit="token", ids=ids,
                              separators=[eod, pad])
    assert out.tolist() == sample.tolist()


@pytest.mark.timeout(60)
def test_shorter_result_padded_with_fim_pad(tok):
    ids = FIMTokens.from_tokenizer(tok)
    # Char-mode re-tokenisation of a merged word split in three can shorten or lengthen; force shorter by
    # feeding a sample made of single-byte tokens that re-tokenise into merged tokens.
    text = "the the the the the the the the"
    byte_ids = [tok.vocab[ch if ch != " " else "\u0120"] for ch in text]
    sample = np.asarray(byte_ids, dtype=np.int64)
    found = False
    for i in range(50):
        out = apply_fim_to_sample(sample, fim_rng(9, i), fim_rate=1.0, spm_rate=0.5, split_unit="char", ids=ids,
                                  separators=[tok.eod, tok.pad], tokenizer=tok)
        assert out.size == sample.size
        if out[-1] == ids.pad:
            found = True
            body = [t for t in out.tolist() if t not in (ids.prefix, ids.middle, ids.suffix, ids.pad)]
            assert "".join(sorted(tok.detokenize(body))) == "".join(sorted(text))
    assert found


@pytest.mark.timeout(60)
def test_deterministic_per_seed_and_index(tok, docs):
    ids = FIMTokens.from_tokenizer(tok)
    sample = np.asarray(sum((tok.tokenize(t) + [tok.eod] for t in docs[:4]), []), dtype=np.int64)

    def run(seed, idx):
        return apply_fim_to_sample(sample, fim_rng(seed, idx), fim_rate=0.7, spm_rate=0.5, split_unit="char",
                                   ids=ids, separators=[tok.eod, tok.pad], tokenizer=tok).tolist()

    assert run(1, 5) == run(1, 5)
    assert len({tuple(run(1, i)) for i in range(8)}) > 1
    assert run(1, 5) != run(2, 5) or run(1, 6) != run(2, 6)


def _build(prefix, tok, cache, fim_rate, cls_name="FIMGPTDataset", seq=64, unit="char"):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from hcx_megatron.data.fim import FIMGPTDataset, FIMGPTDatasetConfig

    cfg = FIMGPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=([prefix], None), split="90,10,0",
                              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                              tokenizer=tok, path_to_cache=str(cache), fim_rate=fim_rate, fim_spm_rate=0.5,
                              fim_split_unit=unit)
    cls = FIMGPTDataset if cls_name == "FIMGPTDataset" else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, [40, 8, None], lambda: True, cfg).build()


@pytest.mark.timeout(180)
def test_fim_dataset_through_megatron_builder(tiny_indexed_dataset, tok, tmp_path):
    from hcx_megatron.data.fim import FIMGPTDataset

    train, valid, test = _build(tiny_indexed_dataset, tok, tmp_path / "c1", fim_rate=0.9)
    assert isinstance(train, FIMGPTDataset) and isinstance(valid, FIMGPTDataset) and test is None
    assert len(train) >= 40
    n_fim = 0
    for i in range(40):
        item = train[i]
        assert item["tokens"].shape == (64,) and item["labels"].shape == (64,)
        toks = item["tokens"].tolist()
        n_fim += toks.count(tok.fim_prefix_id)
        lab = item["labels"]
        assert (item["loss_mask"][lab == tok.fim_pad_id] == 0).all()
    assert n_fim >= 20  # ~0.9 per document piece; every sample has at least one piece

    # A fresh build (new cache dir) gives the same samples: resume-exact determinism.
    again, _, _ = _build(tiny_indexed_dataset, tok, tmp_path / "c2", fim_rate=0.9)
    for i in (0, 7, 39):
        assert train[i]["tokens"].tolist() == again[i]["tokens"].tolist()

    # fim_rate 0 is exactly megatron-core's GPTDataset.
    plain, _, _ = _build(tiny_indexed_dataset, tok, tmp_path / "c3", fim_rate=0.0)
    ref, _, _ = _build(tiny_indexed_dataset, tok, tmp_path / "c4", fim_rate=0.0, cls_name="GPTDataset")
    for i in (0, 5, 20):
        assert plain[i]["tokens"].tolist() == ref[i]["tokens"].tolist()
    # With FIM, the token multiset of a sample changes only by sentinels/padding/re-tokenisation and the
    # sample differs from the plain one for at least some indices.
    assert any(train[i]["tokens"].tolist() != ref[i]["tokens"].tolist() for i in range(10))


@pytest.mark.timeout(60)
def test_config_validation(tok):
    from hcx_megatron.data.fim import FIMGPTDatasetConfig

    common = dict(random_seed=1, sequence_length=8, reset_position_ids=False, reset_attention_mask=False,
                  eod_mask_loss=False, tokenizer=tok)
    with pytest.raises(ValueError, match="fim-rate"):
        FIMGPTDatasetConfig(**common, fim_rate=1.5)
    with pytest.raises(ValueError, match="fim-split-unit"):
        FIMGPTDatasetConfig(**common, fim_rate=0.5, fim_split_unit="word")
    assert FIMGPTDatasetConfig(**common, fim_rate=0.5).fim_spm_rate == 0.5
