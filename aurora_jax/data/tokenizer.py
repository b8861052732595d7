"""Tokenizers from a checkpoint directory: tokenizer.json (Hugging Face `tokenizers`) or
tokenizer.model (SentencePiece), behind one small interface."""

from __future__ import annotations

import json
from pathlib import Path

from aurora_jax.errors import CheckpointError


class Tokenizer:
    """encode/decode plus the special ids the engine needs."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: tuple[int, ...],
                 pad_id: int | None, add_bos: bool):
        self._b = backend
        self.kind = kind
        self.bos_id, self.eos_ids, self.pad_id = bos_id, eos_ids, pad_id
        self._add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self._b.get_vocab_size() if self.kind == "hf" else self._b.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids as the model expects them (bos added where the tokenizer adds one)."""
        if self.kind == "hf":
            return list(self._b.encode(text, add_special_tokens=True).ids)
        ids = list(self._b.encode(text))
        return ([self.bos_id] + ids) if self._add_bos and self.bos_id is not None else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._b.decode(ids, skip_special_tokens=True)
        return self._b.decode(ids)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a directory holding tokenizer.json or tokenizer.model (or either file)."""
        path = Path(path)
        d = path if path.is_dir() else path.parent
        if path.is_dir():
            candidates = [d / "tokenizer.json", d / "tokenizer.model"]
            found = [c for c in candidates if c.is_file()]
            if not found:
                raise CheckpointError(f"no tokenizer.json or tokenizer.model in {d}")
            path = found[0]
        elif not path.is_file():
            raise CheckpointError(f"tokenizer file does not exist: {path}")
        special = _special_tokens(d)
        if path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                backend = HFTokenizer.from_file(str(path))
            except Exception as e:  # the library raises a bare Exception on bad files
                raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from e

            def tid(tok):
                return None if tok is None else backend.token_to_id(tok)

            bos = tid(special["bos"]) if special["bos"] else special["bos_id"]
            eos = tid(special["eos"]) if special["eos"] else None
            eos_ids = (eos,) if eos is not None else special["eos_ids"]
            pad = tid(special["pad"]) if special["pad"] else special["pad_id"]
            return cls(backend, "hf", bos, tuple(eos_ids), pad, add_bos=False)
        import sentencepiece as spm

        try:
            backend = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load SentencePiece model ({e})") from e

        def opt(i):
            return None if i < 0 else i

        eos = opt(backend.eos_id())
        return cls(backend, "sp", opt(backend.bos_id()), (eos,) if eos is not None else (),
                   opt(backend.pad_id()), add_bos=True)


def _special_tokens(d: Path) -> dict:
    """Special token strings from tokenizer_config.json, ids from config.json as fallback."""
    out = {"bos": None, "eos": None, "pad": None, "bos_id": None, "eos_ids": (), "pad_id": None}
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        raw = json.loads(tc.read_text())
        for k in ("bos", "eos", "pad"):
            tok = raw.get(f"{k}_token")
            out[k] = tok.get("content") if isinstance(tok, dict) else tok
    cfg = d / "config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text())
        eos = raw.get("eos_token_id")
        out["eos_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        out["bos_id"], out["pad_id"] = raw.get("bos_token_id"), raw.get("pad_token_id")
    return out
