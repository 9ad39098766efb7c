"""HCX tokenizer: morpheme-aware training, losslessness, special tokens, HF parity, megatron glue."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from hcx_megatron.tokenizer.morpheme import (
    MorphemeSegmenter, insert_delimiter, split_at, valid_split_offsets, word_internal_boundaries,
)
from hcx_megatron.tokenizer.special_tokens import SPECIAL_TOKENS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [os.path.join(REPO, "examples", "data", f"{x}.jsonl") for x in ("ko", "en", "code")]

HARD_STRINGS = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\t\t\tand\r\nCRLF\n\n\n\nnewlines\n",
    "NUL\x00inside\x00\x00 and \x01\x7f controls",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇰🇷🇺🇸",
    "한국어 문장입니다. 했습니다 그랬었지요! 띄어쓰기없는긴문장도잘되나요",
    "mixed 中文 русский العربية हिन्दी ελληνικά 日本語のテキスト",
    "combining e\u0301 and decomposed Hangul \u1112\u1161\u11ab",
    "literal specials <|endoftext|><|fim_prefix|> <|user|>hi<|endofturn|> <|pad|>",
    "numbers 1234567890 3.14159 -42 0x1F",
    "def f(x):\n    return x ** 2  # comment\n\tpass\n",
    "\u200b zero width \ufeff bom \ufffd replacement \U0010ffff max",
    "\ufdd0 training delimiter char in text",
]


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0xAC00, 0xD7A3), (0x0, 0x1F), (0x80, 0x7FF), (0x1F300, 0x1FAFF), (0xE000, 0xFFFD),
             (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(pools)
            c = rng.randint(lo, hi)
            if 0xD800 <= c <= 0xDFFF:
                c = 0x41
            chars.append(chr(c))
        out.append("".join(chars))
    return out


# ------------------------------------------------------------------------------------ morphemes

@pytest.mark.timeout(10)
def test_valid_split_offsets_respects_contractions():
    # 했 = 하[14,15) + 었[14,15): only 14 and 15 divide the string.
    assert valid_split_offsets([(14, 15), (14, 15), (15, 18)]) == [14, 15, 18]
    # 그랬었 = 그렇[19,21) + 었었[20,22): 20 and 21 lie inside a span, so no split there.
    assert valid_split_offsets([(19, 21), (20, 22), (22, 23)]) == [19, 22, 23]
    assert valid_split_offsets([]) == []


@pytest.mark.timeout(10)
def test_word_internal_boundaries_only_inside_korean_words():
    text = "나는 hello 학교에"
    # 1: 나|는 (inside a Korean word); 2/3: next to a space; 5: inside "hello"; 11: 학교|에; 12: end
    assert word_internal_boundaries(text, [1, 2, 3, 5, 11, 12]) == [1, 11]
    assert insert_delimiter("abc", [1, 2], "|") == "a|b|c"
    assert split_at("abc", [1]) == ["a", "bc"]


@pytest.mark.timeout(60)
def test_segmenter_is_lossless_and_splits_morphemes():
    seg = MorphemeSegmenter()
    s = "나는 어제 학교에 갔다. 그랬었지"
    pieces = seg.segment(s)
    assert "".join(pieces) == s
    assert pieces[0] == "나" and any(p.endswith("학교") for p in pieces)
    bs = seg.boundaries(s)
    assert s.index("에") in bs  # 학교|에
    assert s.index("랬") not in bs and s.index("었") not in bs  # inside the contraction 그랬었
    with open(EXAMPLES[0]) as f:
        docs = [json.loads(line)["text"] for line in f][:5]
    for d, b in zip(docs, seg.boundaries_many(docs)):
        assert "".join(split_at(d, b)) == d
        assert all(not d[i - 1].isspace() and not d[i].isspace() for i in b)


# ------------------------------------------------------------------------------------ hf backend

@pytest.fixture(scope="module")
def hf_tok(tiny_tokenizer_dir):
    from hcx_megatron.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    from hcx_megatron.data.jsonl import iter_texts
    from hcx_megatron.tokenizer import load_tokenizer
    from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

    out = str(tmp_path_factory.mktemp("spm") / "tok")
    texts = [t for d in iter_texts(EXAMPLES) for t in d.texts]
    train_tokenizer(texts, out, TrainConfig(vocab_size=1500, backend="sentencepiece"))
    return load_tokenizer(out)


@pytest.mark.timeout(120)
def test_tokenizer_dir_layout_and_metadata(tiny_tokenizer_dir, hf_tok):
    for f in ("tokenizer.json", "hcx_tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(tiny_tokenizer_dir, f))
    with open(os.path.join(tiny_tokenizer_dir, "hcx_tokenizer.json")) as f:
        meta = json.load(f)
    assert meta["backend"] == "hf" and meta["morpheme_split"] is True
    assert meta["vocab_size"] == hf_tok.vocab_size == 2048
    assert meta["training"]["morpheme_boundaries"] > 1000  # the analyser really ran on the Korean slice
    assert meta["special_tokens"] == {s: i for i, s in enumerate(SPECIAL_TOKENS)}


@pytest.mark.timeout(120)
def test_special_token_ids_fixed(hf_tok, spm_tok):
    for tok in (hf_tok, spm_tok):
        assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(10))
        assert tok.vocab[SPECIAL_TOKENS[0]] == 0 and tok.vocab["<|pad|>"] == 9
        assert (tok.eod, tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id, tok.fim_pad_id) == (0, 1, 2, 3, 4)
        assert (tok.system_id, tok.user_id, tok.assistant_id, tok.endofturn_id, tok.pad) == (5, 6, 7, 8, 9)
        assert tok.special_id("user") == tok.special_id("<|user|>") == 6
        with pytest.raises(KeyError):
            tok.special_id("nope")


@pytest.mark.timeout(120)
def test_special_literals_are_plain_text_unless_asked(hf_tok, spm_tok):
    text = "a <|endoftext|> b <|user|>c<|fim_middle|>"
    for tok in (hf_tok, spm_tok):
        ids = tok.tokenize(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in ids)
        assert tok.detokenize(ids) == text
        sp = tok.tokenize_with_special(text)
        assert [i for i in sp if i < len(SPECIAL_TOKENS)] == [0, 6, 2]
        assert tok.detokenize(sp) == text
    import pickle

    for tok in (hf_tok, spm_tok):  # DataLoader workers (spawn) receive pickled tokenizers
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.tokenize(text) == tok.tokenize(text)
        assert all(i >= len(SPECIAL_TOKENS) for i in clone.tokenize(text))
        assert clone.tokenize_with_special(text) == tok.tokenize_with_special(text)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "안녕"}], add_generation_prompt=True)
    assert chat[0] == 6 and chat[-2:] == [8, 7]


@pytest.mark.timeout(120)
def test_hf_roundtrip_lossless(hf_tok):
    for s in HARD_STRINGS + _random_strings(300):
        ids = hf_tok.tokenize(s)
        assert hf_tok.detokenize(ids) == s, repr(s)
        assert hf_tok.decode_bytes(ids) == s.encode("utf-8")
        assert all(len(SPECIAL_TOKENS) <= i < hf_tok.vocab_size for i in ids)
    batch = hf_tok.tokenize_batch(HARD_STRINGS)
    assert batch == [hf_tok.tokenize(s) for s in HARD_STRINGS]


@pytest.mark.timeout(120)
def test_spm_roundtrip_lossless_and_no_unk(spm_tok):
    unk = spm_tok._sp.unk_id()
    # U+2581 is sentencepiece's space marker and decodes to " ": a documented limit of that backend.
    for s in [x for x in HARD_STRINGS + _random_strings(300, seed=1) if "\u2581" not in x]:
        ids = spm_tok.tokenize(s)
        assert spm_tok.detokenize(ids) == s, repr(s)
        assert unk not in ids


@pytest.mark.timeout(60)
def test_unpaired_surrogate_policy(hf_tok):
    bad = "ok \ud800 here"
    with pytest.raises(ValueError, match="unpaired surrogate"):
        hf_tok.tokenize(bad)
    assert hf_tok.detokenize(hf_tok.tokenize(bad, errors="replace")) == "ok \ufffd here"


@pytest.mark.timeout(120)
def test_hf_export_gives_identical_ids(tiny_tokenizer_dir, hf_tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with open(EXAMPLES[0]) as f:
        docs = [json.loads(line)["text"] for line in f][:6]
    for s in docs + HARD_STRINGS:
        assert hf.encode(s, add_special_tokens=False) == hf_tok.tokenize(s), repr(s[:50])
    assert hf.eos_token_id == hf_tok.eod and hf.pad_token_id == hf_tok.pad
    # The raw tokenizer.json (no tokenizer_config) also agrees on ordinary text.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(tiny_tokenizer_dir, "tokenizer.json"))
    assert raw.encode(docs[0], add_special_tokens=False).ids == hf_tok.tokenize(docs[0])


@pytest.mark.timeout(120)
def test_morpheme_split_changes_merges_on_korean(tmp_path):
    """Same data and vocab: the morpheme-aware tokenizer aligns more Korean-word-internal token boundaries
    with morpheme boundaries than plain BPE (measured on the training text itself)."""
    from hcx_megatron.data.jsonl import iter_texts
    from hcx_megatron.tokenizer import load_tokenizer
    from hcx_megatron.tokenizer.report import evaluate
    from hcx_megatron.tokenizer.train import TrainConfig, train_tokenizer

    ko = [t for d in iter_texts([EXAMPLES[0]]) for t in d.texts]
    seg = MorphemeSegmenter()
    morph = seg.boundaries_many(ko)
    shares = {}
    for split in (True, False):
        out = str(tmp_path / f"tok{split}")
        train_tokenizer(ko, out, TrainConfig(vocab_size=1500, backend="hf", morpheme_split=split))
        st = evaluate(load_tokenizer(out), ko, None, morph_cache=morph)
        shares[split] = st.morpheme_alignment
    assert shares[True] > shares[False] + 0.05, shares


@pytest.mark.timeout(120)
def test_megatron_integration(hf_tok, tiny_tokenizer_dir):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizerBase

    from hcx_megatron.tokenizer import HCXTokenizer, build_tokenizer

    assert isinstance(hf_tok, MegatronTokenizerBase) and isinstance(hf_tok, HCXTokenizer)
    assert isinstance(build_tokenizer(None, tiny_tokenizer_dir), HCXTokenizer)
    assert isinstance(build_tokenizer("HCXTokenizer", tiny_tokenizer_dir), HCXTokenizer)
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=8, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, tokenizer=hf_tok)
    assert cfg.tokenizer.vocab_size == 2048
    assert hf_tok.unique_identifiers["class"] == "HCXTokenizer"
    null = build_tokenizer("NullTokenizer", None, vocab_size=128)
    assert isinstance(null, MegatronTokenizerBase) and null.vocab_size == 128 and null.eod == 127
    with pytest.raises(ValueError, match="tokenizer-type"):
        build_tokenizer("Bogus", None)
    with pytest.raises(FileNotFoundError, match="hcx_tokenizer.json"):
        build_tokenizer(None, os.path.dirname(tiny_tokenizer_dir))


@pytest.mark.timeout(120)
def test_train_tokenizer_cli(tmp_path):
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", EXAMPLES[1],
                        "--json-keys", "text", "--vocab-size", "600", "--output", str(out), "--backend",
                        "sentencepiece", "--quiet"], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["vocab_size"] == 600
    assert (out / "tokenizer.model").exists() and (out / "hcx_tokenizer.json").exists()
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input",
                          str(tmp_path / "missing.jsonl"), "--vocab-size", "600", "--output", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "missing.jsonl" in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.timeout(10)
def test_report_alignment_counts_pure():
    from hcx_megatron.tokenizer.report import alignment_counts, hangul_word_byte_spans, _char_to_byte

    text = "ab 학교에 cd"
    c2b = _char_to_byte(text)
    spans = hangul_word_byte_spans(text, c2b)
    assert spans == [(3, 12)]  # three 3-byte syllables
    morph = {c2b[5]}  # 학교|에
    # token ends at bytes 2 (outside), 6 (학|교: inside, not morpheme), 9 (교|에: on it), 10 (inside 에's bytes)
    assert alignment_counts([2, 6, 9, 10, 12], spans, morph) == (3, 1)


@pytest.mark.timeout(60)
def test_offsets_map_tokens_to_character_starts(hf_tok):
    s = "ab 학교에 갔다 😀x"
    ids = hf_tok.tokenize(s)
    offs = hf_tok.offsets(ids, s)
    assert len(offs) == len(ids) and offs[0] == 0 and offs == sorted(offs)
    for i, o in zip(ids, offs):
        piece = hf_tok.token_bytes(i)
        # a token that starts a character starts exactly where its bytes appear in the text
        if piece and (piece[0] & 0xC0) != 0x80:
            assert s.encode()[len(s[:o].encode()):].startswith(piece)


@pytest.mark.timeout(120)
def test_null_tokenizer_follows_megatron_and_leaves_transformers_unimported():
    """Mock-data runs build a NullTokenizer in every process: it must behave as megatron-core's and must not pull
    in transformers (megatron.core.tokenizers.text imports it: ~1.6 s per process)."""
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as CoreNull

    from hcx_megatron.tokenizer import build_tokenizer

    ours, core = build_tokenizer("NullTokenizer", None, vocab_size=70_001), CoreNull(70_000)
    text = "5 0 69999 70000 17"
    assert ours.tokenize(text) == core.text_to_ids(text) == [5, 0, 69999, 70000, 17]
    assert ours.detokenize([5, 0, 70000]) == core.ids_to_text([5, 0, 70000])
    assert (ours.vocab_size, ours.eod, ours.eos) == (core.vocab_size, core.eod, core.eod) == (70_001, 70_000, 70_000)
    probe = ("import sys; from hcx_megatron.tokenizer import build_tokenizer; "
             "t = build_tokenizer('NullTokenizer', None, vocab_size=64); "
             "print(t.eod, t.tokenize('1 2 63'), t.detokenize([4, 5]), "
             "sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=100, check=True)
    assert out.stdout.strip() == "63 [1, 2, 63] 4 5 []", out.stdout + out.stderr
