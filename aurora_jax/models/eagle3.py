"""EAGLE-3 draft model (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test", arXiv 2503.01840).

The draft reads the target's features instead of re-deriving them: for the first draft step,
`fc(concat(aux_low, aux_mid, aux_high))` (3H -> H) of the target's aux layer outputs; for later
steps, its own previous hidden state. One decoder layer whose attention input is
`concat(rmsnorm(embed(token)), rmsnorm(hidden))` (2H wide) with the pre-norm hidden as the
residual, then an MLP, a final norm, and an lm_head over a reduced draft vocabulary. Draft id i
is target id `i + d2t[i]`; `t2d[j]` says whether target id j is in the draft vocabulary. The
token embedding is the target's, frozen, and passed in rather than stored.

Layout and names follow the Hugging Face EAGLE-3 checkpoints that SGLang and vLLM serve
(`LlamaForCausalLMEagle3`: fc.*, midlayer.*, norm.*, lm_head.*, buffers d2t, t2d).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.errors import CheckpointError
from aurora_jax.models.attention import attend
from aurora_jax.models.config import DTYPES, RopeScaling, TargetConfig
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.layers import Linear, RMSNorm, rope_cos_sin, rope_inv_freq
from aurora_jax.models.sharding import make_mesh
from aurora_jax.models.transformer import MLP, Attention
from pallas_kernels.dispatch import check_impl


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """Shape of an EAGLE-3 draft head."""

    hidden_size: int
    """H: the draft's width (equal to the target's in every published EAGLE-3 draft)."""
    intermediate_size: int
    """F: MLP width."""
    num_heads: int
    """Query heads of the draft layer."""
    num_kv_heads: int
    """Key/value heads of the draft layer."""
    head_dim: int
    """D: width of one head."""
    vocab_size: int
    """The target's vocabulary size (t2d has one entry per target token)."""
    draft_vocab_size: int
    """Rows of the draft lm_head (<= vocab_size)."""
    target_hidden_size: int
    """Width of each target aux hidden state (fc maps 3 x this to hidden_size)."""
    aux_layers: tuple[int, ...] = ()
    """Target layers whose outputs feed fc (recorded in the checkpoint's eagle_config)."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base (the target's)."""
    rope_scaling: RopeScaling | None = None
    """RoPE scaling (the target's)."""
    max_position_embeddings: int = 2048
    """Longest sequence."""
    attention: str = "auto"
    """Attention implementation (not a checkpoint property): "auto" (the Pallas kernel on
    GPU, the jnp reference elsewhere), "reference", "pallas" or "interpret" (the kernel in
    Pallas interpret mode, for tests on CPU). See pallas_kernels/dispatch.py."""

    def __post_init__(self):
        check_impl(self.attention)
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} must be in "
                             f"1..vocab_size ({self.vocab_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")

    @classmethod
    def for_target(cls, t: TargetConfig, draft_vocab_size: int | None = None) -> DraftConfig:
        """The usual draft for a target: same width, heads and RoPE, one layer."""
        return cls(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                   num_heads=t.num_heads, num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                   vocab_size=t.vocab_size,
                   draft_vocab_size=draft_vocab_size or t.vocab_size,
                   target_hidden_size=t.hidden_size, aux_layers=t.resolved_aux_layers,
                   rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                   rope_scaling=t.rope_scaling, max_position_embeddings=t.max_position_embeddings,
                   attention=t.attention)


class MidLayer(nnx.Module):
    def __init__(self, cfg: DraftConfig, *, dtype, rngs: nnx.Rngs):
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, dtype=dtype)  # on the token embedding
        self.hidden_norm = RMSNorm(h, eps, dtype=dtype)  # on the incoming hidden state
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs, d_in=2 * h)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype=dtype)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)  # the target's SwiGLU block

    def attn_input(self, embeds, hidden):
        return jnp.concatenate([self.input_layernorm(embeds), self.hidden_norm(hidden)], axis=-1)

    def finish(self, hidden, attn_out):
        """Residual over the incoming hidden state, then the MLP block."""
        h = hidden + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))

    def __call__(self, embeds, hidden, cos, sin, block_mask, k_cache, v_cache, cache_len,
                 write_at=None):
        """(output, the caches as `Attention` returns them)."""
        a, *_, k_cache, v_cache = self.self_attn(self.attn_input(embeds, hidden), cos, sin,
                                                 block_mask, k_cache, v_cache, cache_len,
                                                 write_at)
        return self.finish(hidden, a), k_cache, v_cache


