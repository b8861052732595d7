"""A warm-started draft carries the target's head and top layer: its head turns a hidden state
into the target's logits over the draft vocabulary, fc passes the highest aux layer through,
its layer's MLP is the target's, and nothing changes shape, dtype or placement."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from spec_models import as_target, tiny_cfg

from aurora_jax.models.draft_init import warm_start
from aurora_jax.models.eagle3 import DraftConfig, init_draft
from aurora_jax.models.transformer import init_random


def _pair(tie: bool):
    cfg = dataclasses.replace(tiny_cfg(), tie_word_embeddings=tie)
    target = as_target(cfg, *init_random(cfg, seed=2))
    ids = np.arange(0, cfg.vocab_size, 3)
    dcfg = dataclasses.replace(DraftConfig.for_target(cfg), draft_vocab_size=len(ids))
    return target, init_draft(dcfg, seed=4, draft_to_target=ids), ids


def _layout(state):
    return jax.tree.map(lambda x: (x.shape, x.dtype, x.sharding), state)


def test_warm_head_gives_the_targets_logits_over_the_draft_vocabulary():
    for tie in (True, False):
        target, draft, ids = _pair(tie)
        warm = warm_start(draft, target, layer=None)
        assert _layout(warm.state) == _layout(draft.state)
        tmodel = nnx.merge(target.graphdef, target.state)
        dmodel = nnx.merge(warm.graphdef, warm.state)
        h = jax.random.normal(jax.random.key(0), (2, 5, target.cfg.hidden_size))
        np.testing.assert_allclose(dmodel.lm_head(dmodel.norm(h)),
                                   tmodel.logits(tmodel.norm(h))[..., ids], rtol=1e-5, atol=1e-5)
        # head only: the draft layer and fc stay as they were
        np.testing.assert_array_equal(warm.state["fc"]["kernel"][...],
                                      draft.state["fc"]["kernel"][...])


def test_warm_layer_is_the_targets_top_layer_fed_the_highest_aux_state():
    target, draft, _ = _pair(True)
    warm = warm_start(draft, target)
    assert _layout(warm.state) == _layout(draft.state)
    tmodel = nnx.merge(target.graphdef, target.state)
    dmodel = nnx.merge(warm.graphdef, warm.state)
    aux = jax.random.normal(jax.random.key(1), (2, 5, 3, target.cfg.hidden_size))
    np.testing.assert_allclose(dmodel.project(aux), aux[:, :, 2], rtol=1e-5, atol=1e-5)
    top = tmodel.layers[target.cfg.num_layers - 1]
    x = jax.random.normal(jax.random.key(2), (2, 5, target.cfg.hidden_size))
    np.testing.assert_allclose(dmodel.midlayer.mlp(x), top.mlp(x), rtol=1e-5, atol=1e-5)
    # both halves of the attention input project as the target layer's input does
    e = jnp.zeros_like(x)
    q = dmodel.midlayer.self_attn.q_proj(dmodel.midlayer.attn_input(e, x))
    np.testing.assert_allclose(q, top.attn.q_proj(top.input_layernorm(x)), rtol=1e-5,
                               atol=1e-5)


def test_load_pair_warm_starts_a_day0_draft(small_ckpt):
    from aurora_jax.models.loading import load_pair

    ids = np.arange(0, 64, 2)
    target, draft = load_pair(small_ckpt, "warm", draft_vocab=ids)
    _, scratch = load_pair(small_ckpt, "scratch", draft_vocab=ids)
    head = np.asarray(target.state["embed"][...]).T if target.cfg.tie_word_embeddings else \
        np.asarray(target.state["lm_head"]["kernel"][...])
    np.testing.assert_array_equal(np.asarray(draft.state["lm_head"]["kernel"][...]),
                                  head[:, ids])
    assert _layout(draft.state) == _layout(scratch.state)
