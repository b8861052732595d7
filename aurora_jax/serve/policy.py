"""Which engine serves the next requests: the adaptive policy of engine/adaptive.py applied
to a live server, window by window.

The server holds one engine per mode (the primary speculation setting "spec", alternatives
"alt1", ..., and target-only "off"), all over the same target. A window is `window_steps`
steps of the engine its mode names. When a window opens, the `UtilityMonitor` chooses its
mode for the load of that moment (requests running and waiting); requests admitted during the
window go to that mode's engine and stay there until they end (a request never moves: its
cache lives in one engine), so the previous mode's engine drains while the new one fills.

What is measured: tokens delivered over wall time, in the loop iterations in which the
window's engine stepped alone (and had the iteration before), recorded at the load the window
was chosen for, so that the policy's choices and its measurements meet in the same load
bucket. Iterations in which two engines stepped (a hand-over) are not measured, so an
overlap never blurs a rate. When a window closes, what it measured is recorded and the next
window is chosen (Aurora, section 4: serve target-only until the draft pays, probe now and
then).
"""

from __future__ import annotations

import collections
import dataclasses

from aurora_jax.engine.adaptive import AdaptiveConfig, UtilityMonitor


@dataclasses.dataclass
class Window:
    """One served window, as /admin/draft and the tests see it."""

    index: int
    mode: str
    load: int
    """Requests running and waiting when it opened (the load it was chosen for)."""
    tokens: int = 0
    """Tokens its engine delivered in the iterations it stepped alone."""
    seconds: float = 0.0
    """Wall time of those iterations."""
    timed: int = 0
    """Their number."""
    steps: int = 0


class WindowPolicy:
    """The mode of each window, from the rates it measures. With `cfg` None (or one mode)
    every window is the first mode and nothing is measured."""

    def __init__(self, modes: tuple[str, ...], cfg: AdaptiveConfig | None, window_steps: int,
                 min_steps: int | None = None, keep: int = 256):
        self.modes = modes
        self.monitor = (UtilityMonitor(cfg, modes) if cfg is not None and len(modes) > 1
                        else None)
        self.window_steps = window_steps
        self.min_steps = max(2, window_steps // 4) if min_steps is None else min_steps
        """Timed steps a window needs for its rate to count."""
        self.window: Window | None = None  # the open one
        self.history: collections.deque[Window] = collections.deque(maxlen=keep)
        self.last_mode = modes[0]
        self._opened = 0

    def current(self, load: int) -> str:
        """The mode new requests go to; opens a window chosen for `load` if none is open."""
        if self.window is None:
            mode = self.monitor.choose(load) if self.monitor else self.modes[0]
            self.window = Window(self._opened, mode, load)
            self._opened += 1
            self.last_mode = mode
        return self.window.mode

    def stepped(self, mode: str, tokens: int, seconds: float | None) -> Window | None:
        """Books one step of `mode`'s engine: `tokens` it delivered, `seconds` of wall time if
        it stepped alone (None if another engine stepped in the same iteration or the one
        before). Returns the window this step closed, if it closed one."""
        w = self.window
        if w is None or self.monitor is None or mode != w.mode:
            return None
        w.steps += 1
        if seconds is not None:
            w.tokens, w.seconds, w.timed = w.tokens + tokens, w.seconds + seconds, w.timed + 1
        return self._close() if w.steps >= self.window_steps else None

    def _close(self) -> Window:
        w, monitor = self.window, self.monitor
        assert w is not None and monitor is not None
        if w.timed >= self.min_steps:
            monitor.record(w.mode, w.tokens, w.seconds, w.load)
        self.history.append(w)
        self.window = None
        return w

    def rates(self, load: int) -> dict[str, float | None]:
        """Smoothed tokens/s per mode at this load (None where not measured)."""
        return self.monitor.rates(load) if self.monitor else dict.fromkeys(self.modes)

    def status(self) -> dict:
        """The policy in numbers, for /admin/draft."""
        if self.monitor is None:
            return {"enabled": False, "mode": self.last_mode}
        loads = self.monitor.loads()
        return {"enabled": True, "mode": self.last_mode, "windows": self._opened,
                "window_steps": self.window_steps,
                "tokens_per_s": {str(b): self.monitor.rates(b) for b in loads},
                "speedup": {str(b): self.monitor.speedup(b) for b in loads}}
