"""Serving across processes: one serving loop per process, all taking the same steps.

In a multi-process job (aurora_jax/distributed.py) the target spans every process's devices,
so every process must dispatch the same jitted steps, over the same requests, in the same
order. The serving loop (serve/loop.py) is deterministic given what it takes in between two
steps: the requests submitted, the cancellations, the shutdown, and whether the shutdown's
grace has run out (the one clock it reads). Only the primary has an HTTP server, so only its
inbox fills; each loop iteration it hands the items it drained to the other processes
(`exchange`, one small broadcast when there is nothing new), and every process then applies
the same items. Each submitted request gets a sequence number that names it in the
cancellations that follow; on the other processes it becomes a `Ticket` that posts nowhere, and
its stop strings cut its text there exactly as on the primary, so a stop string frees the
slot at the same step everywhere.

Hot swaps (a server whose learner is another process, `learner.mode: workdir`): the
primary's draft watcher reads and checks each new version into host memory in the background;
the loop then hands the others ("draft", version). Every process reads that version from the
store itself (so nothing as large as a draft goes through the broadcast), all agree that each
of them has it, and every process swaps it in before the same step; if one could not read it,
none swaps (`ServingLoop._swap_together`).

What the processes must not do differently is kept out up front (cli.py): no learner thread
(its publications would land at different steps), no timing-driven adaptive windows, no
/admin/draft swaps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from typing import Any

from aurora_jax.distributed import broadcast_bytes, is_primary
from aurora_jax.engine.batcher import Request
from aurora_jax.sampling import SamplingParams
from aurora_jax.serve.text import TextStream


class Lockstep:
    """Hands the primary's inbox items to every process, one loop iteration at a time."""

    def __init__(self, decode: Callable[[list[int]], str],
                 broadcast: Callable[[bytes], bytes] = broadcast_bytes,
                 primary: bool | None = None,
                 read_draft: Callable[[int, Any], Any] | None = None):
        self.decode, self.broadcast = decode, broadcast
        self.read_draft = read_draft
        """(version, like) -> that draft version from the store as host arrays (workdir)."""
        self.primary = is_primary() if primary is None else primary
        self._tickets: dict[int, Any] = {}  # sequence number -> Ticket, until it ends
        self._next = 0

    def exchange(self, items: list[tuple]) -> list[tuple]:
        """The primary's `items` (what its loop drained this iteration), on every process: the
        same kinds, with each submitted ticket rebuilt on the other processes. Every process
        calls this once per iteration (the others with [])."""
        if self.primary:  # a ticket that ended is forgotten everywhere: its late cancel is moot
            items = [i for i in items if not (i[0] == "cancel" and i[1].ended)]
        wire = [self._encode(item) for item in items] if self.primary else []
        received = json.loads(self.broadcast(json.dumps(wire).encode()) or b"[]")
        if self.primary:
            return items
        return [self._decode(item) for item in received]

    def ended(self, ticket) -> None:
        """Forgets a ticket that ended (a cancellation of it is dropped on the primary)."""
        self._tickets.pop(ticket.seq, None)

    def _encode(self, item: tuple) -> dict:
        kind = item[0]
        if kind == "submit":
            ticket = item[1]
            ticket.seq, self._next = self._next, self._next + 1
            self._tickets[ticket.seq] = ticket
            r = ticket.request
            return {"kind": kind, "seq": ticket.seq, "prompt": list(r.prompt),
                    "max_new_tokens": r.max_new_tokens,
                    "sampling": dataclasses.asdict(r.sampling), "id": r.id,
                    "domain": r.domain, "stops": list(ticket.text.stops)}
        if kind == "cancel":
            return {"kind": kind, "seq": item[1].seq, "reason": item[2]}
        if kind == "shutdown":
            return {"kind": kind, "grace_s": item[1]}
        if kind == "expire":
            return {"kind": kind}
        if kind == "draft":  # (the primary keeps its own host copy, item[2])
            return {"kind": kind, "version": item[1]}
        raise ValueError(f"unknown serving-loop item {kind!r}")

    def _decode(self, item: dict) -> tuple:
        from aurora_jax.serve.loop import Ticket

        kind = item["kind"]
        if kind == "submit":
            request = Request(item["prompt"], item["max_new_tokens"],
                              SamplingParams(**item["sampling"]), id=item["id"],
                              domain=item["domain"])
            ticket = Ticket(request, TextStream(self.decode, tuple(item["stops"])),
                            events=asyncio.Queue(), loop=None)
            ticket.seq = item["seq"]
            self._tickets[ticket.seq] = ticket
            return (kind, ticket)
        if kind == "cancel":
            return (kind, self._tickets[item["seq"]], item["reason"])
        if kind == "shutdown":
            return (kind, item["grace_s"])
        if kind == "draft":
            return (kind, item["version"], None)
        return (kind,)
