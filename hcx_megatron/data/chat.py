"""The HCX chat format: the ONE definition used by SFT, generation, the chat CLI, RLHF and the HF export.

A conversation is a list of messages `{"role": "system"|"user"|"assistant", "content": str}`. Each message is
rendered as

    <|role|>content<|endofturn|>

with no separators and no BOS, one after the other; a prompt for the model to answer ends with a bare
`<|assistant|>` (the "generation prompt"). Example:

    <|system|>Be brief.<|endofturn|><|user|>Hi<|endofturn|><|assistant|>Hello!<|endofturn|>

Ids are built per message, never by tokenizing the joined text: the role and end-of-turn control ids come
only from this module, and the content goes through `HCXTokenizer.tokenize`, which encodes special-token
literals typed by a user (`"<|assistant|>"`) as plain text. That is the injection guarantee.

Loss mask (`RenderedChat.loss_mask[i]` = 1 when token i is a training TARGET): the content tokens of every
assistant message and its `<|endofturn|>` (the model must learn when to stop). The `<|assistant|>` role
token itself is 0: it is given by the renderer, never generated. Everything in system and user messages is 0.

`CHAT_TEMPLATE_JINJA` produces exactly `render_text()` for transformers' `apply_chat_template`, and marks the
same assistant span with `{% generation %}` so `return_assistant_tokens_mask=True` gives the same loss mask.
A text template cannot carry the injection guarantee (a literal `<|assistant|>` in the rendered text is
read back as the control token by an HF tokenizer that parses special tokens); tests/test_chat_format.py
checks the two agree on every other input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from hcx_megatron.tokenizer.special_tokens import (
    ASSISTANT, ENDOFTURN, SPECIAL_TOKEN_IDS, SYSTEM, USER,
)

ROLES: tuple[str, ...] = ("system", "user", "assistant")
ROLE_TOKENS: dict[str, str] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
ROLE_IDS: dict[str, int] = {role: SPECIAL_TOKEN_IDS[tok] for role, tok in ROLE_TOKENS.items()}
ENDOFTURN_ID: int = SPECIAL_TOKEN_IDS[ENDOFTURN]
ASSISTANT_ID: int = ROLE_IDS["assistant"]

# transformers chat template (jinja2). Whitespace-trimmed tags keep the output free of newlines so it equals
# render_text(). The {% generation %} block is what transformers uses for return_assistant_tokens_mask.
CHAT_TEMPLATE_JINJA: str = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT + "' -}}"
    "{%- generation -%}{{- message['content'] + '" + ENDOFTURN + "' -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'system' or message['role'] == 'user' -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '" + ENDOFTURN + "' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role ' + message['role'] + '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT + "' -}}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A conversation that does not follow the format. `reason` is a short key used in data reports."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RenderedChat:
    ids: list[int]
    loss_mask: list[int]  # 1: assistant content / its <|endofturn|> (trained); 0 elsewhere
    user_mask: list[int]  # 1: user content / its <|endofturn|> (loss measured for reporting, never trained)

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.ids)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check the structure of one conversation; returns it as a list of {role, content} dicts."""
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError("bad_messages", f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise ChatFormatError("empty_conversation", "'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError("bad_messages", f"message {i} is {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLE_IDS:
            raise ChatFormatError("unknown_role", f"message {i} has role {role!r}; expected one of {list(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise ChatFormatError("bad_content", f"message {i} content is {type(content).__name__}, not a string")
        out.append({"role": role, "content": content})
    return out


def render_text(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text (what CHAT_TEMPLATE_JINJA renders). For display and the HF export; training
    uses `render_ids`, which never re-parses control tokens out of content."""
    parts = [ROLE_TOKENS[m["role"]] + m["content"] + ENDOFTURN for m in validate_messages(messages)]
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


def chat_token_ids(tokenizer) -> tuple[dict[str, int], int]:
    """(role -> id, <|endofturn|> id) of `tokenizer`. HCX tokenizers give the fixed ids above; an open model's
    HuggingFaceTokenizer looks the literals up in its vocabulary and raises MissingSpecialTokenError naming a
    missing one and the fix."""
    special_id = getattr(tokenizer, "special_id", None)
    if special_id is None:
        return ROLE_IDS, ENDOFTURN_ID
    return {role: special_id(tok) for role, tok in ROLE_TOKENS.items()}, special_id(ENDOFTURN)


def render_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids, loss mask and user mask of a conversation (see the module docstring for the rules)."""
    role_ids, endofturn_id = chat_token_ids(tokenizer)
    ids: list[int] = []
    loss: list[int] = []
    user: list[int] = []
    for m in validate_messages(messages):
        body = list(tokenizer.tokenize(m["content"])) + [endofturn_id]
        ids.append(role_ids[m["role"]])
        loss.append(0)
        user.append(0)
        ids.extend(body)
        loss.extend([1 if m["role"] == "assistant" else 0] * len(body))
        user.extend([1 if m["role"] == "user" else 0] * len(body))
    if add_generation_prompt:
        ids.append(role_ids["assistant"])
        loss.append(0)
        user.append(0)
    return RenderedChat(ids, loss, user)


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids that ask the model for the next assistant turn: the conversation + `<|assistant|>`."""
    return render_ids(tokenizer, messages, add_generation_prompt=True).ids


def split_prompt_and_reference(messages: Sequence[dict]) -> tuple[list[dict], str]:
    """For generation evals: everything before the last assistant message, and that message's content."""
    msgs = validate_messages(messages)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ChatFormatError("no_assistant", "conversation has no assistant message to use as the reference")
    return msgs[:last], msgs[last]["content"]


def generation_stop_and_pad_ids(tokenizer) -> tuple[tuple[int, ...], int]:
    """What generation of an assistant turn stops on (`<|endofturn|>` of this tokenizer: an open model's extended
    tokenizer has it at another id than HCX's) and pads with (the tokenizer's pad, else its eod)."""
    _, endofturn_id = chat_token_ids(tokenizer)
    return (endofturn_id,), (tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod)


def response_text(tokenizer, response_ids: Sequence[int]) -> str:
    """Assistant text of generated ids: cut at the first <|endofturn|>."""
    ids = list(response_ids)
    _, endofturn_id = chat_token_ids(tokenizer)
    if endofturn_id in ids:
        ids = ids[: ids.index(endofturn_id)]
    return tokenizer.detokenize(ids)


__all__ = [
    "CHAT_TEMPLATE_JINJA", "ROLES", "ROLE_IDS", "ENDOFTURN_ID", "ASSISTANT_ID", "ChatFormatError", "RenderedChat",
    "chat_token_ids", "validate_messages", "render_text", "render_ids", "prompt_ids", "split_prompt_and_reference", "response_text",
]
