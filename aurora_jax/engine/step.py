"""The engine's device functions: prefill, insert, and one speculative decode step.

Each is a pure function of (target params, draft params, state) and is jitted once per shape
by engine/engine.py; the decode state is donated. Draft params are an argument, never a
closed-over constant, so a retrained draft of the same structure replaces the serving one
between two steps without recompiling.

Per slot b the decode state keeps: the target KV cache holding the committed tokens' keys
and values in slots [0, cache_len); the root, the last committed token (its KV is computed by
the next verification, where it is tree slot 0); the draft KV cache in slots [0, draft_len);
and the "pending" draft rows (tokens and target aux features committed in the last step that
the draft has not read yet, see speculative/draft.py), with draft_len + pend_count == cache_len; and
the sequence's tokens (prompt, then committed) in `history`, which n-gram drafting looks up.

One step (SpecInfer, Miao et al. 2024; EAGLE-2/3, Li et al. 2024/2025):
  1. the draft catches up on the pending rows and proposes a tree from the root (or, in
     n-gram mode, a chain is looked up in the history: speculative/ngram.py);
  2. the target verifies all tree nodes in one forward under the tree mask;
  3. acceptance keeps the longest valid path plus a bonus token (speculative/accept.py);
  4. commit: the accepted path's target KV entries move into place, the committed tokens
     and their target features become the next pending draft rows, stop tokens and
     per-slot token budgets end slots.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from aurora_jax.models.attention import causal_mask
from aurora_jax.models.kv_cache import KVCache, commit_path
from aurora_jax.sampling import SamplingRows, sample
from aurora_jax.speculative.accept import accept
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.speculative.draft import catch_up, propose
from aurora_jax.speculative.ngram import archive, ngram_tree, oldest_first, write_history
from aurora_jax.speculative.tree import Tree, ancestor_mask


@struct.dataclass
class DecodeState:
    cache: KVCache  # target, L x [B, K, S, D]
    cache_len: jax.Array  # [B] int32
    root: jax.Array  # [B] int32, last committed token
    draft_cache: KVCache | None  # 1 x [B, Kd, S, D], None without a draft
    draft_len: jax.Array  # [B] int32
    pend_tokens: jax.Array  # [B, R] int32, R = max_depth + 1
    pend_aux: jax.Array  # [B, R, A, H] target aux features of the previous positions
    pend_count: jax.Array  # [B] int32
    history: jax.Array  # [B, S] int32 the sequence's tokens (prompt, then committed); root at
    #                     cache_len: what n-gram drafting looks up
    recent: jax.Array  # [M, S] int32 a ring of finished sequences (n-gram mode; else M = 0)
    recent_len: jax.Array  # [M] int32 their lengths
    recent_next: jax.Array  # [] int32 the ring's next row to write (its oldest)
    generated: jax.Array  # [B] int32, tokens emitted so far (the prefill's included)
    max_new: jax.Array  # [B] int32
    active: jax.Array  # [B] bool
    sampling: SamplingRows  # [B] per-slot settings
    key: jax.Array  # PRNG key


@struct.dataclass
class Prefix:
    """Prefilled requests, ready to insert into slots."""

    cache: KVCache  # L x [b, K, T, D]
    draft_cache: KVCache | None  # 1 x [b, Kd, T, D]
    tokens: jax.Array  # [b, T] the right-padded prompts
    lengths: jax.Array  # [b] prompt lengths
    first: jax.Array  # [b] the first generated token
    last_aux: jax.Array  # [b, A, H] aux features at the last prompt position
    aux: jax.Array | None  # [b, T, A, H] for traces
    hidden: jax.Array | None  # [b, T, H] final normed hidden, for traces


@struct.dataclass
class StepOutput:
    tokens: jax.Array  # [B, R] committed tokens, the first `emitted` of them count
    emitted: jax.Array  # [B] tokens emitted this step (0 for an idle slot)
    accepted: jax.Array  # [B] draft nodes accepted (tau - 1)
    active: jax.Array  # [B] the slot was generating during this step
    done: jax.Array  # [B] the slot finished during this step
    trace: dict | None  # per-slot verification record, see engine/trace.py


def init_state(target_cfg, draft_cfg, spec: SpecConfig, batch: int, max_len: int, dtype,
               seed: int, cache_sharding=None) -> DecodeState:
    """All slots empty."""
    r = spec.max_depth + 1
    aux = len(target_cfg.resolved_aux_layers)
    m = spec.recent_sequences if spec.mode == "ngram" else 0

    def zeros_i():  # a fresh buffer per field: the state is donated field by field
        return jnp.zeros((batch,), jnp.int32)

    return DecodeState(
        cache=KVCache.zeros(target_cfg, batch, max_len, dtype, cache_sharding),
        cache_len=zeros_i(), root=zeros_i(),
        draft_cache=(None if draft_cfg is None
                     else KVCache.zeros(draft_cfg, batch, max_len, dtype, num_layers=1)),
        draft_len=zeros_i(), pend_tokens=jnp.zeros((batch, r), jnp.int32),
        pend_aux=jnp.zeros((batch, r, aux, target_cfg.hidden_size), dtype),
        pend_count=jnp.ones((batch,), jnp.int32),
        history=jnp.zeros((batch, max_len), jnp.int32),
        recent=jnp.zeros((m, max_len), jnp.int32), recent_len=jnp.zeros((m,), jnp.int32),
        recent_next=jnp.zeros((), jnp.int32), generated=zeros_i(), max_new=zeros_i(),
        active=jnp.zeros((batch,), bool),
        sampling=SamplingRows(temperature=jnp.zeros((batch,), jnp.float32),
                              top_p=jnp.ones((batch,), jnp.float32), top_k=zeros_i(),
                              seed=jnp.full((batch,), -1, jnp.int32)),
        key=jax.random.key(seed))


def prefill(tgraph, tstate, dgraph, dstate, tokens_BxT, lengths_B, key, sampling: SamplingRows,
            *, trace: bool) -> Prefix:
    """Target forward over right-padded prompts, first token sampled; the draft reads the
    prompt's rows except the last, which stays pending (it becomes the first root row)."""
    model = nnx.merge(tgraph, tstate)
    b, t = tokens_BxT.shape
    dtype = model.embed[...].dtype
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, aux, cache = model.hidden(tokens_BxT, positions, causal_mask(lengths_B, t),
                                 KVCache.zeros(model.cfg, b, t, dtype))
    last = (lengths_B - 1)[:, None, None]
    first = sample(key, model.logits(jnp.take_along_axis(h, last, 1)[:, 0]), sampling)
    last_aux = jnp.take_along_axis(aux, last[..., None], 1)[:, 0]
    draft_cache = None
    if dgraph is not None:
        draft = nnx.merge(dgraph, dstate)
        shifted = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros((b, 1), jnp.int32)], 1)
        _, _, draft_cache = draft(model.embed[...][shifted], draft.project(aux), positions,
                                  causal_mask(lengths_B - 1, t),
                                  KVCache.zeros(draft.cfg, b, t, dtype, num_layers=1))
    return Prefix(cache, draft_cache, tokens_BxT, lengths_B, first, last_aux,
                  aux if trace else None, h if trace else None)


