"""Special tokens of the HCX vocabulary. Their ids are FIXED (0..9) in every tokenizer we train, so
datasets, FIM, chat rendering and checkpoints agree without consulting the tokenizer file."""

from __future__ import annotations

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
ENDOFTURN = "<|endofturn|>"
PAD = "<|pad|>"

# Order == id. Never reorder: existing datasets and checkpoints depend on these ids.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, SYSTEM, USER, ASSISTANT, ENDOFTURN, PAD,
)

# Short names used by HCXTokenizer.special_id(name); the full literal string is accepted as well.
SPECIAL_TOKEN_NAMES: dict[str, str] = {
    "endoftext": ENDOFTEXT,
    "eod": ENDOFTEXT,
    "fim_prefix": FIM_PREFIX,
    "fim_middle": FIM_MIDDLE,
    "fim_suffix": FIM_SUFFIX,
    "fim_pad": FIM_PAD,
    "system": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
    "endofturn": ENDOFTURN,
    "pad": PAD,
}

SPECIAL_TOKEN_IDS: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)


def special_token_id(name: str) -> int:
    """Id of a special token given its short name ("fim_prefix") or literal ("<|fim_prefix|>")."""
    literal = SPECIAL_TOKEN_NAMES.get(name, name)
    try:
        return SPECIAL_TOKEN_IDS[literal]
    except KeyError:
        raise KeyError(f"unknown special token {name!r}; known: {sorted(SPECIAL_TOKEN_NAMES)}") from None
