"""Question deduplication: exact (the same text after normalising case, whitespace and punctuation) and near
(Jaccard similarity of word shingles at or above a threshold; the shingles are made of content words, see
``STOP_WORDS``).

Near duplicates are found with MinHash signatures and LSH banding, then every candidate pair is confirmed with
the exact Jaccard similarity of the two shingle sets, so the decision is exact and MinHash only decides which
pairs get compared (no false positives from estimation noise; a false negative needs a pair at the threshold to
share no band, which the band shape keeps below 1%). A small numpy MinHash rather than ``datasketch``: numpy
is already a dependency, the whole thing is ~60 lines with exact 64-bit arithmetic and no new package (and
its SciPy) to install for one stage; at the paper's 62,000 questions it takes seconds.

Questions are taken in order and each is compared with the questions kept so far: the earliest of a group of
paraphrases is kept, and growing the set later (a larger ``--count``) never removes a question kept before."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

import numpy as np

_PRIME = np.uint64(4294967311)  # the smallest prime above 2**32: (a*h + b) of 32-bit values fits in uint64


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


# Words that every question shares ("Write a Python function that takes ... and returns ...") or that carry no
# task: in questions of 15-30 words they dominate the shingles, so that paraphrases look different (each
# reworded connective breaks several shingles) and unrelated questions look alike. On the fixture set
# (tests/fixtures/selfinstruct) word bigrams with them kept put paraphrases at Jaccard 0.52-0.79 and distinct
# questions up to 0.64 (no threshold separates them); content-word unigrams put paraphrases at >= 0.64 and
# distinct questions at <= 0.43.
STOP_WORDS = frozenset("""a an the this that these those which who whom whose what is are was were be been being
of to in on at by for with from into onto as and or nor but if then than so it its it's their there here
given write python function program method code returns return returning takes take taking accepts accept
should must will would can could please implement create define make using use""".split())


def content_words(text: str) -> list[str]:
    return [w for w in normalise(text).split() if w not in STOP_WORDS]


def shingles(text: str, k: int) -> set[str]:
    words = content_words(text) or normalise(text).split()
    if len(words) <= k:
        return {" ".join(words)}
    return {" ".join(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def band_shape(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest needless candidates) such that a pair exactly at the
    threshold still becomes a candidate with probability >= 0.99."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= 0.99:
            best = (bands, rows)
    return best


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**32, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64)

    def signature(self, items: set[str]) -> np.ndarray:
        h = np.array([int.from_bytes(hashlib.blake2b(s.encode(), digest_size=4).digest(), "little")
                      for s in sorted(items)], dtype=np.uint64)
        return ((np.outer(h, self.a) + self.b) % _PRIME).min(axis=0)


@dataclass
class DedupResult:
    kept: list[int]
    removed: list[dict] = field(default_factory=list)  # {"index", "duplicate_of", "kind", "jaccard"}
    bands: int = 0
    rows: int = 0


def deduplicate(texts: list[str], threshold: float = 0.55, shingle: int = 1, num_perm: int = 128,
                seed: int = 1) -> DedupResult:
    """Indices of the questions to keep, and for every removed one the kept question it duplicates."""
    bands, rows = band_shape(num_perm, threshold)
    hasher = MinHasher(num_perm, seed)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    exact: dict[str, int] = {}
    sets: dict[int, set[str]] = {}
    result = DedupResult([], bands=bands, rows=rows)
    for i, text in enumerate(texts):
        norm = normalise(text)
        if norm in exact:
            result.removed.append({"index": i, "duplicate_of": exact[norm], "kind": "exact", "jaccard": 1.0})
            continue
        sh = shingles(text, shingle)
        sig = hasher.signature(sh)
        keys = [sig[b * rows:(b + 1) * rows].tobytes() for b in range(bands)]
        candidates = sorted({j for b, key in enumerate(keys) for j in buckets[b].get(key, ())})
        best, best_j = None, 0.0
        for j in candidates:  # confirm exactly: MinHash only picked who to compare with
            sim = jaccard(sh, sets[j])
            if sim >= threshold and sim > best_j:
                best, best_j = j, sim
        if best is not None:
            result.removed.append({"index": i, "duplicate_of": best, "kind": "near", "jaccard": round(best_j, 4)})
            continue
        exact[norm] = i
        sets[i] = sh
        for b, key in enumerate(keys):
            buckets[b].setdefault(key, []).append(i)
        result.kept.append(i)
    return result