def insert(prefix: Prefix, state: DecodeState, slots_b, max_new_b, sampling: SamplingRows,
           eos_E) -> DecodeState:
    """Writes prefilled requests into slots (a slot index >= B drops that row)."""
    t = prefix.cache.max_len

    def put_rows(dst, src):
        return dst.at[slots_b, :, :t].set(src.astype(dst.dtype), mode="drop")

    def put(dst, src):
        return dst.at[slots_b].set(src.astype(dst.dtype), mode="drop")

    def put_cache(dst, src):
        return None if dst is None else KVCache(k=tuple(map(put_rows, dst.k, src.k)),
                                               v=tuple(map(put_rows, dst.v, src.v)))

    b, r = slots_b.shape[0], state.pend_tokens.shape[1]
    pend_tokens = jnp.zeros((b, r), jnp.int32).at[:, 0].set(prefix.first)
    pend_aux = jnp.zeros((b, *state.pend_aux.shape[1:]), state.pend_aux.dtype)
    pend_aux = pend_aux.at[:, 0].set(prefix.last_aux.astype(pend_aux.dtype))
    width = min(t + 1, state.history.shape[1])  # the prompt, then the first token
    history = jnp.pad(prefix.tokens, ((0, 0), (0, 1)))[:, :width]
    history = history.at[jnp.arange(b), prefix.lengths].set(prefix.first, mode="drop")
    return dataclasses.replace(
        state,
        history=state.history.at[slots_b, :width].set(history, mode="drop"),
        cache=put_cache(state.cache, prefix.cache),
        draft_cache=put_cache(state.draft_cache, prefix.draft_cache),
        cache_len=put(state.cache_len, prefix.lengths), root=put(state.root, prefix.first),
        draft_len=put(state.draft_len, prefix.lengths - 1),
        pend_tokens=put(state.pend_tokens, pend_tokens), pend_aux=put(state.pend_aux, pend_aux),
        pend_count=put(state.pend_count, jnp.ones((b,), jnp.int32)),
        generated=put(state.generated, jnp.ones((b,), jnp.int32)),
        max_new=put(state.max_new, max_new_b),
        active=put(state.active, ~jnp.isin(prefix.first, eos_E) & (max_new_b > 1)),
        sampling=jax.tree.map(put, state.sampling, sampling))


