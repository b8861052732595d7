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
from aurora_jax.speculative.config import SpecConfig


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


def spec_modes(primary: SpecConfig, cfg: AdaptiveConfig) -> dict[str, SpecConfig]:
    """The speculation settings a policy chooses among, by mode name: "spec" (the primary
    one), then "alt1", "alt2", ... (`cfg.alternatives`); "off" (target-only) is not one."""
    return {"spec": primary, **{f"alt{i + 1}": a for i, a in enumerate(cfg.alternatives)}}


def load_bucket(load: int) -> int:
    """Concurrent requests rounded up to a power of two: loads measured together."""
    return 1 << (max(int(load), 1) - 1).bit_length()


class UtilityMonitor:
    """Tokens/s per serving mode and the choice of mode for each window, kept per load (the
    number of requests served at once, in power-of-two buckets): speculation that pays at one
    request at a time may not at eight, where the target's forward is compute-bound. `modes`
    are names of speculative settings (the first is the primary one) followed by "off"
    (target-only)."""

    def __init__(self, cfg: AdaptiveConfig = AdaptiveConfig(), modes=("spec", "off")):
        if not modes or modes[-1] != "off" or len(set(modes)) != len(modes):
            raise ConfigError(f"modes must be distinct and end with 'off', got {modes}")
        self.cfg, self.modes = cfg, tuple(modes)
        self._rates: dict[int, dict[str, float | None]] = {}
        self._windows: dict[int, int] = {}

    def rates(self, load: int = 1) -> dict[str, float | None]:
        """Smoothed tokens/s per mode at this load (None where not measured yet)."""
        return self._rates.setdefault(load_bucket(load), dict.fromkeys(self.modes))

    def loads(self) -> list[int]:
        """The load buckets seen so far."""
        return sorted(self._rates)

    def record(self, mode: str, tokens: int, seconds: float, load: int = 1) -> None:
        if seconds <= 0 or tokens <= 0:
            return
        rates = self.rates(load)
        rate, old = tokens / seconds, rates[mode]
        a = self.cfg.smoothing
        rates[mode] = rate if old is None else a * rate + (1 - a) * old

    def best_spec(self, load: int = 1) -> str:
        """The fastest measured speculative setting (the primary one until any is measured)."""
        rates = self.rates(load)
        measured = [m for m in self.modes[:-1] if rates[m] is not None]
        return max(measured, key=lambda m: rates[m] or 0.0) if measured else self.modes[0]

    def speedup(self, load: int = 1) -> float | None:
        """Measured tokens/s of the best speculative setting over target-only (None until
        both were measured)."""
        rates = self.rates(load)
        s, o = rates[self.best_spec(load)], rates["off"]
        return None if s is None or o is None else s / o

    def preferred(self, load: int = 1) -> str:
        best = self.best_spec(load)
        if not self.cfg.enabled:
            return best
        sp = self.speedup(load)
        return best if sp is None or sp > self.cfg.margin else "off"

    def choose(self, load: int = 1) -> str:
        """The mode of the next window at this load. The first windows at a load try every
        mode once, in order (so each gets measured there); after that the preferred mode,
        except every probe_every-th window, which probes the others in turn."""
        bucket = load_bucket(load)
        window = self._windows.get(bucket, 0)
        self._windows[bucket] = window + 1
        if window < len(self.modes):
            return self.modes[window]
        best = self.preferred(load)
        others = [m for m in self.modes if m != best]
        if others and window % self.cfg.probe_every == 0:
            return others[(window // self.cfg.probe_every) % len(others)]
        return best
