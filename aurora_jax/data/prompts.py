"""Prompt sets that ship with Python: held-out standard-library source files as code prompts."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import ConfigError


def stdlib_code_prompts(model_dir: Path, tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """`n` prompts of exactly `length` tokens cut from the starts of standard-library files:
    those a checkpoint lists in held_out_files.json (files it never saw in training) when it
    has one, else any stdlib modules in name order."""
    held = Path(model_dir) / "held_out_files.json"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = (json.loads(held.read_text())["stdlib_files_held_out"] if held.is_file()
             else sorted(p.name for p in stdlib.glob("*.py")))
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