def generate(tgraph, tstate, dgraph, dstate, state: DecodeState, eos_E, *, spec: SpecConfig,
             trace: bool) -> tuple[DecodeState, StepOutput]:
    """One draft-verify-accept-commit step for every slot."""
    model = nnx.merge(tgraph, tstate)
    embed = model.embed[...]
    b = state.root.shape[0]
    key, k_accept = jax.random.split(state.key)
    active = state.active
    draft_cache, draft_len = state.draft_cache, state.draft_len
    draft_logp = jnp.zeros((b, spec.nodes + 1), jnp.float32)
    if dgraph is not None:
        draft = nnx.merge(dgraph, dstate)
        root_lp, root_h, draft_cache, draft_len = catch_up(
            draft, embed, draft_cache, draft_len, state.pend_tokens, state.pend_aux,
            state.pend_count)
    if spec.mode == "off":
        tree = Tree(tokens=state.root[:, None], parent=jnp.full((b, 1), -1, jnp.int32),
                    depth=jnp.zeros((b, 1), jnp.int32), valid=jnp.ones((b, 1), bool))
    elif spec.mode == "ngram":
        tree = ngram_tree(state.history, state.cache_len + 1, state.root, spec.depth,
                          spec.max_ngram,
                          *oldest_first(state.recent, state.recent_len, state.recent_next))
    else:
        tree, draft_logp = propose(draft, embed, draft_cache, draft_len, state.root, root_lp,
                                   root_h, spec)

    def verify(tree):  # the tree's keys and values come back as a block, outside the cache
        h, aux, block = model.hidden(tree.tokens, state.cache_len[:, None] + tree.depth,
                                     ancestor_mask(tree.parent), state.cache, state.cache_len,
                                     write=False)
        return model.logits(h), h, aux, block

    if spec.mode == "ngram":
        # Lookups often find nothing (prose): then verify the root alone, a plain target step,
        # instead of paying for a block of invalid nodes. Outputs are padded to the block.
        def root_only():
            one = jax.tree.map(lambda x: x[:, :1], tree)
            outs = verify(one)
            pad = lambda x: jnp.pad(x, [(0, 0), (0, tree.size - 1)]  # noqa: E731
                                    + [(0, 0)] * (x.ndim - 2))
            return tuple(jax.tree.map(pad, outs))

        has_proposal = jnp.any(tree.valid[:, 1:] & active[:, None])
        logits, h, aux, block = jax.lax.cond(has_proposal, verify, lambda _: root_only(), tree)
    else:
        logits, h, aux, block = verify(tree)
    # A seeded row's draws are keyed by its seed and its position (tokens generated so far).
    path, n_acc, bonus = accept(k_accept, tree, logits, spec.max_depth, state.sampling,
                                state.generated)

    # Committed this step: the accepted nodes' tokens, then the bonus.
    r = spec.max_depth + 1
    idx = jnp.arange(r)[None]
    nodes = jnp.take_along_axis(tree.tokens, jnp.maximum(path[:, 1:], 0), 1)
    tokens = jnp.concatenate([nodes, jnp.zeros((b, 1), jnp.int32)], 1)
    tokens = jnp.where(idx == n_acc[:, None], bonus[:, None], tokens)
    tokens = jnp.where(idx <= n_acc[:, None], tokens, 0)
    is_eos = jnp.isin(tokens, eos_E) & (idx <= n_acc[:, None])
    first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), r)
    emitted = jnp.minimum(jnp.minimum(n_acc + 1, first_eos + 1), state.max_new - state.generated)
    emitted = jnp.where(active, emitted, 0)
    generated = state.generated + emitted
    done = active & ((first_eos < emitted) | (generated >= state.max_new))

    keep = lambda new, old: jnp.where(  # noqa: E731  slot-wise select, idle slots unchanged
        active.reshape((b,) + (1,) * (new.ndim - 1)), new, old)
    cache = commit_path(state.cache, block, state.cache_len, path)
    pend_aux = jnp.take_along_axis(aux, jnp.maximum(path, 0)[:, :, None, None], 1)
    # The state's pending block may be wider than this step needs (a state sized for a
    # deeper speculation setting, stepped with a shallower one): pad to its width.
    pad = state.pend_tokens.shape[1] - r
    pend_tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
    pend_aux = jnp.pad(pend_aux, ((0, 0), (0, pad), (0, 0), (0, 0)))
    history = write_history(state.history, state.cache_len + 1, tokens, active)
    recent = (state.recent, state.recent_len, state.recent_next)
    if state.recent.shape[0]:  # finished sequences join the n-gram references
        recent = archive(*recent, history, state.cache_len + 1 + emitted, done)
    new_state = dataclasses.replace(
        state,
        history=history, recent=recent[0], recent_len=recent[1], recent_next=recent[2],
        cache=cache, cache_len=keep(state.cache_len + n_acc + 1, state.cache_len),
        root=keep(bonus, state.root), draft_cache=draft_cache,
        draft_len=keep(draft_len, state.draft_len),
        pend_tokens=keep(pend_tokens, state.pend_tokens),
        pend_aux=keep(pend_aux.astype(state.pend_aux.dtype), state.pend_aux),
        pend_count=keep(n_acc + 1, state.pend_count), generated=generated,
        active=active & ~done, key=key)
    record = None
    if trace:
        record = {"tree_tokens": tree.tokens, "tree_parent": tree.parent,
                  "draft_logp": draft_logp, "path": path, "aux": aux, "hidden": h}
    out = StepOutput(tokens=tokens, emitted=emitted, accepted=jnp.where(active, n_acc, 0),
                     active=active, done=done, trace=record)
    return new_state, out
