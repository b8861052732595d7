"""The speculative engine is lossless: greedy output equals target-only greedy output token
for token, whatever the draft; caches after a step equal those of plain decoding; a draft swap
recompiles nothing."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from spec_models import (
    EOS,
    copycat_pair,
    greedy_path,
    noisy_copycat_pair,
    random_pair,
    swap_state,
    tiny_cfg,
)

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.engine.target_only import TargetGenerator
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.transformer import forward
from aurora_jax.sampling import SamplingParams
from aurora_jax.speculative.draft import catch_up, propose

SPECS = {"chain": dict(mode="chain", depth=4),
         "tree": dict(mode="tree", depth=4, topk=3, num_draft_tokens=9)}


def _spec(name):
    from aurora_jax.speculative.config import SpecConfig

    return SpecConfig(**SPECS[name])


@pytest.fixture(scope="module")
def copycat():
    return copycat_pair(tiny_cfg())


@pytest.fixture(scope="module")
def randoms():
    return random_pair(tiny_cfg(), seed=5)


class SharedEngines:
    """Compiled engines and reference decoders for this module's tests, built on first use
    and kept for the module (most tests then compile nothing): one engine per (pair fixture,
    mode, slots, length), one reference decoder per pair fixture."""

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request
        self._engines: dict[tuple, Engine] = {}
        self._references: dict[str, TargetGenerator] = {}

    def engine(self, pair: str, mode: str, max_slots: int = 2, max_len: int = 64) -> Engine:
        key = (pair, mode, max_slots, max_len)
        if key not in self._engines:
            target, draft = self._request.getfixturevalue(pair)[:2]
            self._engines[key] = Engine(target, draft, _spec(mode), max_slots=max_slots,
                                        max_len=max_len)
        return self._engines[key]

    def target_only(self, pair: str, prompts, max_new: int) -> list[list[int]]:
        if pair not in self._references:
            self._references[pair] = TargetGenerator(self._request.getfixturevalue(pair)[0])
        gen = self._references[pair]
        return [c.token_ids for c in gen.generate(prompts, max_new).completions]


@pytest.fixture(scope="module")
def shared(request) -> SharedEngines:
    return SharedEngines(request)


def _prompts(lengths, vocab, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("mode", ["chain", "tree"])
@pytest.mark.parametrize("pair", ["copycat", "randoms"])
def test_greedy_equals_target_only(mode, pair, shared):
    # Batch 1, then five prompts of different lengths through two slots (continuous batching).
    for prompts in (_prompts([7], 40, seed=1), _prompts([5, 9, 3, 12, 6], 40, seed=2)):
        ref = shared.target_only(pair, prompts, 30)
        run = shared.engine(pair, mode).run([Request(p, 30) for p in prompts])
        assert [r.token_ids for r in run.results] == ref
        for r in run.results:
            stopped = r.token_ids[-1] == EOS
            assert r.finish_reason == ("stop" if stopped else "length")
            assert len(r.token_ids) == 30 or stopped
    if pair == "copycat":  # the draft knows the target's map: every step accepts all nodes
        assert run.acceptance_length == pytest.approx(5.0, abs=0.35)


def test_stop_token_inside_an_accepted_path(copycat, shared):
    f = copycat[2]
    # A prompt whose greedy continuation reaches the stop token after a few tokens.
    start = next(x for x in range(3, 40)
                 if EOS in greedy_path(f, x, 6)[2:] and EOS not in greedy_path(f, x, 6)[:2])
    expected = greedy_path(f, start, 6)
    expected = expected[: expected.index(EOS) + 1]
    (res,) = shared.engine("copycat", "chain").run([Request([5, start], 20)]).results
    assert res.token_ids == expected and res.finish_reason == "stop"
    assert res.steps == 1  # the stop token came inside the first accepted path, then it ended


def test_token_budget_cuts_an_accepted_path(copycat, shared):
    f = copycat[2]
    start = next(x for x in range(3, 40) if EOS not in greedy_path(f, x, 12))
    (res,) = shared.engine("copycat", "tree").run([Request([start], 7)]).results
    assert res.token_ids == greedy_path(f, start, 7) and res.finish_reason == "length"
    assert res.steps == 2  # 1 from prefill + 5 + 1 (cut from 5)


def test_trained_checkpoint_greedy_equals_target_only(small_ckpt):
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.models.eagle3 import DraftConfig, init_draft
    from aurora_jax.models.hf_io import load_target

    target = load_target(small_ckpt)
    tok = Tokenizer.load(small_ckpt)
    texts = ["def fibonacci(n):\n    ", "import os\nimport sys\n\n\nclass Config", "# sort"]
    prompts = [tok.encode(t) for t in texts]
    ref = [c.token_ids for c in TargetGenerator(target).generate(prompts, 20).completions]
    draft = init_draft(DraftConfig.for_target(target.cfg), seed=3)
    for mode in ("chain", "tree"):
        engine = Engine(target, draft, _spec(mode), max_slots=2, max_len=128)
        assert [r.token_ids for r in engine.run([Request(p, 20) for p in prompts]).results] == ref


@pytest.mark.parametrize("pair", ["copycat", "randoms"])
def test_caches_after_steps_equal_plain_decoding(pair, request, shared):
    """After prefill and three steps, the target cache holds exactly the keys/values a plain
    forward over the committed tokens gives, and the draft cache exactly what the draft gives
    over those tokens with the target's features."""

    target, draft, *f = request.getfixturevalue(pair)
    engine = shared.engine(pair, "tree")
    prompts = _prompts([6, 11], 40, seed=4)
    if f:  # end the prompts where the target's greedy path runs long without a stop token
        starts = [x for x in range(3, 40) if EOS not in greedy_path(f[0], x, 20)]
        prompts = [p[:-1] + [x] for p, x in zip(prompts, starts, strict=False)]
    reqs = [Request(p, 40) for p in prompts]
    state = engine.init_decode_state()
    prefix = engine.prefill(prompts, [r.sampling for r in reqs])
    state = engine.insert(prefix, state, [1, 0], [40, 40], [r.sampling for r in reqs])
    generated = [[int(x)] for x in np.asarray(prefix.first)]
    for _ in range(3):
        state, out = engine.generate(state)
        for row, slot in enumerate([1, 0]):
            generated[row] += np.asarray(out.tokens[slot, : out.emitted[slot]]).tolist()
    if pair == "copycat":  # long accepted paths: entries really moved in the cache
        assert min(len(g) for g in generated) == 16
    for row, slot in enumerate([1, 0]):
        seq = prompts[row] + generated[row]
        n = len(seq) - 1  # the last token is the root: not cached yet
        assert int(state.cache_len[slot]) == n and int(state.root[slot]) == seq[-1]
        _, aux, _, cache = _jit_forward(target.graphdef, target.state, jnp.asarray([seq[:n]]),
                                        jnp.arange(n)[None], causal_mask(jnp.array([n]), n),
                                        KVCache.zeros(target.cfg, 1, n))
        for got, want in zip(state.cache.k + state.cache.v, cache.k + cache.v, strict=True):
            np.testing.assert_allclose(np.asarray(got[slot, :, :n]), np.asarray(want[0]),
                                       rtol=1e-5, atol=1e-5)
        # Draft rows 0..draft_len-1 read token j+1 and the target features at position j.
        dn = int(state.draft_len[slot])
        assert dn + int(state.pend_count[slot]) == n
        dcache = _draft_prefill(target.graphdef, target.state, draft.graphdef,
                                engine.draft_state, jnp.asarray([seq[1: dn + 1]]), aux[:, :dn])
        np.testing.assert_allclose(np.asarray(state.draft_cache.k[0][slot, :, :dn]),
                                   np.asarray(dcache.k[0][0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(state.draft_cache.v[0][slot, :, :dn]),
                                   np.asarray(dcache.v[0][0]), rtol=1e-5, atol=1e-5)


_jit_forward = jax.jit(forward)


@pytest.fixture(scope="module")
def noisy():
    return noisy_copycat_pair(tiny_cfg())


def _stepwise(engine, prompts, sampling, steps):
    """Prefill into slots 0..n-1, then `steps` engine steps; returns (state, generated token
    lists, the accepted count of every active slot-step)."""
    state = engine.init_decode_state()
    n = len(prompts)
    prefix = engine.prefill(prompts, sampling)
    state = engine.insert(prefix, state, list(range(n)), [200] * n, sampling)
    generated = [[int(x)] for x in np.asarray(prefix.first)[:n]]
    accepted = []
    for _ in range(steps):
        state, out = engine.generate(state)
        emitted, active = np.asarray(out.emitted), np.asarray(out.active)
        for slot in range(n):
            generated[slot] += np.asarray(out.tokens[slot, : emitted[slot]]).tolist()
        accepted += np.asarray(out.accepted)[active].tolist()
    return state, generated, np.array(accepted)


def _assert_cache_is_plain_forward(target, state, slot, seq):
    n = len(seq) - 1  # the last token is the root: not cached yet
    assert int(state.cache_len[slot]) == n and int(state.root[slot]) == seq[-1]
    *_, cache = _jit_forward(target.graphdef, target.state, jnp.asarray([seq[:n]]),
                             jnp.arange(n)[None], causal_mask(jnp.array([n]), n),
                             KVCache.zeros(target.cfg, 1, n))
    for got, want in zip(state.cache.k + state.cache.v, cache.k + cache.v, strict=True):
        np.testing.assert_allclose(np.asarray(got[slot, :, :n]), np.asarray(want[0]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_a_draft_right_on_most_tokens_stays_lossless(noisy, mode, shared):
    """Mid-path rejections and bonus tokens at every depth: the output and the KV cache still
    equal target-only decoding, token for token and entry for entry."""
    target, draft = noisy
    engine = shared.engine("noisy", mode, max_slots=6, max_len=128)
    prompts = _prompts([5, 9, 13, 7, 11, 6], 40, seed=12)
    greedy = [SamplingParams()] * len(prompts)
    state, generated, accepted = _stepwise(engine, prompts, greedy, steps=12)
    depth = _spec(mode).depth
    assert 1 < 1 + accepted.mean() < depth + 1
    assert set(accepted.tolist()) == set(range(depth + 1))  # every accepted count occurs
    ref = shared.target_only("noisy", prompts, max(map(len, generated)))
    for slot, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        assert g == ref[slot][: len(g)]
        _assert_cache_is_plain_forward(target, state, slot, p + g)


def test_a_batch_mixing_greedy_and_sampled_requests_stays_lossless(noisy, shared):
    """Greedy rows equal target-only whatever their sampled neighbours do; every row's cache
    equals a plain forward over what it committed."""
    target, draft = noisy
    engine = shared.engine("noisy", "tree", max_slots=6, max_len=128)
    prompts = _prompts([6, 10, 8, 12, 5, 9], 40, seed=13)
    hot = SamplingParams(temperature=20.0)  # the target is very peaked (logit margin ~64)
    sampling = [SamplingParams(), hot, SamplingParams(), hot, hot, SamplingParams()]
    state, generated, accepted = _stepwise(engine, prompts, sampling, steps=10)
    assert len(set(accepted.tolist())) >= 3
    ref = shared.target_only("noisy", prompts, max(map(len, generated)))
    for slot, (p, g) in enumerate(zip(prompts, generated, strict=True)):
        if sampling[slot].temperature == 0:
            assert g == ref[slot][: len(g)]
        _assert_cache_is_plain_forward(target, state, slot, p + g)
    assert any(g != ref[s][: len(g)] for s, g in enumerate(generated)
               if sampling[s].temperature > 0)  # the sampled rows really sampled


@jax.jit
def _draft_prefill(tgraph, tstate, dgraph, dstate, tokens_1xN, aux_1xNxAxH):
    model, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    n = tokens_1xN.shape[1]
    _, _, cache = draft(model.embed[...][tokens_1xN], draft.project(aux_1xNxAxH),
                        jnp.arange(n)[None], causal_mask(jnp.array([n]), n),
                        KVCache.zeros(draft.cfg, 1, n, jnp.float32, num_layers=1))
    return cache


def test_draft_swap_recompiles_nothing_and_stays_lossless(randoms, copycat, shared):
    target, draft = randoms
    engine = Engine(target, draft, _spec("tree"), max_slots=2, max_len=64)
    prompts = _prompts([5, 8, 3, 10], 40, seed=6)
    ref = shared.target_only("randoms", prompts, 24)
    assert [r.token_ids for r in engine.run([Request(p, 24) for p in prompts]).results] == ref
    compiled = engine.compilations
    swaps = iter(swap_state(draft, seed) for seed in (11, 12, 13, 14))

    def swap(_result):  # called between steps, while other requests are in flight
        engine.set_draft(next(swaps))

    run = engine.run([Request(p, 24) for p in prompts], on_result=swap)
    assert [r.token_ids for r in run.results] == ref
    assert engine.compilations == compiled
    assert engine.draft_version == 4 and len(set().union(*(r.draft_versions
                                                            for r in run.results))) > 1


@functools.partial(jax.jit, static_argnames="spec")
def _propose_afresh(tgraph, tstate, dgraph, dstate, tokens_1xR, aux_1xRxAxH, count, root, spec):
    """The tree the draft proposes from root token `root` after reading the `count` committed
    rows (tokens x[1..c], target aux features at 0..c-1) into an empty cache in one go:
    (tokens [N+1], parents [N+1], draft log-probs [N+1])."""
    model, draft = nnx.merge(tgraph, tstate), nnx.merge(dgraph, dstate)
    embed = model.embed[...]
    cache = KVCache.zeros(draft.cfg, 1, 2 * tokens_1xR.shape[1], jnp.float32, num_layers=1)
    root_lp, root_h, cache, draft_len = catch_up(draft, embed, cache, jnp.zeros((1,), jnp.int32),
                                                 tokens_1xR, aux_1xRxAxH, count[None])
    tree, logp = propose(draft, embed, cache, draft_len, root[None], root_lp, root_h, spec)
    return tree.tokens[0], tree.parent[0], logp[0]


def _padded_forward(target, seqs, rows, width=64):
    """(aux [rows, width, A, H], final hidden [rows, width, H]) of plain causal forwards over
    the token lists `seqs` (at most `rows`), right-padded: one compiled shape for all calls."""
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones(rows, np.int32)
    for i, seq in enumerate(seqs):
        tokens[i, : len(seq)], lengths[i] = seq, len(seq)
    _, aux, hidden, _ = _jit_forward(target.graphdef, target.state, jnp.asarray(tokens),
                                     jnp.broadcast_to(jnp.arange(width), (rows, width)),
                                     causal_mask(jnp.asarray(lengths), width))
    return np.asarray(aux), np.asarray(hidden)


def _node_contexts(seq, c, tree_tokens, tree_parent):
    """For each tree node: the committed tokens before the root (position c), then the path
    from the root to the node."""
    out = []
    for i in range(len(tree_tokens)):
        path, j = [], i
        while j >= 0:
            path.append(int(tree_tokens[j]))
            j = int(tree_parent[j])
            assert len(path) <= len(tree_tokens), "the parent links do not reach the root"
        out.append(list(seq[:c]) + path[::-1])
    return out


@pytest.mark.parametrize("pair,mode", [("randoms", "tree"), ("noisy", "chain")])
def test_traces_hold_what_the_target_computed(pair, mode, request):
    """Every committed token appears in a trace, and the aux features recorded along accepted
    paths equal the target's features from a plain forward over the final sequence. At every
    tree node, accepted or not, the recorded aux and final hidden states equal a plain target
    forward over the node's own context (the committed prefix and the node's path from the
    root), and the recorded tree (tokens, parents) and draft log-probs are the ones `propose`
    gives after reading the committed prefix afresh. The noisy pair (a draft right on most
    tokens, a target whose attention matters) has long accepted paths and rejections; its
    chains avoid the draft head's exact ties that a tree's lower-ranked children would hit."""
    from aurora_jax.engine.trace import PrefillTrace, VerifyTrace

    target, draft = request.getfixturevalue(pair)[:2]
    spec = _spec(mode)
    got = []
    engine = Engine(target, draft, spec, max_slots=2, max_len=64, trace_sink=got.append)
    prompts = _prompts([5, 9, 4], 40, seed=8)
    run = engine.run([Request(p, 16, id=f"r{i}") for i, p in enumerate(prompts)])
    engine.traces.flush()
    assert engine.traces.dropped == 0
    rows = [r for t in got if isinstance(t, VerifyTrace) for r in t.rows()]
    n1, width = spec.nodes + 1, 64
    for i, res in enumerate(run.results):
        (pre,) = [t for t in got if isinstance(t, PrefillTrace) and t.request_id == res.id]
        mine = [r for r in rows if r.request_id == res.id]
        assert len(mine) == res.steps
        committed = [pre.first] + [int(x) for r in mine for x in r.committed]
        assert committed[: len(res.token_ids)] == res.token_ids
        seq = prompts[i] + res.token_ids
        aux, hidden = _padded_forward(target, [seq], n1, width)
        np.testing.assert_allclose(pre.aux, aux[0, : len(prompts[i])], atol=1e-4)
        np.testing.assert_allclose(pre.hidden, hidden[0, : len(prompts[i])], atol=1e-4,
                                   rtol=1e-4)
        pos = len(prompts[i])  # position of the first root
        for r in mine:
            c = pos  # this step's root position
            assert r.tree_tokens[0] == seq[c]
            for slot in r.path[: r.num_accepted + 1]:
                if pos < len(seq):
                    np.testing.assert_allclose(r.aux[slot], aux[0, pos], atol=1e-4,
                                               rtol=1e-4)
                pos += 1
            # Every node against a plain forward over its own context.
            ctx = _node_contexts(seq, c, r.tree_tokens, r.tree_parent)
            n_aux, n_hidden = _padded_forward(target, ctx, n1, width)
            last = np.arange(n1), np.array([len(x) for x in ctx]) - 1
            np.testing.assert_allclose(r.hidden, n_hidden[last], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(r.aux, n_aux[last], atol=1e-4, rtol=1e-4)
            # The tree and its draft log-probs against `propose` from the committed prefix.
            rows_tok = np.zeros((1, width), np.int32)
            rows_tok[0, :c] = seq[1: c + 1]
            rows_aux = np.zeros((1, width, *aux.shape[2:]), np.float32)
            rows_aux[0, :c] = aux[0, :c]
            tokens, parent, logp = _propose_afresh(
                target.graphdef, target.state, draft.graphdef, draft.state,
                jnp.asarray(rows_tok), jnp.asarray(rows_aux), jnp.int32(c), jnp.int32(seq[c]),
                spec)
            np.testing.assert_array_equal(r.tree_tokens, np.asarray(tokens))
            np.testing.assert_array_equal(r.tree_parent, np.asarray(parent))
            np.testing.assert_allclose(r.draft_logp, np.asarray(logp), atol=1e-4, rtol=1e-4)
        assert mine[0].tree_tokens[0] == pre.first  # the first root is the prefill's token
    accepted = [r.num_accepted for r in rows]
    if pair == "noisy":  # whole paths accepted, and rejections (nodes off the committed path)
        assert max(accepted) == spec.depth and min(accepted) < spec.depth


def test_target_only_mode_equals_reference(randoms, shared):
    from aurora_jax.speculative.config import SpecConfig

    target, _ = randoms
    prompts = _prompts([5, 9, 3], 40, seed=9)
    engine = Engine(target, None, SpecConfig(mode="off"), max_slots=2, max_len=64)
    run = engine.run([Request(p, 20) for p in prompts])
    assert [r.token_ids for r in run.results] == shared.target_only("randoms", prompts, 20)
    assert run.acceptance_length == 1.0


def test_jit_is_not_rebuilt_per_step(shared):
    """Steady state: repeated steps reuse one compiled program."""
    engine = shared.engine("randoms", "chain")
    state = engine.init_decode_state()
    state, _ = engine.generate(state)  # compiles the step unless an earlier test did
    compiled = engine.compilations
    for _ in range(3):
        state, _ = engine.generate(state)
    jax.block_until_ready(state.cache_len)
    assert engine.compilations == compiled


@pytest.mark.parametrize("mode", ["chain", "off"])
def test_precompile_builds_every_program_traffic_can_use(randoms, shared, mode):
    """After `precompile`, prompts of every length up to the longest the engine takes, admitted
    in groups of every size, a cancelled request and steps compile nothing more, and the
    programs run compiled ahead of use serve target-only's tokens."""
    from aurora_jax.speculative.config import SpecConfig

    target, draft = randoms
    spec = SpecConfig(mode="off") if mode == "off" else _spec(mode)
    engine = Engine(target, draft if spec.needs_draft else None, spec, max_slots=2, max_len=48)
    buckets = engine.prefill_buckets()
    # Groups of up to 2 requests, prompts of up to 47 tokens (64: a 47-token prompt's bucket).
    assert sorted({b for b, _ in buckets}) == [1, 2]
    assert sorted({t for _, t in buckets}) == [16, 32, 64]
    assert engine.precompile() == engine.compilations == 2 * len(buckets) + 2
    before = engine.compilations
    # Lengths 1 to 47, admitted in groups of 2 and 1 as slots free up.
    prompts = _prompts([1, 16, 17, 33, 47, 2, 40], 40, seed=12)
    run = engine.run([Request(p, 1 if len(p) > 40 else 6) for p in prompts])
    assert [r.token_ids for r in run.results] == [
        shared.target_only("randoms", [p], 1 if len(p) > 40 else 6)[0] for p in prompts]
    loop = engine.batcher()
    loop.submit(Request(prompts[0], 30))
    loop.step()
    loop.cancel(0, "abort")
    loop.run_until_idle()
    assert engine.compilations == before and engine.precompile() == 0


@pytest.mark.parametrize("mode", ["off", "tree"])
def test_the_step_reads_and_writes_the_cache_where_it_lies(randoms, mode):
    """The compiled step copies, transposes and reshapes nothing as large as one layer's KV
    cache: attention reads the cache in place and new entries are written in place (issue
    27; tests/test_tpu_compile.py checks the same of the TPU programs)."""
    from aurora_jax.accelerators.tpu_compile import cache_relayouts
    from aurora_jax.speculative.config import SpecConfig

    target, draft = randoms
    spec = SpecConfig(mode="off") if mode == "off" else _spec(mode)
    engine = Engine(target, draft if spec.needs_draft else None, spec, max_slots=2,
                    max_len=480)
    engine.generate(engine.init_decode_state())
    assert cache_relayouts(engine, engine.program("generate")) == []


def test_bad_input_is_refused_with_a_clear_error(randoms, shared):
    from aurora_jax.errors import CheckpointError, ConfigError, PromptError
    from aurora_jax.models.eagle3 import DraftConfig, init_draft

    target, draft = randoms
    other = init_draft(DraftConfig.for_target(tiny_cfg(hidden=32)))
    with pytest.raises(CheckpointError, match="hidden size"):
        Engine(target, other, _spec("tree"))
    with pytest.raises(ConfigError, match="needs a draft"):
        Engine(target, None, _spec("chain"))
    for bad, match in [(dict(mode="beam"), "mode"), (dict(mode="chain", depth=0), "depth"),
                       (dict(mode="tree", depth=17), "depth"),
                       (dict(mode="tree", depth=2, topk=2, num_draft_tokens=7), "num_draft"),
                       (dict(mode="tree", topk=0), "topk")]:
        from aurora_jax.speculative.config import SpecConfig

        with pytest.raises(ConfigError, match=match):
            SpecConfig(**bad)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-0.5)
    engine = shared.engine("randoms", "tree")
    with pytest.raises(PromptError, match="max_len"):
        engine.run([Request([5] * 10, 10), Request([5] * 60, 10)])
    with pytest.raises(PromptError, match="empty"):
        engine.run([Request([], 10)])
    with pytest.raises(ConfigError, match="structure, shape or dtype"):
        engine.set_draft(other.state)


def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(noisy, shared):
    """SamplingParams.seed keys a row's draws by its seed and position alone: the same seeded
    request gives the same tokens alone and beside other sampled requests; another seed
    gives other tokens."""
    engine = shared.engine("noisy", "tree", max_slots=6, max_len=128)
    prompt = _prompts([7], 40, seed=21)[0]
    hot = dict(temperature=20.0)  # the noisy target is very peaked (logit margin ~64)

    def run(seed, neighbours):
        reqs = [Request(prompt, 24, SamplingParams(**hot, seed=seed))]
        reqs += [Request(p, 24, SamplingParams(**hot)) for p in neighbours]
        return engine.run(reqs).results[0].token_ids

    alone = run(5, [])
    crowded = run(5, _prompts([4, 9, 6, 11], 40, seed=22))
    again = run(5, _prompts([8, 5], 40, seed=23))
    assert alone == crowded == again
    others = {tuple(run(s, [])) for s in (6, 7, 8)}
    assert len(others | {tuple(alone)}) > 1  # the seed matters
    with pytest.raises(Exception, match="seed"):
        SamplingParams(temperature=1.0, seed=-1)
