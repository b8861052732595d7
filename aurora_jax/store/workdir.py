"""A workdir: what an engine and a learner process share (a local directory or a kvstore URL,
store/kvstore.py), so the two may run on hosts that share nothing but a bucket:

    <workdir>/traces        the engine writes finished sequences here (trace_store.py)
    <workdir>/drafts        the learner publishes versioned drafts here (draft_store.py)
    <workdir>/engine.json   the engine's speculation setting (the learner's tree size)
"""

from __future__ import annotations

from aurora_jax.store import kvstore

ENGINE_KEY = "engine.json"


def workdir_paths(workdir: kvstore.Location) -> tuple[str, str]:
    """(traces, drafts): the two stores of a workdir, in its own form (paths or URLs);
    ConfigError for a location that is neither a path nor a supported URL."""
    return kvstore.join(workdir, "traces"), kvstore.join(workdir, "drafts")
