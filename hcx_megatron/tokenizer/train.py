"""Training of HCX tokenizers: byte-level BPE whose merges stay inside Korean morphemes.

Morpheme boundaries (Kiwi) are marked in the training text with MORPHEME_DELIMITER; the training
pre-tokenizer splits on it, so merges are learnt inside morpheme pieces only.  The saved tokenizer has
the plain encode-time pre-tokenizer (no analyser), so encoding is fast and identical in our code,
tokenizer.json and the Hugging Face export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

from hcx_megatron.tokenizer.morpheme import MORPHEME_DELIMITER, MorphemeSegmenter
from hcx_megatron.tokenizer.special_tokens import NUM_SPECIAL_TOKENS, PAD, ENDOFTEXT, SPECIAL_TOKENS

log = logging.getLogger(__name__)

METADATA_FILE = "hcx_tokenizer.json"
HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
FORMAT_VERSION = 1

# Encode-time pre-tokenization (pure regex, applied before byte-level mapping): letters (+marks) with
# an optional leading space, digits in groups of at most 3, punctuation runs, whitespace runs.  Korean
# words are \p{L} runs, so without the training-time morpheme split a merge could span a whole eojeol.
PRETOKENIZE_REGEX = (
    r"'(?:[sdmt]|ll|ve|re)| ?[\p{L}\p{M}]+| ?\p{N}{1,3}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tokenizer_metadata(path: str) -> tuple[str, dict]:
    """(path of the metadata file, its content) of a tokenizer directory written by tools/train_tokenizer.py;
    a FileNotFoundError naming --tokenizer-model when the directory is not one."""
    meta_path = os.path.join(path, METADATA_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"--tokenizer-model {path}: no {METADATA_FILE}; expected a directory written by tools/train_tokenizer.py")
    with open(meta_path) as f:
        return meta_path, json.load(f)


@dataclass
class TrainConfig:
    vocab_size: int = 100_000
    backend: str = "hf"  # "hf" | "sentencepiece"
    model_type: str = "bpe"  # "bpe" | "unigram" (sentencepiece only; unigram is a report baseline)
    morpheme_split: bool = True
    min_frequency: int = 2
    kiwi_workers: int = 1
    spm_threads: int = 2
    spm_max_sentences: int = 2_000_000


@dataclass
class TrainStats:
    docs: int = 0
    bytes: int = 0
    morpheme_boundaries: int = 0
    segment_seconds: float = 0.0
    train_seconds: float = 0.0
    inputs: list[str] = field(default_factory=list)


def _marked_texts(texts: Iterable[str], cfg: TrainConfig, stats: TrainStats, batch: int = 64) -> Iterator[str]:
    """Training texts with morpheme boundaries marked (or unchanged when morpheme_split is off)."""
    seg = MorphemeSegmenter(num_workers=cfg.kiwi_workers) if cfg.morpheme_split else None
    buf: list[str] = []

    def flush():
        t0 = time.perf_counter()
        if seg is None:
            out = list(buf)
        else:
            out = []
            for text, bs in zip(buf, seg.boundaries_many(buf)):
                stats.morpheme_boundaries += len(bs)
                out.append(_mark(text, bs))
        stats.segment_seconds += time.perf_counter() - t0
        buf.clear()
        return out

    for text in texts:
        # Drop pre-existing delimiters: they would otherwise create splits the analyser never made.
        text = text.replace(MORPHEME_DELIMITER, "")
        stats.docs += 1
        stats.bytes += len(text.encode("utf-8"))
        buf.append(text)
        if len(buf) >= batch:
            yield from flush()
    if buf:
        yield from flush()


def _mark(text: str, boundaries: Sequence[int]) -> str:
    from hcx_megatron.tokenizer.morpheme import insert_delimiter

    return insert_delimiter(text, boundaries)


# ---------------------------------------------------------------- Hugging Face tokenizers backend

def encode_time_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _train_hf(texts: Iterable[str], cfg: TrainConfig, out_dir: str, stats: TrainStats) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())  # byte-level: every byte is in the alphabet, so no unk token exists
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(MORPHEME_DELIMITER), behavior="removed"),
        encode_time_pre_tokenizer(),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..9 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=log.isEnabledFor(logging.INFO),
    )
    t0 = time.perf_counter()
    tok.train_from_iterator(_marked_texts(texts, cfg, stats), trainer=trainer)
    stats.train_seconds = time.perf_counter() - t0 - stats.segment_seconds
    tok.pre_tokenizer = encode_time_pre_tokenizer()  # the analyser is a training-time-only device
    tok.decoder = decoders.ByteLevel()
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, f"special token {s} got id {tok.token_to_id(s)}, expected {i}"
    tok.save(os.path.join(out_dir, HF_FILE))
    _write_transformers_files(out_dir)
    return tok.get_vocab_size()


def _write_transformers_files(out_dir: str) -> None:
    """Make the directory loadable by transformers.AutoTokenizer / PreTrainedTokenizerFast as is."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:-1]),
        # Literal "<|endoftext|>" etc. in ordinary text is text, as in HCXTokenizer.tokenize.
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_max_length": 1 << 20,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": ENDOFTEXT, "pad_token": PAD,
                   "additional_special_tokens": list(SPECIAL_TOKENS[1:-1])}, f, indent=2)


