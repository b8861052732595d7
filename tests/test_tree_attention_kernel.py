"""The Pallas tree-attention kernel (interpret mode on CPU) equals its jnp reference on random
shapes, ragged cache lengths, tree masks of every shape and GQA ratios; the engine's greedy
output is the same through the kernel as through the reference. Block sizes are validated on
construction, every public wrapper names a shape mismatch, and "auto" dispatch drops a kernel
that fails its self-check and keeps one that passes."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from spec_models import EOS, copycat_pair, random_pair, tiny_cfg

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.speculative.tree import ancestor_mask
from pallas_kernels import BlockSizes, dispatch
from pallas_kernels.dispatch import attention, resolve
from pallas_kernels.tree_attention import tree_attention, tree_attention_reference
from pallas_kernels.tree_attention_tpu import tree_attention_tpu


def test_interpret_mode_poisons_outputs():
    """What the tests below rely on: an element the kernel does not write comes back NaN."""
    def write_half(x_ref, o_ref):
        o_ref[:4] = x_ref[:4]

    out = pl.pallas_call(write_half, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
                         interpret=True)(jnp.ones(8))
    assert np.all(np.asarray(out[:4]) == 1) and np.all(np.isnan(np.asarray(out[4:])))


def _parents(kind: str, n: int, rs) -> np.ndarray:
    """Parent arrays (slot 0 is the root, parents before children)."""
    if kind == "chain":
        return np.arange(-1, n - 1)
    if kind == "star":
        return np.array([-1] + [0] * (n - 1))
    if kind == "deep":  # two long branches
        return np.array([-1] + [0, 0] + [i - 2 for i in range(3, n)])
    return np.array([-1] + [int(rs.randint(i)) for i in range(1, n)])  # "wide": random


def _inputs(rs, b, t, j, nq, nk, d, s, dtype, tree, lens):
    f = lambda *shape: jnp.asarray(rs.randn(*shape), dtype)  # noqa: E731
    if j == t:
        parent = np.stack([_parents(tree, t, rs) for _ in range(b)])
        mask = ancestor_mask(jnp.asarray(parent))
    else:  # a draft's side buffer: node t sees a random subset of J slots, itself included
        mask = jnp.asarray(rs.rand(b, t, j) < 0.4).at[:, jnp.arange(t), jnp.arange(t)].set(True)
    return (f(b, t, nq, d), f(b, j, nk, d), f(b, j, nk, d), mask, f(b, nk, s, d),
            f(b, nk, s, d), jnp.asarray(lens, jnp.int32))


CASES = [  # b, t, j, q heads, kv heads, d, s, tree, cache lengths, block_s
    (2, 5, 5, 4, 2, 16, 40, "chain", [0, 40], 8),
    (3, 13, 13, 8, 2, 32, 64, "wide", [63, 1, 17], 16),
    (1, 9, 9, 4, 4, 16, 24, "star", [24], 128),  # block_s shrinks to a divisor of S
    (2, 17, 17, 6, 1, 64, 96, "deep", [50, 96], 32),  # GQA 6:1, rows pad 102 -> 128
    (2, 4, 11, 4, 2, 16, 32, None, [9, 0], 8),  # draft side buffer: J > T
]


KERNELS = {"gpu-style": tree_attention, "tpu": tree_attention_tpu}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[7]}-{c[2]}x{c[6]}" for c in CASES])
def test_kernel_equals_reference(case, dtype, kernel):
    """Both kernels (the GPU-style one in Pallas interpret mode, the TPU one in the TPU
    interpret mode, which also simulates its HBM-to-VMEM copies)."""
    b, t, j, nq, nk, d, s, tree, lens, block_s = case
    rs = np.random.RandomState(CASES.index(case) + (100 if dtype == "bfloat16" else 0))
    args = _inputs(rs, b, t, j, nq, nk, d, s, jnp.dtype(dtype), tree, lens)
    out = KERNELS[kernel](*args, blocks=BlockSizes(block_s=block_s), interpret=True)
    ref = tree_attention_reference(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(out).all()  # every element written (see the poisoning test)
    if dtype == "float32":
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_sees_only_the_prefix_below_cache_len(kernel):
    """Slots at or above cache_len must not matter: filling them with huge values changes
    nothing (the kernel never reads a block entirely beyond the length)."""
    rs = np.random.RandomState(3)
    args = list(_inputs(rs, 2, 5, 5, 4, 2, 16, 64, jnp.float32, "wide", [10, 33]))
    fn = functools.partial(KERNELS[kernel], blocks=BlockSizes(block_s=8), interpret=True)
    base = fn(*args)
    pos = jnp.arange(64)[None, None, :, None]  # slot s of a [B, K, S, D] cache
    for i in (4, 5):
        args[i] = jnp.where(pos >= args[6][:, None, None, None], 1e4, args[i])
    np.testing.assert_array_equal(fn(*args), base)


@pytest.mark.parametrize("bad", [0, -8, 24, 100, 8.0, True, "128", None])
def test_block_sizes_reject_what_the_kernels_cannot_tile(bad):
    with pytest.raises(ValueError, match=re.escape(
            f"BlockSizes.block_s must be a positive power of two, got {bad!r}")):
        BlockSizes(block_s=bad)


def test_block_sizes_are_a_static_config():
    """Frozen and hashable (a jit static argument); a cache block shrinks to divide S."""
    blocks = BlockSizes(block_s=128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        blocks.block_s = 64
    assert hash(blocks) == hash(BlockSizes(block_s=128))
    assert [blocks.cache_block(s) for s in (256, 128, 96, 40, 24, 7)] == [128, 128, 32, 8, 8, 1]


OPERANDS = ("q", "k_new", "v_new", "block_mask", "k_cache", "v_cache", "cache_len")
WRAPPERS = {
    "tree_attention": functools.partial(tree_attention, interpret=True),
    "tree_attention_tpu": functools.partial(tree_attention_tpu, interpret=True),
    "tree_attention_reference": tree_attention_reference,
    "attention": attention,
}
# One operand replaced (shape, dtype; None: left out) in a problem with B=2, T=4, J=5, Q=8,
# K=2, D=16, S=16, and what the error says about it.
WRONG = {
    "head-dim": ("k_new", (2, 5, 2, 32), None, "k_new has head dim 32 but q has 16 "
                 "(q [B,T,Q,D]=(2,4,8,16), k_new [B,J,K,D]=(2,5,2,32))"),
    "rank": ("q", (2, 4, 128), None, "q must have rank 4, got q [B,T,Q,D]=(2,4,128)"),
    "kv-heads": ("v_new", (2, 5, 1, 16), None, "v_new has kv heads 1 but k_new has 2"),
    "mask-keys": ("block_mask", (2, 4, 6), None, "block_mask has new keys 6 but k_new has 5"),
    "mask-queries": ("block_mask", (2, 3, 5), None, "block_mask has queries 3 but q has 4"),
    "cache-slots": ("v_cache", (2, 2, 8, 16), None, "v_cache has cache slots 8 but k_cache "
                    "has 16"),
    "lengths": ("cache_len", (3,), None, "cache_len has batch 3 but q has 2"),
    "groups": ("q", (2, 4, 7, 16), None, "q's 7 query heads are not a multiple of k_new's 2 "
               "kv heads"),
    "float-mask": ("block_mask", (2, 4, 5), "float32", "block_mask must be bool or integer"),
    "float-lengths": ("cache_len", (2,), "float32", "cache_len must be integer, got float32"),
    "no-lengths": ("cache_len", None, None, "attending to a cache needs k_cache, v_cache and "
                   "cache_len; cache_len missing"),
    "no-v-cache": ("v_cache", None, None, "attending to a cache needs k_cache, v_cache and "
                   "cache_len; v_cache missing"),
}


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("wrong", WRONG)
def test_public_wrappers_name_a_shape_mismatch(wrong, wrapper):
    """Each public entry point checks its operands at trace time and says which operand
    disagrees with which, on what axis, with both shapes."""
    operand, shape, dtype, says = WRONG[wrong]
    args = dict(zip(OPERANDS, _inputs(np.random.RandomState(7), 2, 4, 5, 8, 2, 16, 16,
                                      jnp.float32, None, [3, 16]), strict=True))
    args[operand] = (None if shape is None
                     else jnp.zeros(shape, dtype or args[operand].dtype))
    with pytest.raises(ValueError, match=re.escape(f"{wrapper}: {says}")):
        WRAPPERS[wrapper](*args.values())


def test_auto_falls_back_to_the_reference_when_the_kernel_cannot_run(caplog):
    """"auto" checks a kernel once before using it; on a backend where it cannot lower (here:
    the compiled kernel on CPU) it logs why and serves with the reference."""
    if jax.default_backend() != "cpu":
        pytest.skip("needs a backend the compiled kernel does not support")
    from pallas_kernels.dispatch import kernel_works

    kernel_works.cache_clear()
    with caplog.at_level("WARNING"):
        assert kernel_works("gpu") is False
    assert "using the jnp reference" in caplog.text


def test_dispatch_picks_the_reference_on_cpu_and_without_a_cache():
    assert resolve("auto") == ("pallas" if jax.default_backend() == "gpu" else "reference")
    with pytest.raises(ValueError, match="attention implementation"):
        resolve("triton")
    rs = np.random.RandomState(4)
    q, k, v, mask, *_ = _inputs(rs, 1, 4, 4, 4, 2, 16, 8, jnp.float32, "chain", [0])
    np.testing.assert_array_equal(attention(q, k, v, mask, impl="interpret"),
                                  tree_attention_reference(q, k, v, mask))


def test_a_long_call_without_a_cache_runs_in_pieces_of_queries_equal_to_the_whole(monkeypatch):
    """Prefill from an empty cache (and training) with more than QUERY_CHUNK queries runs one
    piece of queries at a time (a loop, so that one piece's float32 scores are live at once:
    an 8B prefill of 1024 tokens fits v5e that way), and the pieces equal the whole call,
    values and gradients, for causal GQA with a ragged length; a length that does not divide
    runs whole."""
    from aurora_jax.models.attention import causal_mask

    monkeypatch.setattr(dispatch, "QUERY_CHUNK", 8)
    rs = np.random.RandomState(7)
    b, t, nq, nk, d = 2, 32, 4, 2, 16
    q, k, v = (jnp.asarray(rs.randn(b, t, n, d), jnp.float32) for n in (nq, nk, nk))
    mask = causal_mask(jnp.asarray([32, 19]), t)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, mask) ** 2).sum()

    assert "scan" in str(jax.make_jaxpr(attention)(q, k, v, mask))
    np.testing.assert_allclose(attention(q, k, v, mask), tree_attention_reference(q, k, v, mask),
                               rtol=1e-6, atol=1e-6)
    grads = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(tree_attention_reference), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    odd = causal_mask(jnp.asarray([30, 19]), 30)
    assert "scan" not in str(jax.make_jaxpr(attention)(q[:, :30], k[:, :30], v[:, :30], odd))


@pytest.mark.parametrize("lens", [[3, 0], [16, 5], [17, 16], [40, 63], [64, 1]],
                         ids=["first", "edge", "past-edge", "last", "mixed"])
def test_the_reference_reads_only_the_live_slots_and_equals_the_whole_cache(monkeypatch, lens):
    """With a cache, the reference attends over the fewest of LIVE_BUCKET, twice that, ...,
    S slots that hold every sequence's cache_len (one branch each, picked at run time), and
    the result equals attending over the whole cache: a step pays for the tokens a sequence
    holds, not the slots its cache could hold. Lengths at a bucket's edge, one past it, in
    the last bucket and far apart in one batch; a tree mask over 3 new tokens, GQA 4:2."""
    monkeypatch.setattr(dispatch, "LIVE_BUCKET", 16)
    assert dispatch.live_sizes(64) == [16, 32, 64] and dispatch.live_sizes(16) == [16]
    rs = np.random.RandomState(3)
    b, t, s, nq, nk, d = 2, 3, 64, 4, 2, 8
    q = jnp.asarray(rs.randn(b, t, nq, d), jnp.float32)
    k_new, v_new = (jnp.asarray(rs.randn(b, t, nk, d), jnp.float32) for _ in range(2))
    k_cache, v_cache = (jnp.asarray(rs.randn(b, nk, s, d), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool))[None].repeat(b, 0))
    args = (q, k_new, v_new, mask, k_cache, v_cache, jnp.asarray(lens, jnp.int32))

    fn = jax.jit(functools.partial(attention, impl="reference"))
    assert "cond" in str(jax.make_jaxpr(fn)(*args))
    want = tree_attention_reference(*args)
    np.testing.assert_allclose(fn(*args), want, rtol=1e-6, atol=1e-6)
    # Slots past the branch that should run are never read: NaN there would poison the sum.
    live = min(n for n in dispatch.live_sizes(s) if n >= max(lens))
    poisoned = v_cache.at[:, :, live:].set(jnp.nan)
    np.testing.assert_allclose(fn(*args[:5], poisoned, args[6]), want, rtol=1e-6, atol=1e-6)


@pytest.fixture
def on_backend(monkeypatch):
    """Makes dispatch see the given backend, its once-per-process kernel self-check
    forgotten before and after the test."""
    dispatch.kernel_works.cache_clear()
    yield lambda name: monkeypatch.setattr(jax, "default_backend", lambda: name)
    dispatch.kernel_works.cache_clear()


def _zeros_kernel(q_BxTxQxD, *args, **kwargs):
    """A kernel that runs but computes nothing."""
    return jnp.zeros_like(q_BxTxQxD)


def _failing_kernel(*args, **kwargs):
    """A kernel that does not lower (a jax whose Pallas backend changed, say)."""
    raise NotImplementedError("no lowering rule")


@pytest.mark.parametrize("broken, reason", [(_zeros_kernel, "ValueError: max error"),
                                            (_failing_kernel, "NotImplementedError: no lowering")],
                         ids=["wrong-result", "no-lowering"])
def test_auto_falls_back_to_the_reference_when_the_kernel_is_wrong(broken, reason, on_backend,
                                                                   monkeypatch, caplog):
    """On a GPU, "auto" runs the kernel once against the reference before using it; a kernel
    that is wrong or fails is logged with the reason and the reference serves instead (with
    the broken kernel, any other answer would be zeros or an exception)."""
    on_backend("gpu")
    monkeypatch.setattr(dispatch, "tree_attention", broken)
    args = _inputs(np.random.RandomState(8), 2, 5, 5, 4, 2, 16, 32, jnp.float32, "wide", [7, 32])
    with caplog.at_level("WARNING", logger=dispatch.log.name):
        assert resolve("auto") == "reference"
        out = attention(*args, impl="auto")
    assert f"does not work on gpu ({reason}" in caplog.text
    assert "using the jnp reference" in caplog.text
    np.testing.assert_array_equal(out, tree_attention_reference(*args))


def test_auto_keeps_a_kernel_that_passes_its_self_check(on_backend, monkeypatch, caplog):
    """The same path with a working kernel (the GPU-style kernel in interpret mode, as this
    runs on CPU): the self-check passes silently and attention runs the kernel."""
    on_backend("gpu")
    calls = []

    def kernel(*args, interpret=False, **kwargs):
        calls.append(kwargs)
        return tree_attention(*args, interpret=True, **kwargs)

    monkeypatch.setattr(dispatch, "tree_attention", kernel)
    args = _inputs(np.random.RandomState(9), 2, 5, 5, 4, 2, 16, 32, jnp.float32, "wide", [7, 32])
    with caplog.at_level("WARNING", logger=dispatch.log.name):
        assert resolve("auto") == "pallas"
        out = attention(*args, impl="auto")
    assert not caplog.records
    assert len(calls) == 2  # the self-check, then this call
    np.testing.assert_allclose(np.asarray(out), np.asarray(tree_attention_reference(*args)),
                               rtol=1e-5, atol=1e-5)


def test_auto_on_tpu_takes_the_reference_for_shapes_mosaic_cannot_tile(on_backend,
                                                                       monkeypatch):
    """On a TPU the kernel (here in TPU interpret mode) passes its self-check and serves
    head_dim 128; head_dim 16 breaks Mosaic's (8, 128) tiling, so the reference serves it."""
    on_backend("tpu")
    calls = []

    def kernel(*args, interpret=False, **kwargs):
        calls.append(args[0].shape)
        return tree_attention_tpu(*args, interpret=True, **kwargs)

    monkeypatch.setattr(dispatch.tpu, "tree_attention_tpu", kernel)
    rs = np.random.RandomState(10)
    for d in (128, 16):
        args = _inputs(rs, 2, 5, 5, 4, 2, d, 32, jnp.float32, "wide", [7, 32])
        np.testing.assert_allclose(np.asarray(attention(*args, impl="auto")),
                                   np.asarray(tree_attention_reference(*args)),
                                   rtol=1e-5, atol=1e-5)
    assert [shape[-1] for shape in calls] == [128, 128]  # the self-check, then d = 128 only


