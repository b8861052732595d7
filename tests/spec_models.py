"""Tiny target/draft pairs for engine tests.

`copycat_pair` builds a target whose greedy next token is a fixed map f of the current token
(a bigram model: its attention and MLP outputs are zero, so the residual stream is the token
embedding), and an EAGLE-3 draft wired to reproduce f exactly: fc passes the first aux state
(the previous token's embedding) through, and the draft layer's MLP maps the embedding of x to
the embedding of f(x), so every draft step advances one token along the target's greedy path.
Embeddings are orthonormal, which makes the wiring exact rather than approximate. With some
tokens mapped to the stop token, the target's greedy paths run into it inside accepted paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.models.config import TargetConfig
from aurora_jax.models.eagle3 import Draft, DraftConfig, init_draft
from aurora_jax.models.sharding import make_mesh
from aurora_jax.models.transformer import Target, init_random

EOS = 1


def tiny_cfg(vocab=40, eos=(EOS,), layers=2, hidden=64) -> TargetConfig:
    return TargetConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                        num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                        eos_token_ids=eos, max_position_embeddings=512)


def as_target(cfg: TargetConfig, graphdef, state) -> Target:
    return Target(cfg, graphdef, state, make_mesh(tp=1, devices=jax.devices()[:1]), "float32")


def random_pair(cfg: TargetConfig, seed=0) -> tuple[Target, Draft]:
    target = as_target(cfg, *init_random(cfg, seed=seed))
    return target, init_draft(DraftConfig.for_target(cfg), seed=seed + 100)


def _set(state, path, value):
    node = state
    for p in path[:-1]:
        node = node[p]
    leaf = node[path[-1]]
    leaf.set_value(jnp.asarray(value, leaf[...].dtype))


def copycat_pair(cfg: TargetConfig, seed=0, eos_sources=2, f=None
                 ) -> tuple[Target, Draft, np.ndarray]:
    """(target, draft, f) as described above; f[x] is the target's greedy successor of x
    (random unless given)."""
    v, h = cfg.vocab_size, cfg.hidden_size
    assert v <= h and v <= cfg.intermediate_size
    rs = np.random.RandomState(seed)
    if f is None:
        f = rs.randint(3, v, size=v)
        f[rs.choice(np.arange(3, v), eos_sources, replace=False)] = EOS
    q, _ = np.linalg.qr(rs.randn(h, h))
    emb = q[:v] * 2.0  # orthogonal rows of equal norm
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    head = unit.T @ np.eye(v)[f] * 8.0  # logits(x) peak at f(x)

    graphdef, state = init_random(cfg, seed=seed)
    _set(state, ("embed",), emb)
    _set(state, ("norm", "weight"), np.ones(h))
    _set(state, ("lm_head", "kernel"), head)
    for i in range(cfg.num_layers):
        _set(state, ("layers", i, "attn", "o_proj", "kernel"), np.zeros((h, h)))
        _set(state, ("layers", i, "mlp", "down_proj", "kernel"),
             np.zeros((cfg.intermediate_size, h)))
    target = as_target(cfg, graphdef, state)

    draft = init_draft(DraftConfig.for_target(cfg), seed=seed + 1)
    ds = draft.state
    fc = np.zeros((3 * h, h))
    fc[:h] = np.eye(h)  # pass the first aux state (the embedding) through
    _set(ds, ("fc", "kernel"), fc)
    _set(ds, ("midlayer", "self_attn", "o_proj", "kernel"), np.zeros((h, h)))
    _set(ds, ("midlayer", "post_attention_layernorm", "weight"), np.ones(h))
    _set(ds, ("norm", "weight"), np.ones(h))
    _set(ds, ("lm_head", "kernel"), head)
    # MLP: hidden unit x fires only for the embedding of x (orthogonality makes the others
    # exactly zero) and writes emb[f(x)] - emb[x] into the residual stream.
    alpha, f_dim = 12.0, cfg.intermediate_size
    gate = np.zeros((h, f_dim))
    gate[:, :v] = unit.T * alpha / np.sqrt(h)  # the norm scales a unit vector to sqrt(h)
    act = alpha / (1 + np.exp(-alpha)) * alpha  # silu(alpha) * alpha
    down = np.zeros((f_dim, h))
    down[:v] = (emb[f] - emb) / act
    _set(ds, ("midlayer", "mlp", "gate_proj", "kernel"), gate)
    _set(ds, ("midlayer", "mlp", "up_proj", "kernel"), gate)
    _set(ds, ("midlayer", "mlp", "down_proj", "kernel"), down)
    return target, draft, f


def greedy_path(f: np.ndarray, start: int, n: int) -> list[int]:
    out, x = [], start
    for _ in range(n):
        x = int(f[x])
        out.append(x)
    return out


def swap_state(draft: Draft, seed: int) -> nnx.State:
    """Params of another random draft of the same structure (for hot-swap tests)."""
    return init_draft(draft.cfg, seed=seed).state


def noisy_copycat_pair(cfg: TargetConfig, seed=0, noise=2.5, wrong=0.25
                       ) -> tuple[Target, Draft]:
    """A draft right on most tokens and wrong on some, for a target whose attention matters.

    From the copycat pair: the target's attention is switched back on (random output
    projections scaled by `noise`), so its greedy successor is f(x) on most tokens but not
    where attention over the context tips the argmax, and a wrong cache entry changes its
    output; the draft's head predicts a map g that differs from f on a `wrong` share of the
    tokens, and its chain then runs on from the wrong token. Acceptance varies from step to
    step: mid-path rejections, and bonus tokens taken at every depth."""
    v, h = cfg.vocab_size, cfg.hidden_size
    rs = np.random.RandomState(seed + 7)
    order = 3 + rs.permutation(v - 3)  # f: one cycle through every ordinary token
    f = np.arange(v)
    f[order] = np.roll(order, -1)
    target, draft, f = copycat_pair(cfg, seed=seed, f=f)
    for i in range(cfg.num_layers):
        _set(target.state, ("layers", i, "attn", "o_proj", "kernel"),
             noise * rs.randn(h, h) / np.sqrt(h))
    g = f.copy()
    flip = rs.choice(np.arange(3, v), int(wrong * (v - 3)), replace=False)
    g[flip] = 3 + (f[flip] - 3 + rs.randint(1, v - 3, size=flip.size)) % (v - 3)
    emb = np.asarray(target.state["embed"][...])
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    _set(draft.state, ("lm_head", "kernel"), unit.T @ np.eye(v)[g] * 8.0)
    return target, draft
