"""Train a small SentencePiece BPE model with Code Llama's conventions (byte fallback, split digits,
whitespace pieces for indentation, bos=1/eos=2, FIM pieces)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from ..tokenizer import EOT_PIECE, MIDDLE_PIECE, PREFIX_PIECE, STEP_PIECE, SUFFIX_PIECE

FIM_PIECES = (PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE)


def train_tokenizer(texts: Iterable[str], output: str | Path, vocab_size: int = 4096, *,
                    fim: bool = True, step: bool = False, max_lines: int = 2_000_000) -> Path:
    """Write ``output`` (a ``.model`` file) trained on the lines of ``texts``; returns its path."""
    extra = list(FIM_PIECES if fim else ()) + ([STEP_PIECE] if step else [])

    def lines():
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_lines:
                        return

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=buffer, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=True,
        character_coverage=0.9999, max_sentence_length=16384, user_defined_symbols=extra,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
        train_extremely_large_corpus=False,
    )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buffer.getvalue())
    return output
