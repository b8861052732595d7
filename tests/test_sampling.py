"""Sampling follows the filtered target distribution (temperature, top-k, top-p)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora_jax.errors import ConfigError
from aurora_jax.sampling import SamplingParams, SamplingRows, filtered_logprobs, sample


def _reference(logits, t, p, k):
    """Loop-and-sort reference of the filtered distribution."""
    x = logits / (t if t > 0 else 1.0)
    order = np.argsort(-x, kind="stable")
    keep = np.zeros_like(x, bool)
    keep[order[: (k if k > 0 else len(x))]] = True
    probs = np.exp(x - x[keep].max()) * keep
    probs /= probs.sum()
    mass = 0.0
    nucleus = np.zeros_like(keep)
    for i in order:
        if not keep[i] or mass >= p:
            continue
        nucleus[i] = True
        mass += probs[i]
    out = np.exp(x - x[nucleus].max()) * nucleus
    return out / out.sum()


@pytest.mark.parametrize("t,p,k", [(1.0, 1.0, 0), (0.7, 1.0, 5), (1.3, 0.8, 0), (1.0, 0.5, 3),
                                   (0.5, 0.95, 20)])
def test_filtered_distribution_matches_reference(t, p, k):
    logits = np.random.RandomState(0).randn(3, 40).astype(np.float32) * 2
    got = np.exp(np.asarray(filtered_logprobs(
        jnp.asarray(logits), SamplingRows.stack([SamplingParams(t, p, k)] * 3))))
    for row in range(3):
        np.testing.assert_allclose(got[row], _reference(logits[row], t, p, k), atol=1e-5)


def test_samples_converge_to_filtered_distribution():
    logits = np.random.RandomState(1).randn(1, 12).astype(np.float32)
    t, p, k = 0.8, 0.9, 8
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)
    draw = jax.jit(jax.vmap(lambda key: sample(key, jnp.asarray(logits),
                                               SamplingRows.stack([SamplingParams(t, p, k)]))[0]))
    counts = np.bincount(np.asarray(draw(keys)), minlength=12) / n
    expected = _reference(logits[0], t, p, k)
    assert counts[expected == 0].sum() == 0  # filtered tokens never appear
    # 5 standard errors of a binomial proportion at n=40000.
    np.testing.assert_array_less(np.abs(counts - expected),
                                 5 * np.sqrt(expected * (1 - expected) / n) + 1e-9)


def test_mixed_greedy_and_sampled_rows():
    logits = jnp.asarray(np.random.RandomState(2).randn(2, 30).astype(np.float32))
    out = sample(jax.random.key(3), logits,
                 SamplingRows.stack([SamplingParams(0.0), SamplingParams(1.0, top_k=1)]))
    argmax = np.asarray(jnp.argmax(logits, -1))
    assert out[0] == argmax[0]  # greedy row
    assert out[1] == argmax[1]  # top-1 sampling is argmax too


def test_invalid_settings_are_named():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)
