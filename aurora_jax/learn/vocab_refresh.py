"""Re-choosing the draft vocabulary from the traffic served.

An EAGLE-3 draft proposes only the `draft_vocab_size` target tokens its head has rows for
(d2t/t2d map them; Li et al. 2025, EAGLE-3). A day-0 draft takes them from corpus counts
(data/vocab.py), which may not be the traffic's: a token the draft cannot propose is a
rejection at every position the target emits it. The online learner therefore counts the
committed tokens it receives and, when a re-chosen vocabulary would cover a larger share of
them by a margin, changes the vocabulary in place:

- the new ids are the most served tokens, ties kept by the current vocabulary, then by lower
  target id (byte-level BPE ids follow merge order, so a lower id is the more common token);
  the stop tokens always stay;
- a token that stays keeps its head row and its optimizer moments (rows move with their ids);
- a token that enters gets the row a least-squares map from the target's head to the draft's
  head predicts from the target's own row for it (fitted on the tokens both share), so it
  starts where the draft's other tokens sit relative to the target, and the mean optimizer
  moments of the staying rows (with fewer than two staying tokens it takes over a leaving
  token's row, and zero moments);
- shapes never change: d2t, t2d and the head keep their shapes and dtypes, so the next
  publication is an ordinary hot swap and the engine compiles nothing.
"""

from __future__ import annotations

import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.errors import ConfigError
from aurora_jax.models.eagle3 import draft_ids, top_tokens, vocab_maps


@dataclasses.dataclass(frozen=True)
class VocabRefreshConfig:
    """When the online learner re-chooses the draft vocabulary."""

    enabled: bool = True
    """False: the draft keeps the vocabulary it started with."""
    min_tokens: int = 1024
    """Served tokens counted before the first re-choice."""
    min_gain: float = 0.002
    """Re-choose only when the new vocabulary covers at least this share more of the served
    tokens than the current one."""

    def __post_init__(self):
        if self.min_tokens < 0 or not 0 <= self.min_gain < 1:
            raise ConfigError(f"vocab refresh needs min_tokens >= 0 and 0 <= min_gain < 1, got "
                              f"{self.min_tokens} and {self.min_gain}")


class TokenCounts:
    """Thread-safe counts of served target tokens (the engine's trace thread adds; the
    learner reads)."""

    def __init__(self, vocab_size: int):
        self._counts = np.zeros(vocab_size, np.int64)
        self._lock = threading.Lock()

    def add(self, token_ids) -> None:
        ids = np.asarray(token_ids, np.int64).ravel()
        with self._lock:
            self._counts += np.bincount(ids, minlength=len(self._counts))[: len(self._counts)]

    def snapshot(self) -> np.ndarray:
        with self._lock:
            return self._counts.copy()


def outside_share(counts_V: np.ndarray, ids: np.ndarray) -> float:
    """Share of the counted tokens that a draft with vocabulary `ids` cannot propose."""
    total = counts_V.sum()
    return float(1.0 - counts_V[ids].sum() / total) if total else 0.0


def choose_vocab(counts_V: np.ndarray, current_ids: np.ndarray,
                 always: tuple[int, ...] = ()) -> np.ndarray:
    """Sorted target ids of the same size as `current_ids`: `always` first, then the most
    counted tokens; ties go to current members, then to lower ids."""
    return top_tokens(counts_V, len(current_ids), always, prefer=current_ids)


def entering_rows(head_HxVd: np.ndarray, target_head_HtxV: np.ndarray, kept_ids: np.ndarray,
                  kept_cols: np.ndarray, new_ids: np.ndarray) -> np.ndarray:
    """Initial draft head columns [H, n] for target ids `new_ids`: the least-squares linear
    map from target head columns to draft head columns, fitted on the kept tokens."""
    x = np.asarray(target_head_HtxV[:, kept_ids], np.float64).T  # [k, Ht]
    y = np.asarray(head_HxVd[:, kept_cols], np.float64).T  # [k, H]
    a, *_ = np.linalg.lstsq(x, y, rcond=None)  # [Ht, H]
    return (np.asarray(target_head_HtxV[:, new_ids], np.float64).T @ a).T


