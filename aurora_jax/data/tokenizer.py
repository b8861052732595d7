"""Tokenizers from a checkpoint: tokenizer.json (Hugging Face `tokenizers`), tokenizer.model
(SentencePiece) or a GGUF file's metadata, behind one small interface, with the model's chat
template for instruct targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aurora_jax.errors import CheckpointError, PromptError


class Tokenizer:
    """encode/decode plus the special ids the engine needs."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: tuple[int, ...],
                 pad_id: int | None, add_bos: bool, chat_template: str | None = None):
        self._b = backend
        self.kind = kind
        self.bos_id, self.eos_ids, self.pad_id = bos_id, eos_ids, pad_id
        self._add_bos = add_bos
        self.chat_template = chat_template
        """The Jinja template that turns chat messages into the model's prompt text."""

    @property
    def vocab_size(self) -> int:
        return self._b.get_vocab_size() if self.kind == "hf" else self._b.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids as the model expects them (bos added where the tokenizer adds one)."""
        if self.kind == "hf":
            return list(self._b.encode(text, add_special_tokens=True).ids)
        ids = list(self._b.encode(text))
        return ([self.bos_id] + ids) if self._add_bos and self.bos_id is not None else ids

    def stop_ids(self, model_eos: tuple[int, ...]) -> tuple[int, ...]:
        """The tokens that end a generation: the model config's, then the tokenizer's own end
        tokens (an instruct model's end-of-turn), each once."""
        return tuple(dict.fromkeys(tuple(model_eos) + self.eos_ids))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of chat `messages` ([{"role", "content"}, ...]) under the model's chat
        template, ending with the assistant's turn opened (the generation prompt)."""
        if not self.chat_template:
            raise PromptError("this model has no chat template; send a plain prompt instead")
        text = render_chat(self.chat_template, messages, bos=self._token(self.bos_id),
                           eos=self._token(self.eos_ids[0] if self.eos_ids else None))
        if self.kind == "hf":  # the template writes any bos itself
            return list(self._b.encode(text, add_special_tokens=False).ids)
        return list(self._b.encode(text))

    def chat_turn(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of one user turn (the text cut to `max_tokens` tokens first) under the chat
        template, with the assistant's turn opened."""
        if max_tokens is not None:
            ids = self.encode(text)
            ids = ids[1:] if self._starts_with_bos(ids) else ids
            text = self.decode(ids[:max_tokens])
        return self.encode_chat([{"role": "user", "content": text}])

    def _starts_with_bos(self, ids: list[int]) -> bool:
        return bool(ids) and self.bos_id is not None and ids[0] == self.bos_id

    def _token(self, i: int | None) -> str:
        if i is None:
            return ""
        return self._b.id_to_token(i) if self.kind == "hf" else self._b.id_to_piece(i)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self._b.decode(ids, skip_special_tokens=True)
        return self._b.decode(ids)

    @staticmethod
    def present(path: str | Path) -> bool:
        """Whether `load(path)` finds a tokenizer (a learner, which reads no text, runs
        without one)."""
        path = Path(path)
        if path.is_dir():
            return any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
        return path.is_file()

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a directory holding tokenizer.json or tokenizer.model (or either file), or from
        a GGUF file's metadata."""
        path = Path(path)
        if path.suffix.lower() == ".gguf":
            return cls.from_gguf(path)
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
            eos_ids = ((eos,) if eos is not None else ()) + special["eos_ids"]
            pad = tid(special["pad"]) if special["pad"] else special["pad_id"]
            return cls(backend, "hf", bos, tuple(dict.fromkeys(eos_ids)), pad, add_bos=False,
                       chat_template=special["chat_template"])
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load SentencePiece model ({e})") from e

        def opt(i):
            return None if i < 0 else i

        eos = opt(sp.eos_id())
        return cls(sp, "sp", opt(sp.bos_id()), (eos,) if eos is not None else (),
                   opt(sp.pad_id()), add_bos=True, chat_template=special["chat_template"])

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The byte-level BPE tokenizer a GGUF file describes in its metadata."""
        from aurora_jax.models.gguf_io import GGUFCheckpoint

        spec = GGUFCheckpoint(path).tokenizer_spec()
        return cls(spec.build(), "hf", spec.bos_id, spec.eos_ids, spec.pad_id, add_bos=False,
                   chat_template=spec.chat_template)


def render_chat(template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """A chat template rendered the way transformers does: Jinja in a sandbox, trimmed blocks,
    with `messages`, `add_generation_prompt=True`, `bos_token` and `eos_token`."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    bad = [m for m in messages if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str))]
    if not messages or bad:
        raise PromptError('chat messages must be a non-empty list of {"role": str, '
                          '"content": str} objects')

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except TemplateError as e:
        raise PromptError(f"the chat template refused these messages: {e}") from e


def _special_tokens(d: Path) -> dict:
    """Special token strings from tokenizer_config.json, ids from config.json as fallback."""
    out: dict[str, Any] = {"bos": None, "eos": None, "pad": None, "bos_id": None, "eos_ids": (),
                           "pad_id": None,
           "chat_template": None}
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        raw = json.loads(tc.read_text())
        for k in ("bos", "eos", "pad"):
            tok = raw.get(f"{k}_token")
            out[k] = tok.get("content") if isinstance(tok, dict) else tok
        template = raw.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        out["chat_template"] = template
    jinja = d / "chat_template.jinja"
    if out["chat_template"] is None and jinja.is_file():
        out["chat_template"] = jinja.read_text()
    cfg = d / "config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text())
        eos = raw.get("eos_token_id")
        out["eos_ids"] = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        out["bos_id"], out["pad_id"] = raw.get("bos_token_id"), raw.get("pad_token_id")
    return out