# ---------------------------------------------------------------- sentencepiece backend

def _spm_sentences(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
    """sentencepiece trains on 'sentences' (<= max_sentence_length bytes): feed lines."""
    n = 0
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
                n += 1
                if n >= max_sentences:
                    return


def _train_spm(texts: Iterable[str], cfg: TrainConfig, out_dir: str, stats: TrainStats) -> int:
    import sentencepiece as spm

    prefix = os.path.join(out_dir, "tokenizer")
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_spm_sentences(_marked_texts(texts, cfg, stats), cfg.spm_max_sentences),
        model_prefix=prefix,
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type,
        byte_fallback=True,  # unseen characters become <0xNN> pieces: never <unk>
        character_coverage=0.9995,
        normalization_rule_name="identity",  # no NFKC: decode(encode(s)) must return s
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pretokenization_delimiter=MORPHEME_DELIMITER if cfg.morpheme_split else "",
        control_symbols=list(SPECIAL_TOKENS),  # control symbols are never matched inside text
        unk_id=NUM_SPECIAL_TOKENS, bos_id=-1, eos_id=-1, pad_id=-1,
        unk_piece="<|unk|>",
        max_sentence_length=1 << 16,
        input_sentence_size=cfg.spm_max_sentences,
        shuffle_input_sentence=True,
        num_threads=cfg.spm_threads,
        minloglevel=0 if log.isEnabledFor(logging.DEBUG) else 2,
    )
    stats.train_seconds = time.perf_counter() - t0 - stats.segment_seconds
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    for i, s in enumerate(SPECIAL_TOKENS):
        assert sp.piece_to_id(s) == i, f"special token {s} got id {sp.piece_to_id(s)}, expected {i}"
    if os.path.exists(prefix + ".vocab"):
        os.remove(prefix + ".vocab")
    return sp.get_piece_size()


# ---------------------------------------------------------------- entry point

def train_tokenizer(texts: Iterable[str], output_dir: str, cfg: TrainConfig | None = None,
                    inputs: Sequence[str] = ()) -> dict:
    """Train and write a tokenizer directory (atomically: temp dir + rename). Returns its metadata."""
    cfg = cfg or TrainConfig()
    if cfg.backend not in ("hf", "sentencepiece"):
        raise ValueError(f"--backend must be hf or sentencepiece, got {cfg.backend!r}")
    if cfg.model_type not in ("bpe", "unigram"):
        raise ValueError(f"--model-type must be bpe or unigram, got {cfg.model_type!r}")
    if cfg.backend == "hf" and cfg.model_type != "bpe":
        raise ValueError("--backend hf supports only --model-type bpe")
    if cfg.vocab_size <= NUM_SPECIAL_TOKENS + 256:
        raise ValueError(f"--vocab-size must exceed {NUM_SPECIAL_TOKENS + 256} (special tokens + 256 bytes)")
    stats = TrainStats(inputs=list(inputs))
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=parent)
    try:
        if cfg.backend == "hf":
            vocab = _train_hf(texts, cfg, tmp, stats)
        else:
            try:
                vocab = _train_spm(texts, cfg, tmp, stats)
            except RuntimeError as e:  # sentencepiece reports a too-large vocabulary this way
                raise ValueError(f"sentencepiece training failed for --vocab-size {cfg.vocab_size}: {e}") from None
        if vocab < cfg.vocab_size:
            log.warning("--vocab-size %d requested, but the corpus supports only %d tokens at --min-frequency %d "
                        "(BPE ran out of pairs); using %d", cfg.vocab_size, vocab, cfg.min_frequency, vocab)
        if stats.docs == 0:
            raise ValueError("no training documents (check --input and --json-keys)")
        meta = {
            "format_version": FORMAT_VERSION,
            "backend": cfg.backend,
            "model_file": HF_FILE if cfg.backend == "hf" else SPM_FILE,
            "model_type": cfg.model_type,
            "vocab_size": vocab,
            "requested_vocab_size": cfg.vocab_size,
            "morpheme_split": cfg.morpheme_split,
            "special_tokens": {s: i for i, s in enumerate(SPECIAL_TOKENS)},
            "pretokenize_regex": PRETOKENIZE_REGEX if cfg.backend == "hf" else None,
            "training": {**asdict(stats), "config": asdict(cfg)},
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
