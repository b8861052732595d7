"""EAGLE-3 draft: forward against a numpy reference, HF-layout round trip, fit checks, vocab."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from aurora_jax.errors import CheckpointError
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import TargetConfig
from aurora_jax.models.eagle3 import DraftConfig, Eagle3Draft, build_draft_vocab, init_draft
from aurora_jax.models.eagle3_io import load_draft, save_draft
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.safetensors_io import SafetensorsFile
from aurora_jax.models.sharding import state_path

TARGET = TargetConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_layers=6,
                      num_heads=4, num_kv_heads=2, head_dim=8)
VOCAB = build_draft_vocab(np.random.RandomState(0).zipf(1.5, 5000) % 120, 120, 50, always=(1,))


def _draft_forward(draft, embeds, hidden, positions, mask, cache=None, cache_len=None):
    return nnx.merge(draft.graphdef, draft.state)(embeds, hidden, positions, mask, cache,
                                                   cache_len)


def _np_reference(params, cfg, embeds, hidden, positions):
    """The EAGLE-3 mid layer written out with numpy loops over heads, causal."""
    def rms(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps)

    p = params
    m = p["midlayer"]
    x = np.concatenate([rms(embeds, m["input_layernorm"]["weight"]),
                        rms(hidden, m["hidden_norm"]["weight"])], -1)
    t, d = x.shape[0], cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    ang = positions[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(v):
        rot = np.concatenate([-v[:, d // 2:], v[:, : d // 2]], -1)
        return v * cos + rot * sin

    a = m["self_attn"]
    q = (x @ a["q_proj"]["kernel"]).reshape(t, cfg.num_heads, d)
    k = (x @ a["k_proj"]["kernel"]).reshape(t, cfg.num_kv_heads, d)
    v = (x @ a["v_proj"]["kernel"]).reshape(t, cfg.num_kv_heads, d)
    out = np.zeros((t, cfg.num_heads, d))
    group = cfg.num_heads // cfg.num_kv_heads
    for h in range(cfg.num_heads):
        qh, kh, vh = rope(q[:, h]), rope(k[:, h // group]), v[:, h // group]
        s = qh @ kh.T / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, h] = (w / w.sum(-1, keepdims=True)) @ vh
    h1 = hidden + out.reshape(t, -1) @ a["o_proj"]["kernel"]
    mlp = m["mlp"]
    y = rms(h1, m["post_attention_layernorm"]["weight"])
    g = y @ mlp["gate_proj"]["kernel"]
    h2 = h1 + (g / (1 + np.exp(-g)) * (y @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    return rms(h2, p["norm"]["weight"]) @ p["lm_head"]["kernel"], h2


def _numpy_params(state):
    flat = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        node = flat
        path = state_path(kp)
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(x, np.float64)
    return flat


def test_forward_matches_numpy_reference():
    cfg = DraftConfig.for_target(TARGET, 50)
    draft = init_draft(cfg, seed=1, draft_to_target=VOCAB)
    rs = np.random.RandomState(2)
    aux = rs.randn(1, 5, 3, 32).astype(np.float32)
    embeds = rs.randn(1, 5, 32).astype(np.float32)
    model = nnx.merge(draft.graphdef, draft.state)
    hidden = model.project(jnp.asarray(aux))
    pos = jnp.arange(3, 8)[None]
    logits, h, _ = model(jnp.asarray(embeds), hidden, pos, causal_mask(jnp.array([5]), 5))
    params = _numpy_params(draft.state)
    np.testing.assert_allclose(np.asarray(hidden)[0], aux[0].reshape(5, -1)
                               @ params["fc"]["kernel"], rtol=1e-5, atol=1e-5)
    ref_logits, ref_h = _np_reference(params, cfg, embeds[0].astype(np.float64),
                                      np.asarray(hidden, np.float64)[0], np.arange(3, 8))
    np.testing.assert_allclose(np.asarray(h)[0], ref_h, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(logits)[0], ref_logits, rtol=1e-4, atol=1e-4)


def test_cached_draft_steps_equal_full_forward():
    cfg = DraftConfig.for_target(TARGET)
    draft = init_draft(cfg, seed=3)
    rs = np.random.RandomState(4)
    embeds = jnp.asarray(rs.randn(2, 6, 32).astype(np.float32))
    hidden = jnp.asarray(rs.randn(2, 6, 32).astype(np.float32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    full, _, _ = _draft_forward(draft, embeds, hidden, pos, causal_mask(jnp.array([6, 6]), 6))
    cache = KVCache(k=(jnp.zeros((2, 2, 8, 8)),), v=(jnp.zeros((2, 2, 8, 8)),))
    steps = []
    for i in range(6):
        lg, _, cache = _draft_forward(draft, embeds[:, i:i + 1], hidden[:, i:i + 1],
                                      pos[:, i:i + 1], jnp.ones((2, 1, 1), bool), cache,
                                      jnp.full((2,), i))
        steps.append(np.asarray(lg))
    np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_hf_layout_round_trip(tmp_path):
    cfg = DraftConfig.for_target(TARGET, 50)
    draft = init_draft(cfg, seed=5, draft_to_target=VOCAB)
    save_draft(tmp_path / "d", draft)
    raw = json.loads((tmp_path / "d/config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"]
    assert raw["draft_vocab_size"] == 50 and raw["num_hidden_layers"] == 1
    assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 3, 5]
    f = SafetensorsFile(tmp_path / "d/model.safetensors")
    expected = {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} | {
        f"midlayer.{n}.weight" for n in (
            "input_layernorm", "hidden_norm", "post_attention_layernorm", "self_attn.q_proj",
            "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj")}
    assert set(f.keys()) == expected
    assert f.shape("midlayer.self_attn.q_proj.weight") == (32, 64)  # [heads*D, 2H]
    assert f.shape("fc.weight") == (32, 96) and f.shape("lm_head.weight") == (50, 32)
    np.testing.assert_array_equal(np.arange(50) + f.get("d2t"), VOCAB)
    assert f.get("t2d").sum() == 50 and f.get("t2d").dtype == np.bool_
    back = load_draft(tmp_path / "d", target=TARGET)
    assert back.cfg == cfg
    for a, b in zip(jax.tree.leaves(draft.state), jax.tree.leaves(back.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=64), "hidden size 32"),
    (dict(vocab_size=121), "vocabulary 120 differs"),
    (dict(num_layers=2), r"aux layers \[3, 5\] do not exist"),
    (dict(num_layers=7), r"reads target layers \[0, 3, 5\] but the target returns"),
])
def test_draft_that_does_not_fit_is_refused(tmp_path, change, message):
    save_draft(tmp_path / "d", init_draft(DraftConfig.for_target(TARGET), seed=0))
    other = TargetConfig(**{**TARGET.__dict__, **change})
    with pytest.raises(CheckpointError, match=message):
        load_draft(tmp_path / "d", target=other)


def test_target_checkpoint_is_not_a_draft(small_ckpt):
    with pytest.raises(CheckpointError, match="not an EAGLE-3 draft"):
        load_draft(small_ckpt)


def test_build_draft_vocab_keeps_most_frequent_tokens():
    stream = np.array([5] * 10 + [7] * 8 + [3] * 8 + [9] * 2 + [11])
    ids = build_draft_vocab(stream, 20, 3, always=(1,))
    # 1 is forced in, 5 is the most frequent, and 3 beats 7 (equal counts) by lower id.
    np.testing.assert_array_equal(ids, [1, 3, 5])
    model = Eagle3Draft(DraftConfig.for_target(TARGET, 3), rngs=nnx.Rngs(0), draft_to_target=ids)
    np.testing.assert_array_equal(np.asarray(model.to_target_ids(jnp.arange(3))), ids)
    assert np.asarray(model.t2d[...]).nonzero()[0].tolist() == [1, 3, 5]
