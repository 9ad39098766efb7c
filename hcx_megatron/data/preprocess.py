"""JSONL -> megatron-core indexed datasets (`<prefix>_<key>_document.bin/.idx`).

Written in megatron-core's IndexedDatasetBuilder format by `indexed_writer` (numpy only, byte-identical,
tested), so megatron-core's IndexedDataset reads the output unchanged.  Lines are parsed and tokenized by
`workers` processes; results are written in input order.  For HCX hf-backend tokenizers the encoder is
`hcx_megatron.tokenizer.fast_bpe` (same ids as `tokenizers`, ~2.5x less CPU), and neither torch nor
megatron-core is imported (seconds of start-up); other tokenizers go through `build_tokenizer`.
Memory stays bounded: at most `workers * inflight_per_worker` batches of `batch_lines` lines are in
flight (Pool.imap would read the whole input ahead).  Output is written under temporary names and
renamed only after success, so a failed or --strict-stopped run never leaves a half-written dataset
under the final name.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from hcx_megatron.data.jsonl import REASONS, BadLine, iter_lines, parse_line

log = logging.getLogger(__name__)


class PreprocessError(RuntimeError):
    """Bad input under --strict (message starts with file:line) or an unusable setup."""


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str | None
    tokenizer_type: str | None = None
    vocab_size: int | None = None  # only for tokenizer_type NullTokenizer
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = 1
    strict: bool = False
    batch_lines: int = 128
    inflight_per_worker: int = 4
    progress: bool = True
    max_examples: int = 5  # line numbers reported per skip reason


@dataclass
class PreprocessSummary:
    docs: int = 0
    tokens: int = 0
    input_bytes: int = 0
    lines: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in REASONS})
    examples: dict[str, list[str]] = field(default_factory=lambda: {r: [] for r in REASONS})
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    dtype: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def format(self) -> str:
        s = max(self.seconds, 1e-9)
        lines = [f"docs {self.docs:,}  tokens {self.tokens:,}  input {self.input_bytes / 1e6:.2f} MB  "
                 f"in {self.seconds:.1f} s ({self.docs / s:,.0f} docs/s, {self.input_bytes / 1e6 / s:.2f} MB/s, "
                 f"{self.tokens / s:,.0f} tokens/s)  dtype {self.dtype}"]
        lines.append(f"skipped {self.skipped_total:,}" + (":" if self.skipped_total else ""))
        for r in REASONS:
            if self.skipped[r]:
                lines.append(f"  {r}: {self.skipped[r]:,} (first at {', '.join(self.examples[r])})")
        lines += [f"wrote {p}.bin / .idx" for p in self.outputs]
        return "\n".join(lines)


def output_prefixes(output_prefix: str, keys: Sequence[str]) -> list[str]:
    """Megatron naming: P_text_document for key "text"."""
    return [f"{output_prefix}_{k}_document" for k in keys]


# --------------------------------------------------------------------------- worker side
_W: dict = {}


def _load_tokenizer(tokenizer_type, tokenizer_model, vocab_size):
    if tokenizer_type in (None, "HCXTokenizer") and tokenizer_model and not os.environ.get("HCX_PREPROCESS_SLOW"):
        from hcx_megatron.tokenizer.fast_bpe import load_preprocess_encoder

        enc = load_preprocess_encoder(tokenizer_model)  # None: not an hf-backend directory
        if enc is not None:
            return enc
    from hcx_megatron.tokenizer import build_tokenizer

    return build_tokenizer(tokenizer_type, tokenizer_model, vocab_size=vocab_size)


def _init_worker(tokenizer_type, tokenizer_model, vocab_size, keys, append_eod, dtype_name):
    # One tokenizer per process, single-threaded: parallelism comes from processes (--workers).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = _load_tokenizer(tokenizer_type, tokenizer_model, vocab_size)
    _W.update(tok=tok, keys=list(keys), eod=tok.eod if append_eod else None, dtype=np.dtype(dtype_name))


def _encode_lines(batch: list[tuple[int, int, bytes]]) -> list[tuple[int, int, int, object]]:
    """[(file idx, line no, raw)] -> [(file idx, line no, nbytes, [arrays per key] | (reason, detail))]."""
    tok, keys, eod, dtype = _W["tok"], _W["keys"], _W["eod"], _W["dtype"]
    parsed, out = [], []
    for fi, lineno, raw in batch:
        try:
            parsed.append((fi, lineno, len(raw), parse_line(raw, keys)))
        except BadLine as e:
            parsed.append((fi, lineno, len(raw), (e.reason, e.detail)))
    good = [p for p in parsed if isinstance(p[3], list)]
    encoded = {}
    for ki in range(len(keys)):
        texts = [p[3][ki] for p in good]
        encoded[ki] = tok.tokenize_batch(texts) if hasattr(tok, "tokenize_batch") else [tok.tokenize(t) for t in texts]
    gi = 0
    for fi, lineno, nbytes, res in parsed:
        if isinstance(res, list):
            arrays = []
            for ki in range(len(keys)):
                ids = encoded[ki][gi]
                if eod is not None:
                    ids = list(ids) + [eod]
                arrays.append(np.asarray(ids, dtype=dtype))
            gi += 1
            out.append((fi, lineno, nbytes, arrays))
        else:
            out.append((fi, lineno, nbytes, res))
    return out


# --------------------------------------------------------------------------- main process
def _batches(paths: Sequence[str], batch_lines: int) -> Iterator[list[tuple[int, int, bytes]]]:
    batch = []
    for fi, path in enumerate(paths):
        for lineno, raw in iter_lines(path):
            batch.append((fi, lineno, raw))
            if len(batch) >= batch_lines:
                yield batch
                batch = []
    if batch:
        yield batch


def _ordered_results(cfg: PreprocessConfig, init_args) -> Iterator[list]:
    """Encoded batches in input order; bounded number of batches in flight."""
    if cfg.workers <= 1:
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        try:
            _init_worker(*init_args)
            for batch in _batches(cfg.inputs, cfg.batch_lines):
                yield _encode_lines(batch)
        finally:  # in-process: do not leave the caller's tokenizers single-threaded
            if saved is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        limit = cfg.workers * cfg.inflight_per_worker
        for batch in _batches(cfg.inputs, cfg.batch_lines):
            pending.append(pool.apply_async(_encode_lines, (batch,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    from hcx_megatron.data.indexed_writer import IndexedDatasetWriter, optimal_dtype

    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {cfg.workers}")
    for p in cfg.inputs:
        if not os.path.isfile(p):
            raise PreprocessError(f"--input {p}: file not found")
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix {cfg.output_prefix}: directory {out_dir} does not exist")
    tok = _load_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_size)
    dtype = optimal_dtype(tok.vocab_size)  # uint16 below 65,500 ids, else int32 (megatron's rule)
    del tok

    finals = output_prefixes(cfg.output_prefix, cfg.json_keys)
    temps = [f"{p}.tmp{os.getpid()}" for p in finals]
    builders = [IndexedDatasetWriter(t + ".bin", dtype=dtype) for t in temps]
    summary = PreprocessSummary(dtype=np.dtype(dtype).name)
    total_bytes = sum(os.path.getsize(p) for p in cfg.inputs) if all(
        not p.endswith((".gz", ".zst", ".zstd")) for p in cfg.inputs) else None
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess",
                   mininterval=1.0, smoothing=0.1)
    t0 = time.perf_counter()
    init_args = (cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_size, cfg.json_keys, cfg.append_eod,
                 np.dtype(dtype).name)
    ok = False
    try:
        for results in _ordered_results(cfg, init_args):
            nb = 0
            for fi, lineno, nbytes, res in results:
                nb += nbytes + 1
                summary.lines += 1
                if isinstance(res, tuple):
                    reason, detail = res
                    where = f"{cfg.inputs[fi]}:{lineno}"
                    if cfg.strict:
                        raise PreprocessError(f"{where}: {reason}: {detail} (--strict)")
                    summary.skipped[reason] += 1
                    if len(summary.examples[reason]) < cfg.max_examples:
                        summary.examples[reason].append(where)
                    continue
                for b, arr in zip(builders, res):
                    b.add_document(arr, [arr.size])
                    summary.tokens += int(arr.size)
                summary.docs += 1
            summary.input_bytes += nb
            if bar is not None:
                bar.update(nb)
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{summary.docs / dt:,.0f} docs/s, {summary.tokens / dt:,.0f} tok/s", refresh=False)
        for b, t in zip(builders, temps):
            b.finalize(t + ".idx")
        # .idx last: a reader that sees the new index also sees the complete new data file.
        for t, f in zip(temps, finals):
            os.replace(t + ".bin", f + ".bin")
            os.replace(t + ".idx", f + ".idx")
        ok = True
    finally:
        if bar is not None:
            bar.close()
        if not ok:
            for b in builders:
                try:
                    b.data_file.close()
                except Exception:
                    pass
            for t in temps:
                for ext in (".bin", ".idx"):
                    if os.path.exists(t + ext):
                        os.remove(t + ext)
    summary.seconds = time.perf_counter() - t0
    summary.outputs = finals
    return summary


def merge_datasets(prefixes: Sequence[str], output_prefix: str) -> tuple[int, int]:
    """Concatenate indexed datasets (same dtype) into one; returns (documents, tokens)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    if not prefixes:
        raise PreprocessError("merge: no input prefixes")
    dtype = None
    for p in prefixes:
        for ext in (".bin", ".idx"):
            if not os.path.isfile(p + ext):
                raise PreprocessError(f"merge: {p + ext} not found (give prefixes like P_text_document)")
        d = IndexedDataset(p)
        if dtype is None:
            dtype = d.index.dtype
        elif d.index.dtype != dtype:
            raise PreprocessError(f"merge: {p} has dtype {np.dtype(d.index.dtype).name}, "
                                  f"{prefixes[0]} has {np.dtype(dtype).name}; preprocess with one tokenizer")
    tmp = f"{output_prefix}.tmp{os.getpid()}"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", output_prefix + ".bin")
        os.replace(tmp + ".idx", output_prefix + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    merged = IndexedDataset(output_prefix)
    return len(merged.document_indices) - 1, int(merged.sequence_lengths.sum())
