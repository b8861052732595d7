"""What the primary of a multi-process server hands the others (serve/lockstep.py), and the
byte broadcast it goes through (distributed.broadcast_bytes), with the collective replaced by
a recording: the two-process end-to-end test is in test_multihost.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from aurora_jax import distributed
from aurora_jax.engine.batcher import Request
from aurora_jax.sampling import SamplingParams
from aurora_jax.serve.lockstep import Lockstep
from aurora_jax.serve.loop import Ticket
from aurora_jax.serve.text import TextStream


def _as(monkeypatch, primary: bool, sent: list):
    """Makes this process the primary (recording what it broadcasts) or another process
    (receiving the recordings in order)."""
    monkeypatch.setattr(distributed, "is_multiprocess", lambda: True)
    monkeypatch.setattr(distributed, "is_primary", lambda: primary)
    received = iter(list(sent))

    def broadcast(tree):
        if primary:
            sent.append(tree.copy())
            return tree
        return next(received)

    monkeypatch.setattr(distributed, "broadcast_from_primary", broadcast)


@pytest.mark.parametrize("size", [0, 1, 55, 56, 57, 300, 4096])
def test_broadcast_bytes_carries_any_length(monkeypatch, size):
    """Up to chunk - 8 bytes in one broadcast, more in a second one padded to a power of two;
    the other process gets the primary's bytes exactly."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    sent: list = []
    _as(monkeypatch, True, sent)
    assert distributed.broadcast_bytes(data, chunk=64) == data
    assert len(sent) == (1 if size <= 56 else 2)
    if len(sent) == 2:
        assert len(sent[1]) == 1 << (size - 57).bit_length() >= size - 56
    _as(monkeypatch, False, sent)
    assert distributed.broadcast_bytes(b"", chunk=64) == data


def _ticket(prompt, stops=(), **sampling) -> Ticket:
    return Ticket(Request(prompt, 7, SamplingParams(**sampling), id=f"r{len(prompt)}",
                          domain="code"), TextStream(lambda ids: "".join(map(str, ids)), stops),
                  asyncio.Queue(), asyncio.new_event_loop())


def test_the_other_processes_get_the_same_items_in_the_same_order():
    wire: list[bytes] = []

    def record(data: bytes) -> bytes:
        wire.append(data)
        return data

    primary = Lockstep(str, broadcast=record, primary=True)
    a, b = _ticket([1, 2, 3], stops=("x",)), _ticket([4, 5], temperature=0.7, seed=3)
    host_draft = {"w": np.ones(3)}  # the primary's staged copy: never sent
    iterations = [[("submit", a), ("submit", b)], [("draft", 3, host_draft)],
                  [("cancel", a, "abort"), ("shutdown", 2.5)], [("expire",)]]
    for items in iterations:
        assert primary.exchange(list(items)) == items  # the primary applies its own

    replay = iter(wire)
    other = Lockstep(str, broadcast=lambda _: next(replay), primary=False)
    got = [other.exchange([]) for _ in iterations]
    assert [[i[0] for i in items] for items in got] == \
           [[i[0] for i in items] for items in iterations]
    a2, b2 = got[0][0][1], got[0][1][1]
    for mine, theirs in [(a, a2), (b, b2)]:
        assert theirs.request == mine.request
        assert theirs.text.stops == mine.text.stops and theirs.seq == mine.seq
        assert theirs.loop is None  # posts nowhere
        theirs.post("delta", "ignored")
    assert got[1] == [("draft", 3, None)]  # the others read version 3 from the store
    assert b"ones" not in wire[1] and len(wire[1]) < 64
    assert got[2][0][1] is a2 and got[2][0][2] == "abort"  # the same ticket, by its number
    assert got[2][1] == ("shutdown", 2.5) and got[3] == [("expire",)]


def test_a_cancel_of_a_job_that_ended_is_dropped_everywhere():
    wire: list[bytes] = []
    primary = Lockstep(str, broadcast=lambda d: wire.append(d) or d, primary=True)
    a = _ticket([1])
    primary.exchange([("submit", a)])
    a.ended = True
    primary.ended(a)
    assert primary.exchange([("cancel", a, "abort")]) == []
    assert wire[-1] == b"[]"
