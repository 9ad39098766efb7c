"""HF tokenizer files for an exported model: tokenizer.json (copied), tokenizer_config.json with the HCX special
tokens and the chat template, special_tokens_map.json, chat_template.jinja.

The chat template is the canonical one from hcx_megatron.data.chat (CHAT_TEMPLATE_JINJA) when that module
provides it; otherwise the fallback below, which renders the same `<|role|>content<|endofturn|>` format.

Special tokens: `split_special_tokens` is False in the exported config, so `<|user|>` etc. in a string given to
the HF tokenizer become control ids. That is what `apply_chat_template` needs (it renders text, then
tokenizes it). HCXTokenizer.tokenize keeps such literals as text; the two agree on any text without special
literals, and HF equals HCXTokenizer.tokenize_with_special on every text.
"""

from __future__ import annotations

import json
import os
import shutil

from hcx_megatron.tokenizer.special_tokens import ENDOFTEXT, ENDOFTURN, PAD, SPECIAL_TOKENS

# Same format as hcx_megatron.data.chat; used only when that module has no CHAT_TEMPLATE_JINJA.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['system', 'user', 'assistant'] -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '" + ENDOFTURN + "' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role ' + message['role'] + '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def chat_template() -> tuple[str, str]:
    """(template, source module)."""
    try:
        from hcx_megatron.data.chat import CHAT_TEMPLATE_JINJA

        return CHAT_TEMPLATE_JINJA, "hcx_megatron.data.chat"
    except ImportError:
        return FALLBACK_CHAT_TEMPLATE, "hcx_megatron.convert.tokenizer_export (fallback)"


def export_tokenizer(tokenizer_dir: str, out_dir: str, model_vocab_size: int) -> dict:
    """Write the HF tokenizer files of `tokenizer_dir` (written by tools/train_tokenizer.py) into out_dir."""
    from hcx_megatron.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)  # validates the directory and the fixed special-token ids
    if tok.vocab_size > model_vocab_size:
        raise ValueError(f"--tokenizer-model {tokenizer_dir}: vocabulary of {tok.vocab_size} tokens exceeds the "
                         f"model's vocab_size {model_vocab_size} (ids past {model_vocab_size - 1} have no "
                         "embedding); use the tokenizer the model was trained with")
    if tok.backend != "hf":
        raise ValueError(f"--tokenizer-model {tokenizer_dir}: the {tok.backend} backend has no tokenizer.json; "
                         "HF export supports tokenizers trained with --backend hf")
    shutil.copyfile(os.path.join(tokenizer_dir, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    template, source = chat_template()
    extra = list(SPECIAL_TOKENS[1:-1])  # all but <|endoftext|> (eos) and <|pad|> (pad)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": extra,
        "extra_special_tokens": extra,
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "model_max_length": 1 << 20,
        "chat_template": template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": ENDOFTEXT, "pad_token": PAD, "additional_special_tokens": extra}, f, indent=2)
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    return {"vocab_size": tok.vocab_size, "chat_template_source": source}
