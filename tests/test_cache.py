"""Cached decoding equals a full forward; a padded batch equals each sequence alone."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rng_tokens

from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.transformer import forward, init_random

CFG = TargetConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=16, family="qwen3")
fwd = jax.jit(forward)


@pytest.fixture(scope="module")
def model():
    return init_random(CFG, seed=1)


def _full(model, ids):
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, aux, hidden, _ = fwd(*model, jnp.asarray(ids), pos, causal_mask(jnp.full((b,), t), t))
    return np.asarray(logits), np.asarray(aux), np.asarray(hidden)


@pytest.mark.parametrize("chunks", [[12, 1, 1, 1, 1], [5, 3, 4, 4], [1] * 16])
def test_incremental_decoding_equals_full_forward(model, chunks):
    ids = rng_tokens((2, sum(chunks)), CFG.vocab_size)
    ref_logits, ref_aux, _ = _full(model, ids)
    cache = KVCache.zeros(CFG, 2, 32)
    cache_len = jnp.zeros((2,), jnp.int32)
    got, got_aux, start = [], [], 0
    for n in chunks:
        block = jnp.asarray(ids[:, start:start + n])
        pos = cache_len[:, None] + jnp.arange(n)[None]
        logits, aux, _, cache = fwd(*model, block, pos, causal_mask(jnp.full((2,), n), n), cache,
                                    cache_len)
        got.append(np.asarray(logits))
        got_aux.append(np.asarray(aux))
        cache_len = cache_len + n
        start += n
    np.testing.assert_allclose(np.concatenate(got, 1), ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(got_aux, 1), ref_aux, rtol=1e-5, atol=1e-5)


def test_per_sequence_positions(model):
    """Two sequences at different cache lengths decode in one call, each as if alone."""
    a, b = rng_tokens((1, 9), CFG.vocab_size, 1), rng_tokens((1, 4), CFG.vocab_size, 2)
    ref_a, _, _ = _full(model, a)
    ref_b, _, _ = _full(model, b)
    cache = KVCache.zeros(CFG, 2, 16)
    prompt = np.zeros((2, 8), np.int32)
    prompt[0], prompt[1, :3] = a[0, :8], b[0, :3]
    lengths = jnp.array([8, 3])
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    _, _, _, cache = fwd(*model, jnp.asarray(prompt), pos, causal_mask(lengths, 8), cache,
                         jnp.zeros((2,), jnp.int32))
    nxt = jnp.array([[a[0, 8]], [b[0, 3]]])
    logits, *_ = fwd(*model, nxt, lengths[:, None], jnp.ones((2, 1, 1), bool), cache, lengths)
    np.testing.assert_allclose(np.asarray(logits)[0, 0], ref_a[0, 8], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits)[1, 0], ref_b[0, 3], rtol=1e-5, atol=1e-5)


def test_padded_batch_equals_each_alone(model):
    lengths = [11, 4, 7]
    seqs = [rng_tokens((1, n), CFG.vocab_size, seed=n) for n in lengths]
    batch = np.zeros((3, 16), np.int32)
    for i, s in enumerate(seqs):
        batch[i, : s.shape[1]] = s[0]
    pos = jnp.broadcast_to(jnp.arange(16), (3, 16))
    logits, aux, hidden, _ = fwd(*model, jnp.asarray(batch), pos,
                                 causal_mask(jnp.asarray(lengths), 16))
    for i, s in enumerate(seqs):
        ref_logits, ref_aux, ref_hidden = _full(model, s)
        n = s.shape[1]
        np.testing.assert_allclose(np.asarray(logits)[i, :n], ref_logits[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(aux)[i, :n], ref_aux[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(hidden)[i, :n], ref_hidden[0], rtol=1e-5, atol=1e-5)


def test_aux_layers_are_the_configured_layer_outputs():
    cfg = TargetConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=8,
                       num_heads=4, num_kv_heads=2, head_dim=8)
    assert cfg.resolved_aux_layers == (1, 3, 4)  # EAGLE-3 default: 1, L//2-1, L-4
    # Shallow models spread the three layers instead of repeating one.
    assert dataclasses.replace(cfg, num_layers=3).resolved_aux_layers == (0, 1, 2)
    graphdef, state = init_random(cfg, seed=0)
    ids = jnp.asarray(rng_tokens((1, 6), 50))
    pos = jnp.arange(6)[None]
    mask = causal_mask(jnp.array([6]), 6)
    _, aux, _, _ = fwd(graphdef, state, ids, pos, mask)
    # Truncating the model after layer 3 must reproduce aux slot 1 (the output of layer 3).
    cut = jax.tree.map(lambda x: x, state)
    for i in range(4, 8):
        del cut["layers"][i]
    from flax import nnx

    from aurora_jax.models.transformer import Transformer

    small_cfg = TargetConfig(**{**cfg.__dict__, "num_layers": 4, "aux_layers": (3,)})
    small = nnx.eval_shape(lambda: Transformer(small_cfg, rngs=nnx.Rngs(0)))
    small_def, _ = nnx.split(small)
    _, aux_small, _, _ = fwd(small_def, cut, ids, pos, mask)
    np.testing.assert_allclose(np.asarray(aux)[:, :, 1], np.asarray(aux_small)[:, :, 0],
                               rtol=1e-5, atol=1e-5)


def test_prefill_into_empty_cache_equals_prefill_against_zero_length_cache(model):
    ids = jnp.asarray(rng_tokens((2, 7), CFG.vocab_size, seed=9))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    mask = causal_mask(jnp.array([7, 5]), 7)
    a_logits, _, _, a_cache = fwd(*model, ids, pos, mask, KVCache.zeros(CFG, 2, 16))
    b_logits, _, _, b_cache = fwd(*model, ids, pos, mask, KVCache.zeros(CFG, 2, 16),
                                  jnp.zeros((2,), jnp.int32))
    np.testing.assert_allclose(np.asarray(a_logits), np.asarray(b_logits), rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree.leaves(a_cache), jax.tree.leaves(b_cache), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