@pytest.mark.parametrize("pair", ["random", "copycat"])
def test_engine_output_is_the_same_through_the_kernel(pair):
    """Greedy speculative decoding (tree mode: catch-up, drafting against the draft cache,
    verification against the target cache) through the interpret-mode kernel equals the
    reference path token for token, with the same acceptance. The random target's output
    depends on attention everywhere; the copycat pair (a bigram target, so attention barely
    matters there) makes accepted paths long, so multi-token commits go through the kernel."""
    spec = SpecConfig(mode="tree", depth=3, topk=2, num_draft_tokens=5)
    rs = np.random.RandomState(5)
    prompts = [rs.randint(3, 40, size=n).tolist() for n in (5, 9, 3)]
    runs = {}
    for impl in ("reference", "interpret"):
        cfg = dataclasses.replace(tiny_cfg(eos=() if pair == "random" else (EOS,)),
                                  attention=impl)
        target, draft = (random_pair(cfg, seed=2) if pair == "random"
                         else copycat_pair(cfg)[:2])
        assert draft.cfg.attention == impl
        engine = Engine(target, draft, spec, max_slots=2, max_len=40)
        runs[impl] = engine.run([Request(p, 12) for p in prompts])
    ref, ker = runs["reference"], runs["interpret"]
    assert [r.token_ids for r in ker.results] == [r.token_ids for r in ref.results]
    assert ker.acceptance_length == ref.acceptance_length
    if pair == "copycat":
        assert ker.acceptance_length > 2


def test_kernel_benchmark_runs_on_cpu_in_interpret_mode(tmp_path):
    """scripts/bench_kernels.py --small: every implementation agrees with the reference and
    is timed (the numbers themselves mean nothing in interpret mode)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_kernels.py"
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, str(script), "--small", "--repeats", "1", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and not [k for k in rows[0] if k.endswith("_error")]
    assert all(rows[0][f"{n}_us"] > 0 for n in ("kernel", "reference", "xla_dpa"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_kernel_equals_reference_on_an_accelerator(dtype):
    """On a GPU (Triton) or TPU (Mosaic) the backend's kernel compiles and matches the
    reference at a realistic shape: head_dim 128, 32 query and 8 KV heads, a 64-node tree,
    ragged caches up to 4k."""
    rs = np.random.RandomState(11)
    args = _inputs(rs, 4, 64, 64, 32, 8, 128, 4096, jnp.dtype(dtype), "wide",
                   [4096, 1, 1000, 3000])
    with jax.default_matmul_precision("highest"):  # the reference in true fp32, not TF32
        out = np.asarray(attention(*args, impl="pallas"), np.float32)
        ref = np.asarray(tree_attention_reference(*args), np.float32)
    tol = 1e-5 if dtype == "float32" else 1e-2
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)
