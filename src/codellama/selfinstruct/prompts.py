"""The pipeline's prompts: versioned text files (``prompts/<version>/<name>.txt``, package data) with
``string.Template`` placeholders (``$question``: code and questions are full of ``{}``, which ``str.format``
would choke on). Every record names the prompt, its version and the hash of its text, so a data set can be
traced to the exact wording that made it, and an edited file under the same version is noticed on resume."""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass
from pathlib import Path

from ..errors import CodeLlamaError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_VERSION = "v1"
NAMES = ("questions", "tests", "solutions")


@dataclass(frozen=True)
class Prompt:
    name: str
    version: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def provenance(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}

    def render(self, **fields: object) -> str:
        try:
            return string.Template(self.text).substitute({k: str(v) for k, v in fields.items()}).strip()
        except (KeyError, ValueError) as e:
            raise CodeLlamaError(f"prompt {self.name} ({self.version}) has a bad placeholder: {e}") from None


def prompts_dir(version: str = DEFAULT_VERSION, directory: str | Path | None = None) -> tuple[Path, str]:
    """Where the prompt files are and the version recorded for them: a bundled version, or a directory of
    your own (recorded as ``custom:<its name>``; the text hash tells two such directories apart)."""
    if directory is not None:
        d = Path(directory)
        if not d.is_dir():
            raise CodeLlamaError(f"prompts directory not found: {d}")
        return d, f"custom:{d.resolve().name}"
    d = PROMPTS_DIR / version
    if not d.is_dir():
        known = ", ".join(sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir()))
        raise CodeLlamaError(f"unknown prompt version {version!r} (bundled: {known})")
    return d, version


def load_prompt(name: str, version: str = DEFAULT_VERSION, directory: str | Path | None = None) -> Prompt:
    d, recorded = prompts_dir(version, directory)
    path = d / f"{name}.txt"
    if not path.is_file():
        raise CodeLlamaError(f"prompt file not found: {path}")
    return Prompt(name, recorded, path.read_text(encoding="utf-8"))


def load_topics(version: str = DEFAULT_VERSION, directory: str | Path | None = None) -> list[str]:
    """Subjects cycled through the question requests: asking every request for "programming questions" with
    only the seed differing gives far more near-duplicates than asking about a different subject each time."""
    d, _ = prompts_dir(version, directory)
    path = d / "topics.txt"
    if not path.is_file():
        return ["any subject"]
    topics = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return topics or ["any subject"]
