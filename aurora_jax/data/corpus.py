"""The built-in corpus: text that every machine with Python already has.

Two domains, so that domain shift can be shown without downloading anything:
- "code": the standard library's own Python source (`sysconfig.get_paths()['stdlib']`),
- "prose": the English reference texts of `pydoc_data.topics.topics` (what `help('if')` shows).

A fixed subset of each is held out from training, chosen by a hash of the file's path relative
to the standard library (or of the topic name), so the split is the same on every machine and
does not move when other files come or go. Held-out code files double as evaluation prompts.
Everything is returned in a deterministic order.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import NamedTuple

# Directories never read: third-party packages, the test suites (they would dominate the code
# and are not typical code), charset tables, compiled and build artefacts, and pydoc_data (its
# topics.py is the prose domain, stored as one huge string literal).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "encodings", "pydoc_data", "lib-dynload"})
# Held out: one code file in this many, one prose topic in this many (prose is small, so a
# larger share is needed for a held-out loss that is not noise).
CODE_HELD_OUT_EVERY = 32
PROSE_HELD_OUT_EVERY = 8


class Document(NamedTuple):
    """One training or evaluation document."""

    domain: str
    """"code" or "prose"."""
    name: str
    """Path relative to the standard library (code) or pydoc topic name (prose)."""
    text: str
    """The document's text."""


def stdlib_root() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(name: str, every: int) -> bool:
    # sha256, not hash(): Python salts str hashes per process.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % every == 0


def _code_files() -> list[tuple[str, Path]]:
    """(relative posix name, path) of every eligible .py file, sorted by name."""
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):  # generated build settings, not code
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def held_out_code_files() -> list[Path]:
    """Standard-library files never trained on (non-empty ones), for held-out loss and as
    code prompts."""
    code, _ = _documents(held_out=True)
    return [stdlib_root() / d.name for d in code]


def prose_topics() -> list[tuple[str, str]]:
    """Every (topic, text) of pydoc_data's topic texts, sorted by topic."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def held_out_prose_topics() -> list[str]:
    """Names of the prose topics never trained on."""
    return [t for t, _ in prose_topics() if _bucket(t, PROSE_HELD_OUT_EVERY)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):  # a few stdlib files are Latin-1 or unreadable
        return None


def _documents(held_out: bool) -> tuple[list[Document], list[Document]]:
    """(code, prose) documents of the training split or of the held-out split."""
    code = []
    for name, path in _code_files():
        if _bucket(name, CODE_HELD_OUT_EVERY) == held_out:
            text = _read(path)
            if text and text.strip():
                code.append(Document("code", name, text))
    prose = [Document("prose", t, text) for t, text in prose_topics()
             if _bucket(t, PROSE_HELD_OUT_EVERY) == held_out and text.strip()]
    return code, prose


def training_documents(max_bytes: int | None = None) -> list[Document]:
    """The training split: all training prose first, then code files up to `max_bytes` in all.

    Code files are taken in a hash order rather than alphabetically, so a byte limit keeps a
    spread of modules (not only asyncio/ and ctypes/).
    """
    code, prose = _documents(held_out=False)
    code.sort(key=lambda d: hashlib.sha256(d.name.encode()).digest())
    docs, total = [], 0
    for d in prose + code:
        size = len(d.text.encode())
        if max_bytes is not None and total + size > max_bytes:
            continue  # a smaller later file may still fit
        docs.append(d)
        total += size
    return docs


def held_out_documents() -> list[Document]:
    """The held-out split: held-out code files, then held-out prose topics."""
    code, prose = _documents(held_out=True)
    return code + prose
