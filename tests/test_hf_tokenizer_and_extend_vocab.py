"""An imported open model trained with its own Hugging Face tokenizer, and tools/extend_vocab.py (issue 16 part 3).

The "open model" is built here without the hub: a byte-level BPE (vocab 1000) trained with `tokenizers` on the
English and code examples only (so it has no Korean merges; eos "</s>", no HCX special tokens), and a random
transformers LlamaForCausalLM over that vocabulary, imported with `from-hf` at TP2.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from test_convert import megatron_reference, run_cli
from torchrun_utils import REPO, pretrain, read_metrics

pytestmark = pytest.mark.dist  # starts processes

EXAMPLES = os.path.join(REPO, "examples", "data")
SHARED_KO = os.path.join(os.path.dirname(REPO), "shared", "corpus", "ko.jsonl")
OLD_DOMAIN = [os.path.join(EXAMPLES, "en.jsonl"), os.path.join(EXAMPLES, "code.jsonl")]
VOCAB = 1000
NEW_TOKENS = 300
PROTECTED = re.compile(r"[\uac00-\ud7ff]")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def texts_of(paths, max_docs=None) -> list[str]:
    from hcx_megatron.data.jsonl import iter_texts

    return [t for d in iter_texts(paths, max_docs=max_docs) for t in d.texts]


def write_hf_tokenizer(out: str, texts: list[str], vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(out)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hf_tok") / "tok")
    write_hf_tokenizer(out, texts_of(OLD_DOMAIN), VOCAB)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory, hf_tok) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                      initializer_range=0.05)
    root = tmp_path_factory.mktemp("open_model")
    hf = str(root / "hf")
    LlamaForCausalLM(cfg).save_pretrained(hf, safe_serialization=True)
    ckpt = str(root / "imported")
    run_cli("from-hf", "--load", hf, "--save", ckpt, "--target-tensor-parallel-size", "2",
            "--target-pipeline-parallel-size", "1")
    return ckpt


@pytest.fixture(scope="module")
def extended(tmp_path_factory, hf_tok, imported) -> dict:
    root = tmp_path_factory.mktemp("extended")
    out = {"tok": str(root / "tok_ko"), "ckpt": str(root / "ckpt_ko")}
    cmd = [sys.executable, os.path.join(REPO, "tools", "extend_vocab.py"), "--tokenizer-model", hf_tok,
           "--corpus", os.path.join(EXAMPLES, "ko.jsonl"), "--num-new-tokens", str(NEW_TOKENS),
           "--add-hcx-special-tokens", "--output-tokenizer", out["tok"], "--load", imported, "--save", out["ckpt"],
           "--vocab-multiple", "1024"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out["summary"] = json.loads(proc.stdout[proc.stdout.index("{"):])
    return out


# ------------------------------------------------------------------------------- HuggingFaceTokenizer semantics

def test_hf_tokenizer_semantics_and_clear_errors(hf_tok, tmp_path):
    from tokenizers import Tokenizer

    from hcx_megatron.data.chat import render_ids
    from hcx_megatron.tokenizer import build_tokenizer
    from hcx_megatron.tokenizer.hf_tokenizer import MissingSpecialTokenError

    tok = build_tokenizer("HuggingFaceTokenizer", hf_tok)
    raw = Tokenizer.from_file(os.path.join(hf_tok, "tokenizer.json"))
    assert tok.vocab_size == VOCAB and tok.eod == tok.eos == raw.token_to_id("</s>") and tok.pad == -1
    plain = "def f(x):\n    return x  # héllo"
    assert tok.tokenize(plain) == raw.encode(plain, add_special_tokens=False).ids
    text = plain + " <|user|> is text, </s> too"
    assert tok.eod not in tok.tokenize(text)  # a literal eos string is text, never the control id
    assert tok.detokenize(tok.tokenize(text)) == text
    assert tok.decode_bytes(tok.tokenize("héllo")) == "héllo".encode()
    with pytest.raises(MissingSpecialTokenError, match=r"<\|user\|>.*extend_vocab.py"):
        render_ids(tok, [{"role": "user", "content": "hi"}])
    with pytest.raises(MissingSpecialTokenError, match=r"<\|fim_prefix\|>"):
        tok.fim_prefix_id
    no_eos = tmp_path / "no_eos"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_text(open(os.path.join(hf_tok, "tokenizer.json")).read())
    with pytest.raises(ValueError, match="no eos_token"):
        build_tokenizer("HuggingFaceTokenizer", str(no_eos))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))


# ------------------------------------------------------------------------------- continued pretraining at TP2

@pytest.mark.timeout(900)
def test_imported_llama_trains_with_its_own_tokenizer_at_tp2(hf_tok, imported, tmp_path):
    prefix = str(tmp_path / "old")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", *OLD_DOMAIN,
         "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tok,
         "--append-eod", "--workers", "1"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = str(tmp_path / "m.jsonl")
    pretrain(["--model-config", os.path.join(imported, "model.yaml"), "--tensor-model-parallel-size", "2",
              "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_tok,
              "--data-path", prefix + "_text_document", "--split", "100,0,0", "--seq-length", "64",
              "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6", "--lr", "3e-3",
              "--lr-warmup-iters", "0", "--min-lr", "3e-3", "--load", imported, "--finetune",
              "--metrics-jsonl", metrics], nproc=2)
    records = read_metrics(metrics, kind=None)
    loads = [r for r in records if r.get("event") == "load"]
    assert loads and loads[0]["finetune"] is True
    losses = [r["lm_loss"] for r in records if r["kind"] == "train"]
    print(f"imported random Llama + its own tokenizer, TP2, lm loss per step: {[round(x, 3) for x in losses]}")
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[0] > math.log(VOCAB) * 0.8  # started from the random import, not from a trained model
    assert sum(losses[-2:]) / 2 < losses[0] - 0.1


# ------------------------------------------------------------------------------- extend_vocab: tokenizer

@pytest.mark.timeout(900)
def test_extended_tokenizer_keeps_old_text_and_shortens_korean(hf_tok, extended):
    from hcx_megatron.data.chat import render_ids
    from hcx_megatron.tokenizer.extend import check_merge_is_protected
    from hcx_megatron.tokenizer.hf_tokenizer import HuggingFaceTokenizer

    old, new = HuggingFaceTokenizer(hf_tok), HuggingFaceTokenizer(extended["tok"])
    info = extended["summary"]["tokenizer"]
    assert info["new_tokens"] == NEW_TOKENS and info["unreachable_tokens"] == 0 and info["morpheme_tokens"] > 20
    assert new.vocab_size == VOCAB + NEW_TOKENS + 9  # + the nine HCX control tokens (eod stays </s>)
    data = json.load(open(os.path.join(extended["tok"], "tokenizer.json")))
    merges = data["model"]["merges"][-info["new_merges"]:]
    assert all(check_merge_is_protected(a, b) for a, b in merges)
    # Old domain: every document without a U+AC00-U+D7FF character encodes to the same ids (the guarantee).
    old_docs = texts_of(OLD_DOMAIN)
    shared = os.path.dirname(SHARED_KO)
    if os.path.exists(shared):
        old_docs += texts_of([os.path.join(shared, "en.jsonl"), os.path.join(shared, "code.jsonl")], max_docs=300)
    plain = [t for t in old_docs if not PROTECTED.search(t)]
    assert len(plain) > (100 if os.path.exists(shared) else 40)  # the bundled slice alone holds 47
    assert [old.tokenize(t) for t in plain] == [new.tokenize(t) for t in plain]
    extras = ["naïve café – “quotes” 中文字符 日本語 😀 \u0000", "ꥠꥡ Yi ꀀ ꂀ ힰ is Jamo-B", "<|user|> </s>"]
    extras = [t for t in extras if not PROTECTED.search(t)]
    assert len(extras) == 2
    assert [old.tokenize(t) for t in extras] == [new.tokenize(t) for t in extras]
    # Korean: fewer tokens, still lossless.
    ko = texts_of([SHARED_KO if os.path.exists(SHARED_KO) else os.path.join(EXAMPLES, "ko.jsonl")], max_docs=100)
    n_old = sum(len(ids) for ids in old.tokenize_batch(ko))
    n_new = sum(len(ids) for ids in new.tokenize_batch(ko))
    print(f"Korean ({len(ko)} docs): {n_old} -> {n_new} tokens, ratio {n_new / n_old:.3f}")
    assert n_new < 0.75 * n_old
    assert all(new.detokenize(new.tokenize(t)) == t for t in ko[:50])
    # The HCX control tokens now exist (chat renders), and their literals in text are still text.
    chat = render_ids(new, [{"role": "user", "content": "안녕 <|assistant|>"}], add_generation_prompt=True)
    assert chat.ids[0] == new.special_id("user") and chat.ids[-1] == new.special_id("assistant")
    assert new.special_id("assistant") not in chat.ids[1:-1] and new.special_id("user") >= VOCAB + NEW_TOKENS


# ------------------------------------------------------------------------------- extend_vocab: checkpoint

@pytest.mark.timeout(900)
def test_extended_checkpoint_keeps_old_logits_at_tp1_and_tp2(imported, extended, tmp_path):
    from hcx_megatron.convert.dist_reader import DistCheckpointReader

    new_vocab = VOCAB + NEW_TOKENS + 9
    r_old, r_new = DistCheckpointReader(imported), DistCheckpointReader(extended["ckpt"])
    assert r_new.config["model"]["vocab_size"] == 2048  # rounded to --vocab-multiple 1024: same rows at TP1/TP2
    emb_old, emb_new = r_old.read("embedding.word_embeddings.weight"), r_new.read("embedding.word_embeddings.weight")
    out_old, out_new = r_old.read("output_layer.weight"), r_new.read("output_layer.weight")
    assert emb_new.shape[0] == 2048 and torch.equal(emb_new[:VOCAB], emb_old[:VOCAB])
    assert torch.equal(out_new[:VOCAB], out_old[:VOCAB])
    assert torch.allclose(emb_new[VOCAB:new_vocab], emb_old[:VOCAB].mean(0).expand(new_vocab - VOCAB, -1))
    assert torch.allclose(out_new[VOCAB:], out_old[:VOCAB].mean(0).expand(2048 - VOCAB, -1))
    key = "decoder.layers.self_attention.linear_qkv.weight"
    assert torch.equal(r_old.read(key), r_new.read(key))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (7, 20)]
    for tp in (1, 2):
        for d in (f"old{tp}", f"new{tp}"):
            (tmp_path / d).mkdir()
        ref = megatron_reference(imported, prompts, tmp_path / f"old{tp}", tp=tp)
        got = megatron_reference(extended["ckpt"], prompts, tmp_path / f"new{tp}", tp=tp)
        worst = max((a - b[:, :VOCAB]).abs().max().item() for a, b in zip(ref["logits"], got["logits"]))
        print(f"TP{tp}: max |old logits - extended logits| on old token ids = {worst:.3e}")
        assert all(b.shape[-1] == 2048 for b in got["logits"]) and worst <= 1e-5
