"""The infilling (fill-in-the-middle) training objective of Code Llama (paper §2.3).

Each document is split at character level at two uniformly random points into prefix / middle / suffix. With
probability ``rate`` (0.9) it is transformed, half of the time into PSM and half into SPM; otherwise it stays a
plain left-to-right document ``[bos] doc [eos]``. The transformed layouts are exactly the inference prompts of
``formats.infilling_tokens`` followed by the middle and ``EOT``, so the model learns the format it is asked in:

    PSM: [bos, PRE] enc(prefix) [SUF] enc_nospace(suffix) [MID] enc_nospace(middle) [EOT]
    SPM: [bos, PRE, SUF] enc_nospace(suffix) [MID] enc(prefix) enc_nospace(middle) [EOT]
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from ..formats import infilling_tokens
from ..tokenizer import Tokenizer

Mode = Literal["psm", "spm", "plain"]


@dataclass(frozen=True)
class FIMConfig:
    rate: float = 0.9  # fraction of documents transformed
    spm_rate: float = 0.5  # fraction of transformed documents in SPM (the rest PSM)


def split_document(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two uniform character positions in ``[0, len(text)]`` (middle may be empty)."""
    a, b = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    return text[:a], text[a:b], text[b:]


def choose_mode(rng: random.Random, config: FIMConfig) -> Mode:
    if rng.random() >= config.rate:
        return "plain"
    return "spm" if rng.random() < config.spm_rate else "psm"


def fim_example(tokenizer: Tokenizer, prefix: str, middle: str, suffix: str, mode: Mode) -> list[int]:
    """Training tokens for one split document: the inference prompt, then the middle and EOT."""
    if mode == "plain":
        return tokenizer.encode(prefix + middle + suffix, bos=True, eos=True)
    prompt = infilling_tokens(tokenizer, prefix, suffix, suffix_first=mode == "spm")
    return prompt + tokenizer.encode_infilling(middle) + [tokenizer.eot_id]


def transform(tokenizer: Tokenizer, text: str, rng: random.Random,
              config: FIMConfig = FIMConfig()) -> tuple[list[int], Mode]:
    """Tokens of one document under the FIM objective, and the mode drawn. Consumes ``rng`` identically for
    every mode (mode first, then the split), so a document's fate does not depend on its length."""
    mode = choose_mode(rng, config)
    prefix, middle, suffix = split_document(text, rng)
    if mode == "plain":
        return tokenizer.encode(text, bos=True, eos=True), mode
    return fim_example(tokenizer, prefix, middle, suffix, mode), mode


def document_rng(seed: int, index: int) -> random.Random:
    """An independent stream per (seed, document): results do not depend on processing order or workers."""
    return random.Random(f"fim:{seed}:{index}")
