"""A day-0 draft warm-started from the target's own weights instead of random ones.

An EAGLE-3 draft (models/eagle3.py) ends in a final norm and an lm_head over its vocabulary,
and its one decoder layer has the target's shapes apart from the 2H-wide attention input. A
scratch draft must learn all of it from traffic. Two parts can come from the target as they
are:
- the head: the draft's lm_head columns are the target's for the draft vocabulary, and its
  final norm is the target's, so a draft hidden state that resembles the target's last one
  already yields the target's prediction;
- the layer (optional): the target layer `layer` (by default the last) as the draft layer,
  its q/k/v weights on both halves of the attention input (the token's embedding and the
  incoming hidden state, each through the layer's input norm), and fc passing the highest aux
  layer (the residual stream a few layers below the top) through.
Everything else keeps its random initialisation. Whether this beats a random start, before
training and per learner step, is measured by scripts/exp_draft_init.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.eagle3 import Draft, draft_ids
from aurora_jax.models.transformer import Target


def _set(node, value, select=lambda v: v) -> None:
    """Writes `select(value)` into `node` with the node's dtype and sharding. One jitted copy:
    `value` may be numpy or a device array on any sharding, one spanning several processes'
    devices included (a tp-split target in a multi-process job, which no process can read
    into numpy alone)."""
    old = node[...]
    place = jax.jit(lambda v: jnp.asarray(select(v), old.dtype), out_shardings=old.sharding)
    node.set_value(place(value))


def warm_start(draft: Draft, target: Target, layer: int | None = -1) -> Draft:
    """A copy of `draft` with the target's head (and, unless `layer` is None, the target's
    layer `layer` and an fc that selects the highest aux layer). Shapes, dtypes and placement
    are unchanged."""
    if draft.cfg.hidden_size != target.cfg.hidden_size:
        raise ValueError("a warm start needs a draft as wide as the target "
                         f"({draft.cfg.hidden_size} != {target.cfg.hidden_size})")
    state = jax.tree.map(jnp.copy, draft.state)
    t = target.state
    ids = draft_ids(np.asarray(state["d2t"][...]))  # (the draft's buffers are replicated)
    _set(state["lm_head"]["kernel"], target.head_kernel(), lambda w: w[:, ids])
    _set(state["norm"]["weight"], t["norm"]["weight"][...])
    if layer is not None:
        src = t["layers"][layer % target.cfg.num_layers]
        mid = state["midlayer"]
        norm = src["input_layernorm"]["weight"][...]
        _set(mid["input_layernorm"]["weight"], norm)
        _set(mid["hidden_norm"]["weight"], norm)
        for p in ("q_proj", "k_proj", "v_proj"):
            _set(mid["self_attn"][p]["kernel"], src["attn"][p]["kernel"][...],
                 lambda w: jnp.concatenate([w, w], 0))
        _set(mid["self_attn"]["o_proj"]["kernel"], src["attn"]["o_proj"]["kernel"][...])
        _set(mid["post_attention_layernorm"]["weight"],
             src["post_attention_layernorm"]["weight"][...])
        for p in ("gate_proj", "up_proj", "down_proj"):
            _set(mid["mlp"][p]["kernel"], src["mlp"][p]["kernel"][...])
        h = draft.cfg.hidden_size
        fc = np.zeros((3 * h, h), np.float32)
        fc[2 * h:] = np.eye(h)  # concat(aux_low, aux_mid, aux_high) -> aux_high
        _set(state["fc"]["kernel"], fc)
    return dataclasses.replace(draft, state=state)
