"""Measured utility of speculation, and the adaptive policy that acts on it.

Acceptance length alone does not say whether speculating pays: a verification step costs
more than a plain decode step, by a factor that depends on the hardware, the batch and the
tree (on a 2-core CPU a 13-node verification costs 2-4x a 1-token step). So the serving loop
measures what it gets: tokens per second of the windows it serves speculatively and of the
windows it serves target-only, each an exponential moving average over windows. The policy
serves the faster way, and every `probe_every` windows serves one window the other way, so
that a draft that improved (or a load that changed) is noticed (Aurora, section 4: day-0
serving falls back to the target until the draft pays; target-only windows still yield
traces for the learner).
"""

from __future__ import annotations

import dataclasses

from aurora_jax.errors import ConfigError


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

    def __post_init__(self):
        if self.probe_every < 2:
            raise ConfigError(f"probe_every must be >= 2, got {self.probe_every}")
        if not 0 < self.smoothing <= 1 or self.margin <= 0:
            raise ConfigError("smoothing must be in (0, 1] and margin > 0")


class UtilityMonitor:
    """Tokens/s per serving mode ("spec", "off") and the choice of mode for each window."""

    def __init__(self, cfg: AdaptiveConfig = AdaptiveConfig()):
        self.cfg = cfg
        self.tokens_per_s: dict[str, float | None] = {"spec": None, "off": None}

    def record(self, mode: str, tokens: int, seconds: float) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rate, old = tokens / seconds, self.tokens_per_s[mode]
        a = self.cfg.smoothing
        self.tokens_per_s[mode] = rate if old is None else a * rate + (1 - a) * old

    @property
    def speedup(self) -> float | None:
        """Measured speculative / target-only tokens/s (None until both were measured)."""
        s, o = self.tokens_per_s["spec"], self.tokens_per_s["off"]
        return None if s is None or o is None else s / o

    def preferred(self) -> str:
        if not self.cfg.enabled:
            return "spec"
        sp = self.speedup
        return "spec" if sp is None or sp > self.cfg.margin else "off"

    def choose(self, window: int) -> str:
        """Window 0 speculates and window 1 does not (both get measured); after that the
        preferred mode, except every probe_every-th window, which takes the other one."""
        if window < 2:
            return ("spec", "off")[window]
        best = self.preferred()
        if window % self.cfg.probe_every == 0:
            return "off" if best == "spec" else "spec"
        return best
