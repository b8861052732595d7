"""Ctrl-C in the long commands: the first one stops the command cleanly, a second at once.

Under `handled()` (the CLI's `main` runs every command under it) the first SIGINT raises
`Interrupted`, a KeyboardInterrupt, in the main thread, wherever it is; except inside a
`deferred()` block (a training step that donates its state, a checkpoint or a summary being
written), where it only marks itself `requested()`, for a loop in there to stop at its next
safe point (`check()`), and is raised when the block ends. The command then keeps what it
finished and says what and where in `Interrupted.kept`; the CLI prints that as one line and
exits 130 (128 + SIGINT, the shells' convention), without a traceback.

The first Ctrl-C also puts back SIGINT's default action, so a second one ends the process at
once, even inside a long compile or a C library (a shell reports 130 again): whatever is still
being written is lost, what was already written stays (the commands append their logs line by
line and write checkpoints and drafts whole).

A Ctrl-C that lands where Python cannot raise (a garbage-collector callback, which jax
registers, or a `__del__`) would be printed as "Exception ignored" and lost; `handled()`
catches it there (sys.unraisablehook) and holds it like `deferred()` does, for the next safe
point, while the next Ctrl-C raises again.

Outside `handled()` (a library caller, a test) SIGINT keeps Python's default, a plain
KeyboardInterrupt wherever the main thread is, and `deferred()` holds nothing back.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

EXIT_STATUS = 130
"""What the CLI exits with after a Ctrl-C: 128 + SIGINT."""


class Interrupted(KeyboardInterrupt):
    """The first Ctrl-C under `handled()`, raised in the main thread."""

    def __init__(self, kept: str = ""):
        super().__init__(kept)
        self.kept = kept
        """What the stopped work kept and where, as one clause ("kept 3 finished windows in
        runs/x/ (...)"); set by the innermost code that knows, empty when nothing was."""


class _State:
    def __init__(self):
        self.requested = False  # a Ctrl-C held (inside deferred(), or lost where it landed)
        self.depth = 0  # deferred() blocks the main thread is in
        # the hook handled() replaced, called for everything but a lost Ctrl-C
        self.unraisablehook: Callable[[Any], object] = sys.__unraisablehook__


_state = _State()


def _on_sigint(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C: the process ends at once
    if _state.depth:
        _state.requested = True
        return
    raise Interrupted


def _on_unraisable(unraisable) -> None:
    if isinstance(unraisable.exc_value, Interrupted):  # swallowed where it landed
        _state.requested = True
        signal.signal(signal.SIGINT, _on_sigint)
        return
    _state.unraisablehook(unraisable)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Makes the first Ctrl-C an `Interrupted` and a second one fatal, for the block. The
    previous SIGINT handler comes back after it unless a Ctrl-C came (then the default
    action stays, for a second one while the process exits). Only the main thread can
    handle signals: elsewhere this does nothing."""
    if not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _state.unraisablehook, sys.unraisablehook = sys.unraisablehook, _on_unraisable
    _state.requested, _state.depth = False, 0
    try:
        yield
    finally:
        _state.requested = False
        sys.unraisablehook = _state.unraisablehook
        if signal.getsignal(signal.SIGINT) is _on_sigint:
            # (None: a handler installed outside Python, which cannot be put back from here)
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                          else previous)


@contextlib.contextmanager
def deferred(kept: str = "") -> Iterator[None]:
    """Holds a Ctrl-C that arrives inside the block until the block ends, and raises it then
    as `Interrupted(kept)`, unless the block raised; a loop inside may stop early at a safe
    point with `check()`. Nested blocks raise at the end of the outermost. Only the main
    thread (the one signals interrupt) holds anything."""
    if not _in_main_thread():
        yield
        return
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
    if not _state.depth:
        check(kept)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def requested() -> bool:
    """Whether a Ctrl-C is being held for the next safe point (e.g. for a library's
    `should_stop`)."""
    return _state.requested


def check(kept: str = "") -> None:
    """Raises the Ctrl-C held, if any, as `Interrupted(kept)`: call it where a loop may
    stop."""
    if _state.requested:
        _state.requested = False
        raise Interrupted(kept)
