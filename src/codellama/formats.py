"""Prompt layouts at token level: infilling (PSM / SPM) and the two chat formats of Code Llama - Instruct."""

from __future__ import annotations

from typing import Mapping, Sequence

from .errors import CodeLlamaError
from .tokenizer import Tokenizer

Message = Mapping[str, str]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>", "<step>")


def infilling_tokens(tokenizer: Tokenizer, prefix: str, suffix: str, suffix_first: bool = False,
                     model_name: str = "") -> list[int]:
    """PSM: ``[bos, PRE] prefix [SUF] suffix [MID]``; SPM: ``[bos, PRE, SUF] suffix [MID] prefix``.

    The suffix is encoded without the implicit leading space; the prefix keeps it, as in Meta's reference."""
    require_infilling(tokenizer, model_name)
    t = tokenizer
    if suffix_first:
        return [t.bos_id, t.prefix_id, t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id] + t.encode(prefix)
    return [t.bos_id, t.prefix_id] + t.encode(prefix) + [t.suffix_id] + t.encode_infilling(suffix) + [t.middle_id]


def banned_ids(tokenizer: Tokenizer, kind: str) -> tuple[int, ...]:
    """Pieces a model must never write in a request of ``kind`` ("complete", "chat" or "infill"): the FIM
    sentinels are layout markers, not text. Plain completion and chat ban all four; infilling bans
    ``PRE``/``SUF``/``MID`` but keeps ``EOT``, which ends the middle. bos/eos are left to the model, as in HF."""
    if kind not in ("complete", "chat", "infill"):
        raise ValueError(f"unknown request kind {kind!r}")
    t = tokenizer
    sentinels = (t.prefix_id, t.suffix_id, t.middle_id) + (() if kind == "infill" else (t.eot_id,))
    return tuple(i for i in sentinels if i is not None)


def require_infilling(tokenizer: Tokenizer, model_name: str = "") -> None:
    if not tokenizer.supports_infilling:
        who = f"model {model_name!r}" if model_name else "this model"
        raise CodeLlamaError(f"{who} cannot infill: its tokenizer has no FIM pieces "
                             "(▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>); 34B and Python variants were not trained for infilling")


def chat_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """The prompt for the next assistant reply, in the format the tokenizer implies (as Meta's reference picks it)."""
    if tokenizer.step_id is not None:
        return step_chat_tokens(tokenizer, dialog)
    return inst_chat_tokens(tokenizer, dialog)


def _check_messages(dialog: Sequence[Message]) -> None:
    if not dialog:
        raise CodeLlamaError("chat needs at least one message")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise CodeLlamaError(f"message {i} must be a mapping with 'role' and 'content'")
        if not isinstance(msg["content"], str):
            raise CodeLlamaError(f"message {i}: content must be a string")
        for tag in SPECIAL_TAGS:
            if tag in msg["content"]:
                raise CodeLlamaError(f"message {i} ({msg['role']}) contains the special tag {tag!r}; refusing to format it")
    if dialog[-1]["role"] != "user":
        raise CodeLlamaError(f"the last message must be from the user, got {dialog[-1]['role']!r}")


def inst_chat_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """Llama 2 chat: ``bos [INST] user [/INST] answer eos`` per exchange; system folded into the first user turn."""
    _check_messages(dialog)
    messages = [dict(m) for m in dialog]
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise CodeLlamaError("a system message must be followed by a user message")
        messages = [{"role": messages[1]["role"],
                     "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}] + messages[2:]
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise CodeLlamaError(f"roles must alternate user/assistant (after an optional system), "
                                 f"got {msg['role']!r} at turn {i}")
    tokens: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                   bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True)
    return tokens


def step_chat_tokens(tokenizer: Tokenizer, dialog: Sequence[Message]) -> list[int]:
    """70B-Instruct: ``bos`` then `` Source: role[\\nDestination: d]`` + ``\\n\\n content`` + ``<step>`` per message,
    then the reply header. An empty system message is inserted when none is given; empty contents add no body
    (as in Meta's reference)."""
    if tokenizer.step_id is None:
        raise CodeLlamaError("this tokenizer has no <step> piece: it is not a 70B-Instruct tokenizer")
    _check_messages(dialog)
    messages = list(dialog)
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": ""}] + messages
    for i, msg in enumerate(messages[1:]):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise CodeLlamaError("roles must be system, then user and assistant alternating, "
                                 f"got {msg['role']!r} at turn {i + 1}")
    tokens = [tokenizer.bos_id]
    for msg in messages:
        header = f" Source: {msg['role'].strip()}"
        if msg.get("destination") is not None:
            header += f"\nDestination: {msg['destination'].strip()}"
        tokens += tokenizer.encode(header)
        if msg["content"]:
            tokens += tokenizer.encode("\n\n " + msg["content"].strip())
        tokens.append(tokenizer.step_id)
    tokens += tokenizer.encode(" Source: assistant\nDestination: user")
    tokens += tokenizer.encode("\n\n ")
    return tokens
