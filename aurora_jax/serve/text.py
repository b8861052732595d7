"""From a request's token ids to the text a client sees: incremental detokenization and stop
strings.

The text so far is always the decoding of all tokens so far (a token's text can depend on its
neighbours, e.g. a multi-byte character split across tokens), and a delta is what that text
adds to what was sent. Stop strings are searched in the whole text, so one that spans tokens
is found; the text from the stop string on is never sent. Until the request ends, the last
`len(longest stop) - 1` characters are held back, since they may be the start of a stop
string that the next token completes; a trailing U+FFFD (an incomplete byte sequence) is held
back the same way.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """The client-visible text of one request, step by step."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.sent = 0  # characters of the text already handed out
        self.stopped = False  # a stop string was found

    def update(self, token_ids: list[int], final: bool) -> str:
        """The text to send after the tokens so far (`final`: the request has ended, send
        everything that is not cut by a stop string)."""
        if self.stopped:
            return ""
        text = self.decode(token_ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text) - self.hold
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.sent:
            return ""
        delta, self.sent = text[self.sent:end], end
        return delta

    def _first_stop(self, text: str) -> int | None:
        # A stop string may start up to `hold` characters before what was sent (held back).
        start = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None
