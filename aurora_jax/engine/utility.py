"""Measured utility of speculation, and the adaptive policy that acts on it.

Acceptance length alone does not say whether speculating pays: a verification step costs
more than a plain decode step, by a factor that depends on the hardware, the batch and the
tree (on a 2-core CPU a 13-node verification costs 2-4x a 1-token step). So the serving loop
measures what it gets: tokens per second of the windows it serves speculatively and of the
windows it serves target-only, each an exponential moving average over windows. The policy
serves the faster way (and, given alternative speculation settings, the fastest of them),
and every `probe_every` windows serves one window another way, so that a draft that improved
(or a load that changed) is noticed (Aurora, section 4: day-0
serving falls back to the target until the draft pays; target-only windows still yield
traces for the learner).
"""

from __future__ import annotations

import dataclasses

from aurora_jax.errors import ConfigError
from aurora_jax.spec.draft import SpecConfig


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """When to speculate."""

    enabled: bool = True
    """False: always speculate (still measuring target-only on probe windows)."""
    probe_every: int = 4
    """Every this many windows, serve one window the way not currently chosen."""
    margin: float = 1.0
    """Speculate while speculative tokens/s > margin x target-only tokens/s."""
    smoothing: float = 0.5
    """Weight of the newest window in each moving average."""
    alternatives: tuple[SpecConfig, ...] = ()
    """Other speculation settings (depth, tree size) to measure beside the primary one; the
    fastest measured one is used when speculating."""

    def __post_init__(self):
        if self.probe_every < 2:
            raise ConfigError(f"probe_every must be >= 2, got {self.probe_every}")
        if not 0 < self.smoothing <= 1 or self.margin <= 0:
            raise ConfigError("smoothing must be in (0, 1] and margin > 0")
        if any(a.mode == "off" for a in self.alternatives):
            raise ConfigError("adaptive.alternatives are speculation settings (chain, tree or "
                              "ngram); target-only is always measured")


class UtilityMonitor:
    """Tokens/s per serving mode and the choice of mode for each window. `modes` are names of
    speculative settings (the first is the primary one) followed by "off" (target-only)."""

    def __init__(self, cfg: AdaptiveConfig = AdaptiveConfig(), modes=("spec", "off")):
        if not modes or modes[-1] != "off" or len(set(modes)) != len(modes):
            raise ConfigError(f"modes must be distinct and end with 'off', got {modes}")
        self.cfg, self.modes = cfg, tuple(modes)
        self.tokens_per_s: dict[str, float | None] = dict.fromkeys(self.modes)

    def record(self, mode: str, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rate, old = tokens / seconds, self.tokens_per_s[mode]
        a = self.cfg.smoothing
        self.tokens_per_s[mode] = rate if old is None else a * rate + (1 - a) * old

    def best_spec(self) -> str:
        """The fastest measured speculative setting (the primary one until any is measured)."""
        measured = [m for m in self.modes[:-1] if self.tokens_per_s[m] is not None]
        return max(measured, key=self.tokens_per_s.get) if measured else self.modes[0]

    @property
    def speedup(self) -> float | None:
        """Measured tokens/s of the best speculative setting over target-only (None until
        both were measured)."""
        s, o = self.tokens_per_s[self.best_spec()], self.tokens_per_s["off"]
        return None if s is None or o is None else s / o

    def preferred(self) -> str:
        best = self.best_spec()
        if not self.cfg.enabled:
            return best
        sp = self.speedup
        return best if sp is None or sp > self.cfg.margin else "off"

    def choose(self, window: int) -> str:
        """The first windows try every mode once, in order (so each gets measured); after
        that the preferred mode, except every probe_every-th window, which probes the others
        in turn."""
        if window < len(self.modes):
            return self.modes[window]
        best = self.preferred()
        others = [m for m in self.modes if m != best]
        if others and window % self.cfg.probe_every == 0:
            return others[(window // self.cfg.probe_every) % len(others)]
        return best
