"""The fast preprocessing path: numpy writer == megatron-core's IndexedDatasetBuilder, fast BPE encoder ==
Hugging Face `tokenizers`, and the CLI imports neither torch nor megatron-core."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [os.path.join(REPO, "examples", "data", f"{x}.jsonl") for x in ("ko", "en", "code")]
SHARED = os.path.join(REPO, "..", "shared", "corpus")


def _texts(paths, every=1):
    out = []
    for p in paths:
        with open(p) as f:
            out += [json.loads(line)["text"] for line in f][::every]
    return out


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_byte_identical_to_megatron_builder(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from hcx_megatron.data.indexed_writer import IndexedDatasetWriter

    rng = np.random.default_rng(0)
    hi = 65_000 if dtype == np.uint16 else 2_000_000
    docs = [rng.integers(0, hi, size=int(n)).tolist() for n in rng.integers(0, 3000, size=200)]
    docs[3] = []  # an empty document
    ours, theirs = IndexedDatasetWriter(str(tmp_path / "a.bin"), dtype), IndexedDatasetBuilder(str(tmp_path / "b.bin"),
                                                                                               dtype=dtype)
    for d in docs:
        ours.add_document(np.asarray(d, dtype=dtype), [len(d)])
        theirs.add_document(np.asarray(d, dtype=dtype), [len(d)])
    ours.finalize(str(tmp_path / "a.idx"))
    theirs.finalize(str(tmp_path / "b.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"a{ext}").read_bytes() == (tmp_path / f"b{ext}").read_bytes(), ext
    ds = IndexedDataset(str(tmp_path / "a"))
    assert len(ds) == len(docs) and ds[7].tolist() == docs[7]


def test_optimal_dtype_matches_megatron():
    from megatron.core.datasets.indexed_dataset import DType

    from hcx_megatron.data.indexed_writer import optimal_dtype

    for n in (None, 0, 2048, 65_499, 65_500, 65_536, 100_000):
        assert optimal_dtype(n) == DType.optimal_dtype(n)


def _adversarial_texts(disagreements) -> list[str]:
    rnd = random.Random(1)
    bad = [chr(a) for a, b in disagreements[:20]]
    pool = ("a Z 가 한국어 는 ñ é ß ω Ж ي ا ह ि ক ก ั 中 文 ア 1 23 4567 ٣ ⅷ ² ½ 𝟘 😀 🇰🇷 "
            "' 's 't 're 've ll . , ! ? ... -- ( ) { } # <|endoftext|> <|user|> \t \n \r\n \x0b \x0c \x85 \u00a0 "
            "\u2028 \u3000 \u200b \ufeff \u0300 \u0301 \u094d").split(" ") + [" ", "  ", "\n\n", " \n "]
    out = []
    for _ in range(300):
        out.append("".join(rnd.choice(pool) + rnd.choice(["", " ", "  ", "\n"]) for _ in range(rnd.randint(1, 40))))
    for _ in range(100):  # random scalar values from the whole range (no surrogates)
        cps = [rnd.choice([rnd.randint(0, 0x2FF), rnd.randint(0x300, 0xFFFF), rnd.randint(0x10000, 0x10FFFF)])
               for _ in range(rnd.randint(1, 30))]
        out.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF) or "x")
    out += [f"ascii{c}tail 가{c}나 12{c}3 .{c}." for c in bad]  # must take the tokenizers fallback
    out += ["", " ", "   trailing   ", "\r\n\r\n", "it's we'll they've I'M 'S"]
    return out


def test_fast_encoder_ids_equal_tokenizers(tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    from hcx_megatron.tokenizer.fast_bpe import FastBPEEncoder, class_disagreements

    path = os.path.join(tiny_tokenizer_dir, "tokenizer.json")
    enc = FastBPEEncoder(path, max_cache=500)  # small cache: exercises clearing too
    assert enc.fast, enc.problem
    ref = Tokenizer.from_file(path)
    ref.encode_special_tokens = True
    texts = _texts(EXAMPLES) + _adversarial_texts(class_disagreements())
    if os.path.isdir(SHARED):
        texts += _texts([os.path.join(SHARED, f) for f in ("ko.jsonl", "en.jsonl", "code.jsonl")], every=8)
    expected = [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]
    got = enc.tokenize_batch(texts)
    mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    assert not mismatches, [texts[i][:80] for i in mismatches[:3]]
    assert enc.fallback_docs >= 20  # the disagreeing code points went through tokenizers
    assert enc.tokenize_batch(texts[:50]) == expected[:50]  # warm cache gives the same ids


def test_pre_tokenization_equal_on_every_agreeing_code_point():
    """The guarantee the encoder rests on: outside class_disagreements(), `regex` splits exactly as
    Oniguruma does.  Every agreeing scalar value appears in the probe text, in varied contexts."""
    import regex
    from tokenizers import Regex, pre_tokenizers

    from hcx_megatron.tokenizer.fast_bpe import _all_code_points, _members, class_disagreements
    from hcx_megatron.tokenizer.train import PRETOKENIZE_REGEX

    diff = _members(class_disagreements(cache=False))
    chars = [c for c in _all_code_points() if ord(c) not in diff]
    rnd = random.Random(2)
    rnd.shuffle(chars)
    seps = ["", " ", "a", "1", ".", "\n", "  ", "가"]
    text = "".join(c + rnd.choice(seps) for c in chars)
    hf = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated")
    want = [p for p, _ in hf.pre_tokenize_str(text)]
    got = regex.findall(PRETOKENIZE_REGEX, text)
    assert got == want
    # ...and the disagreeing code points do split differently (why the encoder routes them to tokenizers)
    differ = 0
    for c in sorted(diff)[::50]:
        probe = f"ascii{chr(c)}tail 가{chr(c)}나 12{chr(c)}3 .{chr(c)}."
        differ += regex.findall(PRETOKENIZE_REGEX, probe) != [p for p, _ in hf.pre_tokenize_str(probe)]
    assert differ == len(sorted(diff)[::50]) > 50


def test_unsupported_tokenizer_json_falls_back(tmp_path, tiny_tokenizer_dir):
    from tokenizers import Tokenizer

    from hcx_megatron.tokenizer.fast_bpe import FastBPEEncoder

    with open(os.path.join(tiny_tokenizer_dir, "tokenizer.json")) as f:
        cfg = json.load(f)
    cfg["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+|[^\w\s]+"
    p = str(tmp_path / "tokenizer.json")
    with open(p, "w") as f:
        json.dump(cfg, f)
    enc = FastBPEEncoder(p)
    assert not enc.fast and "\\w" in enc.problem
    ref = Tokenizer.from_file(p)
    ref.encode_special_tokens = True
    texts = _texts(EXAMPLES[:1])
    assert enc.tokenize_batch(texts) == [e.ids for e in ref.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.timeout(180)
def test_fast_path_output_equals_megatron_tokenizer_path(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Default (fast encoder + numpy writer) vs HCXTokenizer: same .bin/.idx bytes, 1 and 2 workers."""
    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess

    def run(name, workers):
        s = preprocess(PreprocessConfig(inputs=EXAMPLES, output_prefix=str(tmp_path / name),
                                        tokenizer_model=tiny_tokenizer_dir, append_eod=True, workers=workers,
                                        batch_lines=5, progress=False))
        return [(tmp_path / f"{name}_text_document{e}").read_bytes() for e in (".bin", ".idx")]

    fast1, fast2 = run("fast1", 1), run("fast2", 2)
    monkeypatch.setenv("HCX_PREPROCESS_SLOW", "1")
    slow = run("slow", 1)
    assert fast1 == slow and fast2 == slow


@pytest.mark.timeout(120)
def test_cli_does_not_import_torch(tmp_path, tiny_tokenizer_dir):
    code = (
        "import sys\n"
        "from hcx_megatron.data.preprocess_cli import main\n"
        f"rc = main(['--input', {EXAMPLES[0]!r}, '--output-prefix', {str(tmp_path / 'o')!r}, '--tokenizer-model', "
        f"{tiny_tokenizer_dir!r}, '--append-eod', '--workers', '2', '--no-progress'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0 []", r.stdout
