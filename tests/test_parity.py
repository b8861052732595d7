"""The target computes what transformers computes: fp32 logits within 1e-4."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import full_forward_logits, make_hf_model, rng_tokens

from aurora_jax.models.config import TargetConfig
from aurora_jax.models.hf_io import load_target, save_target
from aurora_jax.models.transformer import init_random

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = [
    ("llama", dict(num_heads=4, num_kv_heads=4)),  # multi-head (no grouping)
    ("llama", dict(num_heads=4, num_kv_heads=2)),  # GQA 2:1
    ("llama", dict(num_heads=8, num_kv_heads=2, head_dim=8, tie=True)),  # GQA 4:1, tied
    ("llama", dict(num_heads=4, num_kv_heads=1, rope_scaling=LLAMA3_SCALING)),  # MQA, llama3
    ("qwen3", dict(num_heads=4, num_kv_heads=2, head_dim=32)),  # head_dim != hidden/heads
    ("qwen3", dict(num_heads=8, num_kv_heads=4, head_dim=16, tie=True)),
]


@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_logits_match_transformers(tmp_path, family, kw):
    path, hf = make_hf_model(tmp_path, family, **kw)
    ids = rng_tokens((2, 80), 97)  # 80 > original_max_position_embeddings of the llama3 case
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours, target = full_forward_logits(path, ids)
    assert target.cfg.family == family
    assert np.abs(ref).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    cfg = TargetConfig(vocab_size=97, hidden_size=64, intermediate_size=136, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, family="qwen3",
                       bos_token_id=1, eos_token_ids=(2,), pad_token_id=0)
    _, state = init_random(cfg, seed=3)
    save_target(tmp_path / "ours", cfg, state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval().float()
    ids = rng_tokens((1, 24), 97, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours, _ = full_forward_logits(tmp_path / "ours", ids)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_transformers_4x_config_convention():
    """Older config.json files carry top-level rope_theta/rope_scaling with 'type'."""
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "max_position_embeddings": 131072, "eos_token_id": [128001, 128008, 128009]}
    cfg = TargetConfig.from_hf_dict(raw)
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 128
    assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_ids == (128001, 128008, 128009)
    assert cfg.resolved_aux_layers == (1, 15, 28)
    back = TargetConfig.from_hf_dict(cfg.to_hf_dict("bfloat16"))
    assert back == cfg


def test_sharded_checkpoint_round_trip(tmp_path, small_ckpt):
    """Saving past the shard limit writes an index; loading it gives identical weights."""
    src = load_target(small_ckpt)
    save_target(tmp_path / "sharded", src.cfg, src.state, max_shard_bytes=128 << 10)
    index = json.loads((tmp_path / "sharded/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4
    back = load_target(tmp_path / "sharded")
    assert back.cfg == src.cfg
    for a, b in zip(jax.tree.leaves(src.state), jax.tree.leaves(back.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bf16 = load_target(tmp_path / "sharded", dtype="bfloat16")
    assert bf16.state["embed"][...].dtype == jnp.bfloat16
