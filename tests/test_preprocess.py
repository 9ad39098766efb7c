"""Preprocessing JSONL -> megatron-core indexed datasets."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [os.path.join(REPO, "examples", "data", f"{x}.jsonl") for x in ("ko", "en", "code")]
TOOL = os.path.join(REPO, "tools", "preprocess_data.py")


def _texts(path):
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def _bad_file(path) -> dict[str, list[int]]:
    """A JSONL with one bad line of each kind; returns reason -> 1-based line numbers."""
    good = json.dumps({"text": "좋은 문서입니다. a good document"}, ensure_ascii=False).encode()
    lines = [
        good,                                              # 1
        b'{"text": "unterminated',                         # 2 invalid_json
        json.dumps({"body": "no text key"}).encode(),      # 3 missing_key
        json.dumps({"text": 42}).encode(),                 # 4 non_string
        b'{"text": "bad \xff\xfe bytes"}',                 # 5 invalid_utf8
        json.dumps({"text": "   \n "}).encode(),           # 6 empty_text
        b'{"text": "lone \\ud800 surrogate"}',             # 7 invalid_utf8 (no UTF-8 form)
        b"[1, 2, 3]",                                      # 8 invalid_json (not an object)
        good,                                              # 9
    ]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return {"invalid_json": [2, 8], "missing_key": [3], "non_string": [4], "invalid_utf8": [5, 7], "empty_text": [6]}


@pytest.mark.timeout(120)
def test_roundtrip_through_megatron_indexed_dataset(tiny_indexed_dataset, tiny_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hcx_megatron.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    assert tiny_indexed_dataset.endswith("demo_text_document")
    ds = IndexedDataset(tiny_indexed_dataset)
    texts = [t for p in EXAMPLES for t in _texts(p)]
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.uint16  # vocab 2048 < 65,500
    for i in (0, 1, len(texts) // 2, len(texts) - 1):
        doc = ds[i]
        assert doc[-1] == tok.eod
        assert doc[:-1].tolist() == tok.tokenize(texts[i])
        assert tok.detokenize(doc[:-1]) == texts[i]


@pytest.mark.timeout(180)
def test_two_workers_byte_identical_to_one(tmp_path, tiny_tokenizer_dir):
    outs = []
    for w in (1, 2):
        prefix = str(tmp_path / f"w{w}")
        r = subprocess.run([sys.executable, TOOL, "--input", *EXAMPLES, "--output-prefix", prefix,
                            "--tokenizer-model", tiny_tokenizer_dir, "--json-keys", "text", "--append-eod",
                            "--workers", str(w), "--batch-lines", "7"], capture_output=True, text=True, timeout=170)
        assert r.returncode == 0, r.stderr
        assert "docs 73" in r.stderr and "skipped 0" in r.stderr
        outs.append(prefix + "_text_document")
    for ext in (".bin", ".idx"):
        with open(outs[0] + ext, "rb") as a, open(outs[1] + ext, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.timeout(120)
def test_bad_input_skipped_and_counted(tmp_path, tiny_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess

    bad = str(tmp_path / "bad.jsonl")
    expected = _bad_file(bad)
    s = preprocess(PreprocessConfig(inputs=[bad], output_prefix=str(tmp_path / "out"),
                                    tokenizer_model=tiny_tokenizer_dir, append_eod=True, workers=1, progress=False))
    assert s.docs == 2
    assert s.skipped == {k: len(v) for k, v in expected.items()}
    for reason, lines in expected.items():
        assert s.examples[reason] == [f"{bad}:{n}" for n in lines]
    assert "invalid_json: 2 (first at" in s.format()
    assert len(IndexedDataset(s.outputs[0])) == 2


@pytest.mark.timeout(120)
def test_strict_stops_with_file_line_and_leaves_no_output(tmp_path, tiny_tokenizer_dir):
    bad = str(tmp_path / "bad.jsonl")
    _bad_file(bad)
    prefix = str(tmp_path / "out")
    r = subprocess.run([sys.executable, TOOL, "--input", bad, "--output-prefix", prefix, "--tokenizer-model",
                        tiny_tokenizer_dir, "--json-keys", "text", "--append-eod", "--workers", "2", "--strict",
                        "--no-progress"], capture_output=True, text=True, timeout=110)
    assert r.returncode == 1
    assert f"{bad}:2: invalid_json" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # neither final nor temporary files


@pytest.mark.timeout(120)
def test_compressed_inputs_multiple_keys_and_strict_success(tmp_path, tiny_tokenizer_dir):
    import zstandard
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess
    from hcx_megatron.tokenizer import load_tokenizer

    rows = [{"text": t, "title": t[:20]} for t in _texts(EXAMPLES[0])[:5]]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    gz, zst = str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.zst")
    with gzip.open(gz, "wb") as f:
        f.write(data)
    with open(zst, "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(data))
    s = preprocess(PreprocessConfig(inputs=[gz, zst], output_prefix=str(tmp_path / "c"),
                                    tokenizer_model=tiny_tokenizer_dir, json_keys=["text", "title"],
                                    append_eod=False, workers=2, strict=True, progress=False))
    assert [os.path.basename(p) for p in s.outputs] == ["c_text_document", "c_title_document"]
    tok = load_tokenizer(tiny_tokenizer_dir)
    text_ds, title_ds = IndexedDataset(s.outputs[0]), IndexedDataset(s.outputs[1])
    assert len(text_ds) == len(title_ds) == 10
    assert title_ds[6].tolist() == tok.tokenize(rows[1]["title"])  # second file, second row
    assert s.tokens == int(text_ds.sequence_lengths.sum() + title_ds.sequence_lengths.sum())


@pytest.mark.timeout(120)
def test_int32_dtype_for_large_vocab(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess

    src = tmp_path / "ids.jsonl"
    src.write_text('{"text": "1 2 69999"}\n{"text": "65535 70000"}\n')
    s = preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "n"), tokenizer_model=None,
                                    tokenizer_type="NullTokenizer", vocab_size=70_001, append_eod=True,
                                    progress=False))
    ds = IndexedDataset(s.outputs[0])
    assert ds.index.dtype == np.int32
    assert ds[0].tolist() == [1, 2, 69999, 70000] and ds[1].tolist() == [65535, 70000, 70000]


@pytest.mark.timeout(120)
def test_merge_datasets(tmp_path, tiny_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from hcx_megatron.data.preprocess import PreprocessConfig, preprocess

    prefixes = []
    for p in EXAMPLES[:2]:
        name = os.path.basename(p).split(".")[0]
        s = preprocess(PreprocessConfig(inputs=[p], output_prefix=str(tmp_path / name),
                                        tokenizer_model=tiny_tokenizer_dir, append_eod=True, progress=False))
        prefixes.append(s.outputs[0])
    out = str(tmp_path / "merged_text_document")
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"), "--input", *prefixes,
                        "--output-prefix", out], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stderr
    parts = [IndexedDataset(p) for p in prefixes]
    merged = IndexedDataset(out)
    assert len(merged) == sum(len(p) for p in parts)
    assert merged[len(parts[0])].tolist() == parts[1][0].tolist()
    assert merged[len(merged) - 1].tolist() == parts[1][len(parts[1]) - 1].tolist()
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "merge_datasets.py"), "--input",
                        str(tmp_path / "nope"), "--output-prefix", out + "2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "nope.bin not found" in r.stderr


@pytest.mark.timeout(120)
def test_bounded_read_ahead_with_workers(monkeypatch):
    """The reader stays at most workers*inflight_per_worker batches ahead of the writer (bounded memory)."""
    import hcx_megatron.data.preprocess as pp

    consumed = []

    def fake_batches(paths, batch_lines):
        for i in range(100):
            consumed.append(i)
            yield [(0, i + 1, b'{"text": "1 2 3"}')]

    monkeypatch.setattr(pp, "_batches", fake_batches)
    cfg = pp.PreprocessConfig(inputs=["x"], output_prefix="unused", tokenizer_model=None,
                              tokenizer_type="NullTokenizer", vocab_size=10, workers=2, inflight_per_worker=2)
    gen = pp._ordered_results(cfg, ("NullTokenizer", None, 10, ["text"], True, "uint16"))
    first = next(gen)
    assert first[0][1] == 1 and first[0][3][0].tolist() == [1, 2, 3, 9]
    assert len(consumed) == 4  # 2 workers x 2 batches in flight, not the whole input
    rest = list(gen)
    assert [r[0][1] for r in rest] == list(range(2, 101))  # ordered
