"""The (target, draft) pair a serving command starts from: a checkpoint, a random or warm
day-0 draft, or an EAGLE-3 directory whose aux layers the target is loaded to return."""

from __future__ import annotations

from pathlib import Path

from aurora_jax.models.eagle3 import DraftConfig, init_draft
from aurora_jax.models.eagle3_io import load_draft, read_draft_config
from aurora_jax.models.hf_io import load_target


def load_pair(target_dir: str | Path, draft: str | None, *, dtype: str = "float32",
              seed: int = 0, mesh=None, draft_vocab=None):
    """(target, draft) for serving on `mesh` (default one device): `draft` is None (target
    only), "scratch" (a random draft: day 0), "warm" (a day-0 draft warm-started from the
    target's head and top layer, models/draft_init.py) or an EAGLE-3 directory, whose recorded aux
    layers the target is loaded to return. A scratch draft predicts over `draft_vocab`
    (sorted target ids, or a callable of the target config returning them; None: the whole
    target vocabulary)."""
    if draft in (None, "scratch", "warm"):
        target = load_target(target_dir, dtype=dtype, mesh=mesh)
        if draft is None:
            return target, None
        ids = draft_vocab(target.cfg) if callable(draft_vocab) else draft_vocab
        dcfg = DraftConfig.for_target(target.cfg, None if ids is None else len(ids))
        fresh = init_draft(dcfg, seed=seed, dtype=target.dtype, mesh=target.mesh,
                           draft_to_target=ids)
        if draft == "warm":
            from aurora_jax.models.draft_init import warm_start

            fresh = warm_start(fresh, target)
        return target, fresh
    aux = read_draft_config(draft).aux_layers
    target = load_target(target_dir, dtype=dtype, mesh=mesh,
                         cfg_overrides={"aux_layers": tuple(aux)} if aux else None)
    return target, load_draft(draft, target=target.cfg, dtype=target.dtype, mesh=target.mesh)
