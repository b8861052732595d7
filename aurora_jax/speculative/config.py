"""How the engine speculates: `SpecConfig`, the one setting every speculative module and the
engine share (speculative/draft.py drafts with it, speculative/ngram.py looks up with it,
engine/step.py verifies what it proposes)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from aurora_jax.errors import ConfigError

Mode = Literal["off", "chain", "tree", "ngram"]
MODES = typing.get_args(Mode)
MAX_DEPTH = 16


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """How the engine speculates."""

    mode: Mode = "tree"
    """off: target-only decoding; chain: top-1 draft for `depth` steps; tree: EAGLE-2 tree;
    ngram: a chain of up to `depth` tokens looked up in the sequence itself (no draft model,
    speculative/ngram.py)."""
    depth: int = 5
    """Draft steps per verification (tree height)."""
    topk: int = 4
    """Tree mode: children per expanded node, and nodes expanded per depth."""
    num_draft_tokens: int = 16
    """Tree mode: nodes kept in the tree (excluding the root)."""
    max_ngram: int = 3
    """N-gram mode: the longest suffix looked up (shorter ones are tried when it fails)."""
    recent_sequences: int = 16
    """N-gram mode: finished sequences (prompt and output) kept to look suffixes up in when
    the sequence itself lacks them (0: only the sequence itself)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"spec mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "off":
            return
        if not 1 <= self.depth <= MAX_DEPTH:
            raise ConfigError(f"depth must be in 1..{MAX_DEPTH}, got {self.depth}")
        if not 1 <= self.max_ngram <= 8:
            raise ConfigError(f"max_ngram must be in 1..8, got {self.max_ngram}")
        if not 0 <= self.recent_sequences <= 1024:
            raise ConfigError(f"recent_sequences must be in 0..1024, got "
                              f"{self.recent_sequences}")
        if self.mode == "tree":
            if not 1 <= self.topk <= 64:
                raise ConfigError(f"topk must be in 1..64, got {self.topk}")
            if not 1 <= self.num_draft_tokens <= self.pool_size:
                raise ConfigError(
                    f"num_draft_tokens must be in 1..{self.pool_size} (the candidates a "
                    f"depth-{self.depth}, topk-{self.topk} expansion produces), got "
                    f"{self.num_draft_tokens}")

    @property
    def needs_draft(self) -> bool:
        """Whether this mode proposes with a draft model (chain, tree)."""
        return self.mode in ("chain", "tree")

    @property
    def label(self) -> str:
        """A short name for plots, tables and metrics: "tree 4/4/12", "chain 4", "off"."""
        if self.mode == "tree":
            return f"tree {self.depth}/{self.topk}/{self.num_draft_tokens}"
        return "off" if self.mode == "off" else f"{self.mode} {self.depth}"

    @property
    def width(self) -> int:
        """Nodes expanded per depth (1 in chain and n-gram mode)."""
        return self.topk if self.mode == "tree" else 1

    @property
    def max_depth(self) -> int:
        """Longest acceptable path, in draft nodes (0 when off)."""
        return 0 if self.mode == "off" else self.depth

    @property
    def pool_size(self) -> int:
        """Candidates produced by the expansion: k at depth 1, k*k at each later depth."""
        k = self.width
        return k + (self.depth - 1) * k * k

    @property
    def nodes(self) -> int:
        """N: draft nodes per tree (excluding the root)."""
        return {"off": 0, "chain": self.depth, "tree": self.num_draft_tokens,
                "ngram": self.depth}[self.mode]
