"""The draft channel (engine/channel.py), the one way a draft reaches the engines: offers wait
for the owner's step boundary and land in every draft engine together, the newest offer wins,
version numbers never repeat (rollbacks included), unfit drafts are refused without touching
what serves, and a collapse the guard finds is rolled back and told to every listener.
No step runs here: a swap replaces an argument of the compiled step, so engines that never
stepped show all of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from spec_models import random_pair, swap_state, tiny_cfg

from aurora_jax.engine.channel import DraftChannel
from aurora_jax.engine.engine import Engine
from aurora_jax.engine.guard import GuardConfig
from aurora_jax.errors import ConfigError, DraftRefused
from aurora_jax.speculative.config import SpecConfig


@pytest.fixture(scope="module")
def pair():
    return random_pair(tiny_cfg(), seed=3)


def _engines(pair):
    target, draft = pair
    kw = dict(max_slots=2, max_len=32)
    return {"spec": Engine(target, draft, SpecConfig(mode="tree", depth=3, topk=2,
                                                     num_draft_tokens=4), **kw),
            "alt1": Engine(target, draft, SpecConfig(mode="chain", depth=2), **kw),
            "ngram": Engine(target, None, SpecConfig(mode="ngram", depth=2), **kw),
            "off": Engine(target, None, SpecConfig(mode="off"), **kw)}


def _serving(engines) -> set:
    return {(id(e.draft_state), e.draft_version) for e in engines.values()
            if e.draft is not None}


def test_offers_land_at_the_owners_step_boundary_in_every_draft_engine_together(pair):
    engines = _engines(pair)
    _, draft = pair
    channel = DraftChannel(*engines.values(), immediate=False)
    swaps = []
    channel.on_swap.append(lambda version, latency: swaps.append((version, latency)))
    assert [e for e in channel.engines] == [engines["spec"], engines["alt1"]]
    first, second = swap_state(draft, seed=11), swap_state(draft, seed=12)
    assert channel.offer(first) == 1
    assert _serving(engines) == {(id(draft.state), 0)}  # nothing swapped before the boundary
    assert channel.serving() is first  # what the next offer is checked against
    assert channel.offer(second) == 2  # replaces the pending one: the newest wins
    assert channel.apply() == 2
    assert _serving(engines) == {(id(second), 2)}  # both draft engines, one version
    assert channel.apply() is None  # nothing pending any more
    assert [v for v, _ in swaps] == [2] and swaps[0][1] >= 0.0
    assert channel.swaps == 1 and channel.version == 2


def test_an_immediate_channel_swaps_at_the_offer(pair):
    engines = _engines(pair)
    _, draft = pair
    channel = DraftChannel(*engines.values())
    new = swap_state(draft, seed=13)
    assert channel.offer(new) == 1
    assert _serving(engines) == {(id(new), 1)}


def test_unfit_drafts_are_refused_and_the_serving_draft_stays(pair):
    engines = _engines(pair)
    _, draft = pair
    channel = DraftChannel(*engines.values(), immediate=False)
    nan = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan)
                       if jnp.issubdtype(x.dtype, jnp.floating) and x.size else x,
                       swap_state(draft, seed=14))
    for bad, why in [(nan, "non-finite"), (jax.tree.map(jnp.copy, draft.state), "stale")]:
        with pytest.raises(DraftRefused, match=why):
            channel.offer(bad)
    with pytest.raises(DraftRefused, match="not newer"):
        channel.offer(swap_state(draft, seed=15), version=0)
    assert channel.apply() is None
    assert _serving(engines) == {(id(draft.state), 0)}
    target, _ = pair
    with pytest.raises(ConfigError, match="without a draft"):
        DraftChannel(Engine(target, None, SpecConfig(mode="off"), max_slots=1,
                            max_len=16)).offer(draft.state)


class _Counts:
    """What the guard reads of a batcher: rows verified and tokens accepted per version."""

    def __init__(self, by_version):
        self.by_version = by_version


def test_a_collapse_is_rolled_back_everywhere_and_numbers_never_repeat(pair):
    engines = _engines(pair)
    _, draft = pair
    channel = DraftChannel(*engines.values(), guard=GuardConfig(min_rows=8),
                           immediate=False)
    heard = []
    channel.on_rollback.append(heard.append)
    bad = swap_state(draft, seed=16)
    channel.offer(bad)
    channel.apply()
    spec = engines["spec"]
    spec.last_step_draft, spec.last_step_version = (bad, 1), 1  # a step served version 1
    trusted = {0: [16, 32], 1: [8, 0]}  # tau 3.0 for version 0, 1.0 for version 1
    rollback = channel.judge({"spec": _Counts(trusted), "alt1": _Counts({})}, spec)
    assert rollback is not None and (rollback.bad_version, rollback.version) == (1, 0)
    assert heard == [rollback] and channel.rollbacks == 1
    assert _serving(engines) == {(id(draft.state), 0)}  # the trusted draft, in both engines
    assert channel.offer(swap_state(draft, seed=17)) == 2  # 1 is never handed out again
