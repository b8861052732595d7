"""EAGLE-3 drafts in the Hugging Face layout that SGLang and vLLM serve.

config.json: architectures ["LlamaForCausalLMEagle3"], one hidden layer, `draft_vocab_size`,
`target_hidden_size`, `eagle_config.eagle_aux_hidden_state_layer_ids`. Weights: fc.weight,
midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight,
midlayer.self_attn.{q,k,v,o}_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight, norm.weight,
lm_head.weight, and the buffers d2t (int64 [Vd]) and t2d (bool [V]).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from aurora_jax.errors import CheckpointError
from aurora_jax.models.config import DTYPES, TargetConfig, read_config_json
from aurora_jax.models.eagle3 import (
    Draft,
    DraftConfig,
    Eagle3Draft,
    check_draft_ids,
    check_fits,
    draft_ids,
)
from aurora_jax.models.hf_io import TensorReader, weight_files, write_tensors
from aurora_jax.models.layers import rope_inv_freq
from aurora_jax.models.sharding import make_mesh, state_path

ARCHITECTURE = "LlamaForCausalLMEagle3"


def draft_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """Our draft state path -> (checkpoint tensor name, transposed)."""
    if path in (("d2t",), ("t2d",)):
        return path[0], False
    return ".".join(path[:-1]) + ".weight", path[-1] == "kernel"


def draft_config_from_hf(raw: dict, source: str) -> DraftConfig:
    archs = raw.get("architectures") or []
    if ARCHITECTURE not in archs:
        raise CheckpointError(f"{source}: not an EAGLE-3 draft (architectures {archs}, "
                              f"expected {ARCHITECTURE})")
    if raw.get("num_hidden_layers", 1) != 1:
        raise CheckpointError(f"{source}: drafts with {raw['num_hidden_layers']} layers are not "
                              "supported (EAGLE-3 uses 1)")
    # The rope settings parse exactly as a target's do; borrow that parser.
    rope = TargetConfig.from_hf_dict({**raw, "architectures": ["LlamaForCausalLM"]}, source)
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    eagle = raw.get("eagle_config") or {}
    try:
        return DraftConfig(
            hidden_size=hidden, intermediate_size=int(raw["intermediate_size"]),
            num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=int(raw["vocab_size"]),
            draft_vocab_size=int(raw.get("draft_vocab_size") or raw["vocab_size"]),
            target_hidden_size=int(raw.get("target_hidden_size") or hidden),
            aux_layers=tuple(eagle.get("eagle_aux_hidden_state_layer_ids") or ()),
            rms_norm_eps=rope.rms_norm_eps, rope_theta=rope.rope_theta,
            rope_scaling=rope.rope_scaling, max_position_embeddings=rope.max_position_embeddings)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{source}: bad EAGLE-3 config ({e})") from e


def draft_config_to_hf(cfg: DraftConfig, dtype: str) -> dict:
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update({k: v for k, v in dataclasses.asdict(cfg.rope_scaling).items() if k != "kind"},
                    rope_type=cfg.rope_scaling.kind)
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if cfg.rope_scaling is None else {**rope, "type": rope["rope_type"]},
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": dtype, "dtype": dtype,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
                         "use_aux_hidden_state": True},
    }


def read_draft_config(path: str | Path) -> DraftConfig:
    """The DraftConfig of an EAGLE-3 draft directory."""
    raw = read_config_json(path, "a draft checkpoint")
    return draft_config_from_hf(raw, str(Path(path) / "config.json"))


def load_draft(path: str | Path, *, target: TargetConfig | None = None, dtype: str = "float32",
               mesh=None) -> Draft:
    """Loads an EAGLE-3 draft directory; with `target`, checks that it fits that target."""
    path = Path(path)
    cfg = read_draft_config(path)
    if target is not None:
        check_fits(cfg, target)
        cfg = dataclasses.replace(cfg, attention=target.attention)  # the same kernels
    mesh = mesh or make_mesh(tp=1, devices=jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    reader = TensorReader(path, weight_files(path))
    abstract = nnx.eval_shape(lambda: Eagle3Draft(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)

    def load_leaf(keypath, sds):
        p = state_path(keypath)
        if p == ("inv_freq",):
            return jax.device_put(rope_inv_freq(cfg), replicated)
        name, transpose = draft_name(p)
        leaf_dtype = sds.dtype if p in (("d2t",), ("t2d",)) else DTYPES[dtype]
        return reader.read(name, sds.shape, transpose, leaf_dtype, replicated)

    state = jax.tree_util.tree_map_with_path(load_leaf, abstract_state)
    ids = draft_ids(state["d2t"][...])
    try:
        check_draft_ids(ids, cfg.vocab_size)
    except ValueError as e:
        raise CheckpointError(f"{path}: d2t does not map draft ids to distinct target ids "
                              f"({e})") from e
    return Draft(cfg, graphdef, state)


def save_draft(path: str | Path, draft: Draft, *, dtype: str | None = None) -> Path:
    """Writes the draft in the Hugging Face EAGLE-3 layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    leaves = [(state_path(kp), x) for kp, x in
              jax.tree_util.tree_flatten_with_path(draft.state)[0]]
    dtype = dtype or str(draft.state["fc"]["kernel"][...].dtype)
    tensors = []
    for p, x in leaves:
        if p == ("inv_freq",):
            continue
        name, transpose = draft_name(p)
        leaf_dtype = {"d2t": np.int64, "t2d": np.bool_}.get(name, DTYPES[dtype])
        tensors.append((name, transpose, x, leaf_dtype))
    write_tensors(path, tensors)
    (path / "config.json").write_text(json.dumps(draft_config_to_hf(draft.cfg, dtype), indent=2))
    return path