@dataclasses.dataclass(frozen=True)
class VocabChange:
    """Where each column of the new head comes from."""

    new_ids: np.ndarray  # [Vd] sorted target ids
    source: np.ndarray  # [Vd] old column index, or -1 for an entering token

    @property
    def entering(self) -> int:
        return int((self.source < 0).sum())


def plan_change(old_ids: np.ndarray, new_ids: np.ndarray) -> VocabChange:
    pos = np.searchsorted(old_ids, new_ids)
    pos = np.minimum(pos, len(old_ids) - 1)
    source = np.where(old_ids[pos] == new_ids, pos, -1)
    return VocabChange(new_ids, source)


def remap_columns(x_HxVd, change: VocabChange, entering_HxN) -> jax.Array:
    """`x` with its columns moved to the new vocabulary's order, entering columns filled
    from `entering_HxN` ([H, n] or a broadcastable [H, 1])."""
    x = np.asarray(x_HxVd)
    out = x[:, np.maximum(change.source, 0)].copy()
    new = change.source < 0
    out[:, new] = np.broadcast_to(entering_HxN, (x.shape[0], int(new.sum())))
    return jnp.asarray(out, dtype=x_HxVd.dtype)


def new_buffers(d2t_Vd, t2d_V, new_ids: np.ndarray):
    """d2t and t2d for `new_ids`, with the dtypes and shapes of the old ones."""
    d2t, t2d = vocab_maps(new_ids, len(t2d_V))
    return jnp.asarray(d2t, d2t_Vd.dtype), jnp.asarray(t2d, t2d_V.dtype)


HEAD_PATH = "['lm_head']['kernel']"
"""The draft head's kernel in key paths of the learner state (params and optimizer moments)."""


def remap_learner(state, buffers, target_head_HtxV, new_ids: np.ndarray):
    """(state, buffers, change): a learner state and draft buffers moved to the vocabulary
    `new_ids`, every leaf keeping its shape, dtype and placement. Head columns of staying
    tokens move with them (weights and optimizer moments); entering tokens get the
    least-squares row (see `entering_rows`) and the staying rows' mean moments."""
    old_ids = draft_ids(buffers["d2t"][...])
    change = plan_change(old_ids, new_ids)
    kept = change.source >= 0

    leaving = np.setdiff1d(np.arange(len(old_ids)), change.source[kept])
    fit = kept.sum() >= 2  # a map needs a few shared tokens to be fitted on

    def move(path, leaf):
        if HEAD_PATH not in jax.tree_util.keystr(path):
            return leaf
        x = np.asarray(leaf)
        if ".params" in jax.tree_util.keystr(path):
            # Without shared tokens, entering tokens take over the leaving tokens' rows.
            fill = (entering_rows(x, np.asarray(target_head_HtxV), new_ids[kept],
                                  change.source[kept], new_ids[~kept]) if fit
                    else x[:, leaving])
        else:  # optimizer moments
            fill = (x[:, change.source[kept]].mean(axis=1, keepdims=True) if kept.any()
                    else np.zeros((x.shape[0], 1), x.dtype))
        return jax.device_put(remap_columns(leaf, change, fill), leaf.sharding)

    state = jax.tree_util.tree_map_with_path(move, state)
    d2t, t2d = new_buffers(buffers["d2t"][...], buffers["t2d"][...], new_ids)
    placed = {"d2t": d2t, "t2d": t2d}

    def swap(path, leaf):
        name = path[0].key if hasattr(path[0], "key") else None
        return jax.device_put(placed[name], leaf.sharding) if name in placed else leaf

    return state, jax.tree_util.tree_map_with_path(swap, buffers), change
