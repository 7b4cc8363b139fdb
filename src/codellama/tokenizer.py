"""SentencePiece tokenizer with Code Llama's special pieces (FIM sentinels, 70B chat ``<step>``)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from .errors import CodeLlamaError

PREFIX_PIECE, SUFFIX_PIECE, MIDDLE_PIECE, EOT_PIECE = "▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"
STEP_PIECE = "<step>"


class Tokenizer:
    def __init__(self, model: str | Path | bytes):
        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_file():
                raise CodeLlamaError(f"tokenizer model not found: {path}")
            model = path.read_bytes()
            self.path: Path | None = path
        else:
            self.path = None
        self.model_proto = bytes(model)
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise CodeLlamaError(f"not a SentencePiece model ({self.path or 'bytes'}): {e}") from None
        # A second processor without the implicit leading space ("dummy prefix") encodes infilling text
        # exactly, for any vocabulary, instead of relying on a sentinel character being one piece.
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_nospace = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()
        self.prefix_id = self._special(PREFIX_PIECE)
        self.suffix_id = self._special(SUFFIX_PIECE)
        self.middle_id = self._special(MIDDLE_PIECE)
        self.eot_id = self._special(EOT_PIECE)
        self.step_id = self._special(STEP_PIECE)

    def _special(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    @property
    def supports_infilling(self) -> bool:
        return None not in (self.prefix_id, self.suffix_id, self.middle_id, self.eot_id)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end any generation: eos, and EOT / <step> where the vocabulary has them."""
        return [i for i in (self.eos_id, self.eot_id, self.step_id) if i is not None]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def encode_infilling(self, text: str) -> list[int]:
        """Encode without the implicit leading space, so ``"    return x"`` keeps exactly four spaces."""
        return self.sp_nospace.encode(text)

    def decode_infilling(self, ids: list[int]) -> str:
        """Decode without dropping a leading space (the middle of an infill starts mid-line)."""
        return self.sp_nospace.decode(list(ids))

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def __len__(self) -> int:
        return self.n_words
