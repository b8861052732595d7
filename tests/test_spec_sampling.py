"""Speculative sampling is lossless: sequences sampled through the engine follow the target's
exact (filtered) distribution, chain and tree, whatever the draft proposes."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from spec_models import random_pair, tiny_cfg

from aurora_jax.engine.engine import Engine, Request
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.transformer import forward
from aurora_jax.sampling import SamplingParams, SamplingRows, filtered_logprobs
from aurora_jax.speculative.config import SpecConfig

V, NEW, SAMPLES = 8, 3, 4096
PROMPT = [3, 5, 4, 6]


@pytest.fixture(scope="module")
def pair():
    cfg = tiny_cfg(vocab=V, eos=(), hidden=32)
    target, draft = random_pair(cfg, seed=2)
    # Sharpen the target so its distributions are far from uniform (a test with power).
    head = target.state["lm_head"]["kernel"]
    head.set_value(head[...] * 25.0)
    return target, draft


def exact_distribution(target, sp: SamplingParams, prompt=PROMPT) -> np.ndarray:
    """p(x1, x2, x3 | prompt) under the filtered target, by enumerating every continuation."""
    conts = np.array(list(itertools.product(range(V), repeat=NEW - 1)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
    b, t = seqs.shape
    logits, *_ = jax.jit(forward)(target.graphdef, target.state, jnp.asarray(seqs),
                                  jnp.broadcast_to(jnp.arange(t), (b, t)),
                                  causal_mask(jnp.full((b,), t), t))
    p = np.exp(np.asarray(filtered_logprobs(
        logits.reshape(b * t, V), SamplingRows.stack([sp] * (b * t))))).reshape(b, t, V)
    joint = np.zeros((V,) * NEW)
    for row, (x1, x2) in enumerate(conts):
        p1, p2, p3 = p[row, len(prompt) - 1], p[row, len(prompt)], p[row, len(prompt) + 1]
        joint[x1, x2] = p1[x1] * p2[x2] * p3
    return joint


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(statistic, threshold at significance 5e-4); bins expecting < 5 are pooled."""
    expected = probs.ravel() * counts.sum()
    big = expected >= 5
    obs = np.append(counts.ravel()[big], counts.ravel()[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = keep.sum() - 1
    z = 3.29  # Wilson-Hilferty approximation of the chi-square quantile
    return stat, df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("mode,sp", [
    ("chain", SamplingParams(temperature=0.8, top_k=5)),
    ("tree", SamplingParams(temperature=1.0, top_k=6, top_p=0.95)),
    ("ngram", SamplingParams(temperature=0.9, top_k=6)),
])
def test_sampled_sequences_follow_the_target(pair, mode, sp):
    target, draft = pair
    spec = {"chain": SpecConfig(mode="chain", depth=3), "ngram": SpecConfig(mode="ngram", depth=3),
            "tree": SpecConfig(mode="tree", depth=3, topk=3, num_draft_tokens=7)}[mode]
    engine = Engine(target, draft if spec.needs_draft else None, spec, max_slots=512,
                    max_len=16, eos_ids=(), seed=7)
    prompt = PROMPT
    if mode == "ngram":  # proposals come from repeats: the target's greedy path repeats itself
        from aurora_jax.engine.target_only import TargetGenerator

        (c,) = TargetGenerator(target, eos_ids=()).generate([PROMPT], 9).completions
        prompt = PROMPT + c.token_ids
    run = engine.run([Request(prompt, NEW, sp) for _ in range(SAMPLES)])
    counts = np.zeros((V,) * NEW)
    for r in run.results:
        counts[tuple(r.token_ids)] += 1
    # Draft tokens were accepted, so the speculative path produced the tokens being tested.
    assert sum(r.accepted for r in run.results) > SAMPLES // 4
    stat, threshold = chi_square(counts, exact_distribution(target, sp, prompt))
    assert stat < threshold, (stat, threshold)
    # The same test tells apart a distribution that is only slightly off (temperature 1.1x).
    wrong = SamplingParams(sp.temperature * 1.1, sp.top_p, sp.top_k)
    assert chi_square(counts, exact_distribution(target, wrong, prompt))[0] > threshold