class Eagle3Draft(nnx.Module):
    """The draft head. `d2t`/`t2d` are buffers (nnx.Variable), not trained parameters."""

    def __init__(self, cfg: DraftConfig, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 draft_to_target: np.ndarray | None = None):
        self.cfg = cfg
        self.fc = Linear(3 * cfg.target_hidden_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.midlayer = MidLayer(cfg, dtype=dtype, rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.draft_vocab_size, dtype=dtype, rngs=rngs)
        ids = (np.arange(cfg.draft_vocab_size) if draft_to_target is None
               else np.asarray(draft_to_target))
        d2t, t2d = vocab_maps(ids, cfg.vocab_size)
        self.d2t = nnx.Variable(jnp.asarray(d2t))
        self.t2d = nnx.Variable(jnp.asarray(t2d))
        self.inv_freq = nnx.Variable(jnp.asarray(rope_inv_freq(cfg)))

    def project(self, aux_BxTxAxH):
        """fc over the concatenated target aux hidden states: [B, T, 3H_t] -> [B, T, H]."""
        b, t = aux_BxTxAxH.shape[:2]
        return self.fc(aux_BxTxAxH.reshape(b, t, -1))

    def __call__(self, embeds_BxTxH, hidden_BxTxH, positions_BxT, block_mask_BxTxT,
                 cache: KVCache | None = None, cache_len_B=None):
        """One draft step: (draft-vocab logits [B,T,Vd] float32, pre-norm hidden, cache).

        With a cache, the new keys/values are written at slots cache_len[b] + j; a cache with
        cache_len None is taken as empty (prefill) and written from slot 0."""
        cos, sin = rope_cos_sin(self.inv_freq[...], positions_BxT, hidden_BxTxH.dtype)
        kc, vc, start = None, None, None
        if cache is not None:
            kc, vc = cache.k[0], cache.v[0]
            start = (jnp.zeros(embeds_BxTxH.shape[:1], jnp.int32) if cache_len_B is None
                     else cache_len_B)
        h, kc, vc = self.midlayer(embeds_BxTxH, hidden_BxTxH, cos, sin, block_mask_BxTxT, kc, vc,
                                  cache_len_B, start)
        if cache is not None:
            cache = KVCache(k=(kc,), v=(vc,))
        return self.lm_head.logits(self.norm(h)), h, cache

    def tree_step(self, embeds_BxTxH, hidden_BxTxH, positions_BxT, slots_T, visible_BxTxM,
                  tree_k_BxMxKxD, tree_v_BxMxKxD, cache: KVCache, cache_len_B):
        """A draft step for T tree nodes during drafting (EAGLE-2). Their keys/values go
        into a side buffer of M tree slots at `slots`; node t attends to the committed draft
        cache (< cache_len) and to the buffer slots `visible[b, t]` (its ancestors and
        itself). The cache is not written: the tree is provisional. Returns (logits, pre-norm
        hidden, tree_k, tree_v)."""
        cos, sin = rope_cos_sin(self.inv_freq[...], positions_BxT, hidden_BxTxH.dtype)
        mid = self.midlayer
        q, k, v = mid.self_attn.project_qkv(mid.attn_input(embeds_BxTxH, hidden_BxTxH), cos, sin)
        tree_k_BxMxKxD = tree_k_BxMxKxD.at[:, slots_T].set(k.astype(tree_k_BxMxKxD.dtype))
        tree_v_BxMxKxD = tree_v_BxMxKxD.at[:, slots_T].set(v.astype(tree_v_BxMxKxD.dtype))
        out = attend(q, tree_k_BxMxKxD, tree_v_BxMxKxD, visible_BxTxM, cache.k[0], cache.v[0],
                     cache_len_B, impl=mid.self_attn.impl)
        a = mid.self_attn.o_proj(out.reshape(*out.shape[:2], -1))
        h = mid.finish(hidden_BxTxH, a)
        return self.lm_head.logits(self.norm(h)), h, tree_k_BxMxKxD, tree_v_BxMxKxD

    def masked_step(self, embeds_BxTxH, hidden_BxTxH, positions_BxT, k_ctx_BxCxKxD,
                    v_ctx_BxCxKxD, ctx_mask_BxTxC, self_mask_BxTxT):
        """A draft step whose rows see given context keys/values (`ctx_mask`) and each other
        (`self_mask`): the general form the learner needs for training-time test and for
        re-running tree branches. Returns (logits, pre-norm hidden, k, v of the new rows)."""
        cos, sin = rope_cos_sin(self.inv_freq[...], positions_BxT, hidden_BxTxH.dtype)
        mid = self.midlayer
        q, k, v = mid.self_attn.project_qkv(mid.attn_input(embeds_BxTxH, hidden_BxTxH), cos, sin)
        out = attend(q, jnp.concatenate([k_ctx_BxCxKxD, k.astype(k_ctx_BxCxKxD.dtype)], 1),
                     jnp.concatenate([v_ctx_BxCxKxD, v.astype(v_ctx_BxCxKxD.dtype)], 1),
                     jnp.concatenate([ctx_mask_BxTxC, self_mask_BxTxT], 2))
        a = mid.self_attn.o_proj(out.reshape(*out.shape[:2], -1))
        h = mid.finish(hidden_BxTxH, a)
        return self.lm_head.logits(self.norm(h)), h, k, v

    def to_target_ids(self, draft_ids):
        """Draft vocabulary ids -> target vocabulary ids."""
        return draft_ids + self.d2t[...][draft_ids]


def check_draft_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError unless `ids` (draft id -> target id) are sorted, unique, in range."""
    if np.any(np.diff(ids) <= 0) or ids.min(initial=0) < 0 or ids.max(initial=0) >= vocab_size:
        raise ValueError("draft vocabulary must be sorted unique target ids within the vocab")


def vocab_maps(draft_to_target: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(d2t offsets [Vd] int64, t2d membership [V] bool) for sorted unique target ids."""
    ids = np.asarray(draft_to_target, np.int64)
    check_draft_ids(ids, vocab_size)
    t2d = np.zeros((vocab_size,), bool)
    t2d[ids] = True
    return ids - np.arange(len(ids)), t2d


def draft_ids(d2t_Vd) -> np.ndarray:
    """The target ids of a draft's vocabulary, from its d2t offsets (vocab_maps' inverse)."""
    d2t = np.asarray(d2t_Vd, np.int64)
    return np.arange(len(d2t)) + d2t


def top_tokens(counts_V: np.ndarray, size: int, always: tuple[int, ...] = (),
               prefer: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids of the `size` most counted tokens: `always` first; ties go to the ids in
    `prefer` (if given), then to lower ids."""
    v = len(counts_V)
    score = np.asarray(counts_V, np.float64).copy()
    score[list(always)] = np.inf
    keys: tuple[np.ndarray, ...] = (np.arange(v), -score)
    if prefer is not None:
        preferred = np.zeros(v, bool)
        preferred[prefer] = True
        keys = (np.arange(v), ~preferred, -score)
    order = np.lexsort(keys)  # the last key sorts first
    return np.sort(order[:size])


def build_draft_vocab(token_ids: np.ndarray, vocab_size: int, draft_vocab_size: int,
                      always: tuple[int, ...] = ()) -> np.ndarray:
    """The `draft_vocab_size` most frequent target ids in a token stream (ties by id), plus
    `always` (for example the stop tokens), as sorted target ids."""
    counts = np.bincount(np.asarray(token_ids, np.int64).ravel(), minlength=vocab_size)
    return top_tokens(counts, draft_vocab_size, always)


# ---- the loaded draft -----------------------------------------------------------------
def check_fits(cfg: DraftConfig, target: TargetConfig) -> None:
    """Raises CheckpointError naming the mismatch when a draft cannot serve this target."""
    problems = []
    if cfg.target_hidden_size != target.hidden_size:
        problems.append(f"draft expects target hidden size {cfg.target_hidden_size}, "
                        f"target has {target.hidden_size}")
    if cfg.hidden_size != target.hidden_size:
        problems.append(f"draft hidden size {cfg.hidden_size} differs from the target's "
                        f"{target.hidden_size} (the draft reads the target's embedding)")
    if cfg.vocab_size != target.vocab_size:
        problems.append(f"draft vocabulary {cfg.vocab_size} differs from the target's "
                        f"{target.vocab_size}")
    bad = [i for i in cfg.aux_layers if not 0 <= i < target.num_layers]
    if bad:
        problems.append(f"aux layers {bad} do not exist in a {target.num_layers}-layer target")
    elif cfg.aux_layers and tuple(cfg.aux_layers) != target.resolved_aux_layers:
        problems.append(f"draft reads target layers {list(cfg.aux_layers)} but the target "
                        f"returns layers {list(target.resolved_aux_layers)} (load the target "
                        f"with cfg_overrides={{'aux_layers': {tuple(cfg.aux_layers)}}})")
    if problems:
        raise CheckpointError("draft does not fit the target: " + "; ".join(problems))


def same_layout(a, b) -> bool:
    """Two draft states of identical structure, shapes and dtypes: one can replace the other
    in a compiled step without recompiling it."""
    la, ta = jax.tree.flatten(jax.tree.map(lambda x: (x.shape, x.dtype), a))
    lb, tb = jax.tree.flatten(jax.tree.map(lambda x: (x.shape, x.dtype), b))
    return str(ta) == str(tb) and la == lb


@jax.jit
def _health(state):
    """Per floating-point leaf: all finite, and all zero."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return (jnp.stack([jnp.isfinite(x).all() for x in leaves]),
            jnp.stack([(x == 0).all() for x in leaves]))


@jax.jit
def _equal(a, b):
    return jnp.stack([jnp.array_equal(x, y) for x, y in
                      zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]).all()


def draft_problem(new, serving=None) -> str | None:
    """Why `new` must not replace `serving` although it may have the layout (None if it
    may): a different layout; a non-finite value; weight arrays all zero that the serving
    draft has non-zero (a draft zeroed by a memory release, SGLang #13268); or weights equal
    to the serving draft's (a publication that carried stale weights, SGLang #27718)."""
    if serving is not None and not same_layout(new, serving):
        return "its structure, shapes or dtypes differ from the serving draft's"
    finite, zero = jax.device_get(_health(new))
    if not finite.all():
        paths = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(new)
                 if jnp.issubdtype(x.dtype, jnp.floating)]
        return f"non-finite values in {paths[int(np.argmin(finite))]}"
    # A zeroed draft: every array zero, or most of them newly so (a draft may hold a zero
    # array or two by construction, as the copycat drafts of the tests do).
    was_zero = jax.device_get(_health(serving)[1]) if serving is not None else zero
    if zero.all() or 2 * (zero & ~was_zero).sum() > zero.size:
        return (f"{int(zero.sum())} of its {zero.size} weight arrays are all zero (the serving "
                f"draft has {int(was_zero.sum())}): a zeroed draft")
    if serving is not None and bool(_equal(new, serving)):
        return "its weights equal the serving draft's: a stale publication"
    return None


@dataclasses.dataclass
class Draft:
    """A loaded draft model, split for jit: `nnx.merge(graphdef, state)` is the Eagle3Draft."""

    cfg: DraftConfig
    graphdef: nnx.GraphDef
    state: nnx.State


def init_draft(cfg: DraftConfig, seed: int = 0, dtype: str = "float32",
               draft_to_target: np.ndarray | None = None, mesh=None) -> Draft:
    """A randomly initialised draft (day 0), replicated on `mesh`."""
    model = Eagle3Draft(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(seed),
                        draft_to_target=draft_to_target)
    graphdef, state = nnx.split(model)
    mesh = mesh or make_mesh(tp=1, devices=jax.devices()[:1])
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return Draft(cfg, graphdef, state)
