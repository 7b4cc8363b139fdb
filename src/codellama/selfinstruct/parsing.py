"""Turning model replies into questions, tests and solutions, and refusing what cannot be used. A rejection
always says why (it goes into the stage file), so a bad prompt or model shows up as a reason count."""

from __future__ import annotations

import ast
import builtins
import re
from dataclasses import dataclass

from ..formats import SPECIAL_TAGS

_ITEM = re.compile(r"^\s*(?:\d{1,4}\s*[.):]|[-*\u2022]|Q\d{1,4}\s*[.):])\s+(.*\S)\s*$")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = re.compile(r"\[PYTHON\]\s*\n?(.*?)(?:\[/PYTHON\]|\Z)", re.S)
MIN_QUESTION_WORDS = 5
MAX_QUESTION_CHARS = 2000


def parse_questions(reply: str, limit: int) -> list[str]:
    """The items of a numbered or bulleted list, at most ``limit``; an item's continuation lines (indented or
    not, up to the next item or a blank line) belong to it. Items too short to be a question, too long, or
    holding a chat-format tag (the chat template refuses those) are dropped."""
    items: list[list[str]] = []
    open_item = False
    for line in reply.splitlines():
        m = _ITEM.match(line)
        if m:
            items.append([m.group(1)])
            open_item = True
        elif not line.strip():
            open_item = False
        elif open_item:
            items[-1].append(line.strip())
    out = []
    for parts in items:
        q = " ".join(parts).strip()
        q = re.sub(r"^\*\*(.*?)\*\*:?\s*", r"\1 ", q).strip()  # "**Title**: text" from markdown-happy models
        if (len(re.findall(r"[A-Za-z]+", q)) < MIN_QUESTION_WORDS or len(q) > MAX_QUESTION_CHARS
                or any(tag in q for tag in SPECIAL_TAGS)):
            continue
        out.append(q)
        if len(out) >= limit:
            break
    return out


def fenced_blocks(reply: str) -> list[str]:
    """Fenced code blocks labelled python / py or not labelled (an unclosed last block counts: the reply
    may have hit the token limit after the code)."""
    return [body for lang, body in _FENCE.findall(reply) if lang.lower() in ("", "python", "py", "python3")]


@dataclass
class Parsed:
    code: str | None
    reason: str = ""  # why ``code`` is None

    @property
    def ok(self) -> bool:
        return self.code is not None


def parse_tests(reply: str) -> Parsed:
    """The first python block holding at least one top-level ``assert``; it must parse, and must not define
    the function its asserts call (a block that does would let every solution pass)."""
    blocks = fenced_blocks(reply)
    if not blocks:
        return Parsed(None, "no python block")
    reason = "no assert statements"
    for block in blocks:
        code = block.strip("\n")
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError):
            reason = "does not parse" if "assert" in code else reason
            continue
        asserts = [n for n in tree.body if isinstance(n, ast.Assert)]
        if not asserts:
            continue
        called = {n.func.id for a in asserts for n in ast.walk(a)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        if called & defined:
            return Parsed(None, f"the tests define {sorted(called & defined)[0]} themselves")
        if not called - _BUILTINS:
            return Parsed(None, "the asserts call no function")
        return Parsed(code)
    return Parsed(None, reason)


_BUILTINS = set(dir(builtins))  # asserts that only call len() / sorted() test nothing of the solution


def first_assert(tests: str) -> str:
    """The first assert of a test block, shown to the solution model so it uses the tests' function name and
    signature (without it most solutions fail on a name mismatch, not on their logic)."""
    tree = ast.parse(tests)
    for node in tree.body:
        if isinstance(node, ast.Assert):
            return ast.get_source_segment(tests, node) or ast.unparse(node)
    return ""


def test_names(tests: str) -> set[str]:
    tree = ast.parse(tests)
    return {n.func.id for a in tree.body if isinstance(a, ast.Assert) for n in ast.walk(a)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)} - _BUILTINS


def parse_solution(reply: str) -> Parsed:
    """The code between [PYTHON] and [/PYTHON] (Code Llama - Instruct's own answer format), else the first
    python block; it must parse and be more than whitespace."""
    m = _PYTHON_TAGS.search(reply)
    if m:
        code = m.group(1)
    else:
        blocks = fenced_blocks(reply)
        if not blocks:
            return Parsed(None, "no [PYTHON] tags or python block")
        code = blocks[0]
    code = code.strip("\n")
    if not code.strip():
        return Parsed(None, "empty code")
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return Parsed(None, "does not parse")
    return Parsed(code)
