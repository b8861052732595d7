"""A function called every `period_s` seconds on a daemon thread (a directory watcher).
An exception in one call is logged and the next call still happens: a watcher that meets a
transient file-system error must not stop watching."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, fn: Callable[[], object], period_s: float, name: str):
        self.fn, self.period_s = fn, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.fn()
            except Exception:
                log.exception("%s: call failed; retrying in %.1f s", self._thread.name,
                              self.period_s)

    def start(self) -> Periodic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
