"""Prompt sets that ship with Python: held-out standard-library source files as code prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from aurora_jax.data.corpus import stdlib_root
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import ConfigError


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed object) of each non-blank line; an unreadable file or a line that
    is not JSON raises ConfigError naming `path:line`."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e
    out = []
    for n, line in enumerate(lines, start=1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return out


def read_prompts_file(path: str | Path, what: str = "prompts file", *,
                      need_domain: bool = False) -> list[dict]:
    """JSONL, one object per line with a "prompt" string or chat "messages" and optional "id"
    and "domain" (required with `need_domain`); a bad line is reported with its number
    before anything runs. Items: {"id", "domain", "prompt", "messages", "line"}."""
    out: list[dict] = []
    for n, obj in read_jsonl(path, what):
        if not isinstance(obj, dict) or (isinstance(obj.get("prompt"), str)
                                         == isinstance(obj.get("messages"), list)):
            raise ConfigError(f'{path}:{n}: expected an object with a "prompt" string or a '
                              '"messages" list (one of them)')
        unknown = set(obj) - {"prompt", "messages", "id", "domain"}
        if unknown:
            raise ConfigError(f"{path}:{n}: unknown field(s) {sorted(unknown)} "
                              '(allowed: "prompt", "messages", "id", "domain")')
        if need_domain and not isinstance(obj.get("domain"), str):
            raise ConfigError(f'{path}:{n}: expected a "domain" string')
        out.append({"id": obj.get("id", len(out)), "domain": obj.get("domain"),
                    "prompt": obj.get("prompt"), "messages": obj.get("messages"), "line": n})
    if not out:
        raise ConfigError(f"{path}: no prompts")
    return out


def _held_out_names(model_dir: Path) -> list[str]:
    """The stdlib files a checkpoint's held_out_files.json says it never trained on."""
    held = Path(model_dir) / "held_out_files.json"
    return json.loads(held.read_text())["stdlib_files_held_out"] if held.is_file() else []


def stdlib_code_prompts(model_dir: Path, tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` tokens cut from the starts of standard-library files:
    those a checkpoint lists in held_out_files.json (files it never saw in training) when it
    has one, else any stdlib modules in name order."""
    stdlib = stdlib_root()
    files = _held_out_names(model_dir) or sorted(p.name for p in stdlib.glob("*.py"))
    out = []
    for rel in files:
        if not (stdlib / rel).is_file():
            continue
        ids = tok.encode((stdlib / rel).read_text(errors="replace"))
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            return out
    raise ConfigError(f"only {len(out)} standard-library files have {length} tokens; "
                      f"{n} prompts were asked for")


def stdlib_traffic_prompts(model_dir: Path, tok: Tokenizer, n: int, length: int,
                           seed: int = 0) -> list[list[int]]:
    """`n` code prompts of exactly `length` tokens from standard-library files that are NOT in
    the checkpoint's held_out_files.json (traffic to learn from, disjoint from the held-out
    evaluation prompts), each cut at a random line start of a random file."""
    held_out = set(_held_out_names(model_dir))
    stdlib = stdlib_root()
    files = [p for p in sorted(stdlib.glob("*.py")) if p.name not in held_out]
    rng = np.random.default_rng(seed)
    out: list[list[int]] = []
    tries = 0
    while len(out) < n and tries < 50 * n:
        tries += 1
        lines = files[rng.integers(len(files))].read_text(errors="replace").splitlines(True)
        if len(lines) < 2:
            continue
        ids = tok.encode("".join(lines[rng.integers(len(lines) // 2 + 1):]))
        if len(ids) >= length:
            out.append(ids[:length])
    if len(out) == n:
        return out
    raise ConfigError(f"found only {len(out)} standard-library cuts of {length} tokens; "
                      f"{n} prompts were asked for")
