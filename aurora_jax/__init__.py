"""aurora-jax: speculative-decoding serving whose draft keeps learning from live traffic.

What a launcher script needs is exported here (imported on first use, so `import aurora_jax`
stays cheap):

    import aurora_jax as aj

    target = aj.load_target("/path/to/ckpt")                       # Hugging Face or .gguf
    draft = aj.load_draft("/path/to/eagle3", target=target.cfg)    # or aj.init_draft(...)
    engine = aj.Engine(target, draft, aj.SpecConfig(mode="tree"), max_slots=8)
    run = engine.run([aj.Request(aj.Tokenizer.load("/path/to/ckpt").encode("Hi"), 32)])

- models: `load_target`, `load_draft`, `init_draft`, `load_pair`, `Target`, `Draft`,
  `DraftConfig`, `make_mesh` (tensor parallelism over local devices);
- serving: `Tokenizer`, `Engine`, `Request`, `RequestResult`, `SpecConfig`, `SamplingParams`;
- a whole stack: `StackConfig`, `build_stack` (target, draft, one engine per speculation
  setting, their traces and the learner, with one lifecycle: `Stack.run`, `Stack.close`),
  `DraftChannel` (the one way a new draft reaches the engines);
- learning: `Learner`, `LossConfig`, `OnlineConfig`, `OnlineLearner`, `online_engine` (an
  engine whose traces feed an online learner);
- the job: `RunConfig`, `run_job` (what `aurora-jax run` does).

Shape vocabulary. Array names carry their axes after an underscore (`logits_BxTxV`), and
comments give them in brackets (`# [B, S]`). Every letter used:

    B   batch: engine slots, or the rows of a learner batch
    b   a group of rows inside a batch (the requests one prefill admits)
    T   tokens (positions) in one forward: prompt length, tree size, sequence window;
        T1 = T + 1 (a window plus its next token)
    S   KV-cache slots (the cache length)
    N   draft-tree nodes, the root excluded; N1 = N + 1 with the root (slot 0)
    Nt  stored trees (trace shards)
    R   committed block: max draft depth + 1 (accepted nodes plus the bonus token)
    L   layers
    H   hidden size (Ht: the target's, where a draft's differs)
    V   target vocabulary; Vd draft vocabulary
    Q   query heads; K key/value heads; G = Q / K query heads per KV head
    D   head dimension (Dh: half of it, the rotary frequencies)
    A   aux layers whose hidden states the draft reads (EAGLE-3: 3)
    J   keys of the new block in tree attention (J = T, or more for a side buffer)
    C   cache positions in one kernel block
    E   stop (end-of-sequence) token ids
    M   finished sequences kept for n-gram lookup
    P   prompt positions (prefill traces)
    W   windows cut from a token stream
    O, I  output and input features of a weight matrix
    g   n-gram length
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "load_target": "aurora_jax.models.hf_io",
    "load_draft": "aurora_jax.models.eagle3_io",
    "init_draft": "aurora_jax.models.eagle3",
    "load_pair": "aurora_jax.models.loading",
    "Target": "aurora_jax.models.transformer",
    "Draft": "aurora_jax.models.eagle3",
    "DraftConfig": "aurora_jax.models.eagle3",
    "make_mesh": "aurora_jax.models.sharding",
    "Tokenizer": "aurora_jax.data.tokenizer",
    "Engine": "aurora_jax.engine.engine",
    "Request": "aurora_jax.engine.batcher",
    "RequestResult": "aurora_jax.engine.batcher",
    "SpecConfig": "aurora_jax.speculative.config",
    "SamplingParams": "aurora_jax.sampling",
    "Learner": "aurora_jax.learn.learner",
    "LossConfig": "aurora_jax.learn.losses",
    "OnlineConfig": "aurora_jax.learn.online",
    "OnlineLearner": "aurora_jax.learn.online",
    "online_engine": "aurora_jax.stack",
    "StackConfig": "aurora_jax.stack",
    "build_stack": "aurora_jax.stack",
    "Stack": "aurora_jax.stack",
    "DraftChannel": "aurora_jax.engine.channel",
    "RunConfig": "aurora_jax.run.config",
    "run_job": "aurora_jax.run.job",
}

__all__ = [  # what _EXPORTS maps (tests/test_api.py checks the two agree)
    "load_target", "load_draft", "init_draft", "load_pair", "Target", "Draft", "DraftConfig",
    "make_mesh", "Tokenizer", "Engine", "Request", "RequestResult", "SpecConfig", "SamplingParams",
    "Learner", "LossConfig", "OnlineConfig", "OnlineLearner", "online_engine", "StackConfig",
    "build_stack", "Stack", "DraftChannel", "RunConfig", "run_job",
]

if TYPE_CHECKING:
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.engine.batcher import Request, RequestResult
    from aurora_jax.engine.channel import DraftChannel
    from aurora_jax.engine.engine import Engine
    from aurora_jax.learn.learner import Learner
    from aurora_jax.learn.losses import LossConfig
    from aurora_jax.learn.online import OnlineConfig, OnlineLearner
    from aurora_jax.models.eagle3 import Draft, DraftConfig, init_draft
    from aurora_jax.models.eagle3_io import load_draft
    from aurora_jax.models.hf_io import load_target
    from aurora_jax.models.loading import load_pair
    from aurora_jax.models.sharding import make_mesh
    from aurora_jax.models.transformer import Target
    from aurora_jax.run.config import RunConfig
    from aurora_jax.run.job import run_job
    from aurora_jax.sampling import SamplingParams
    from aurora_jax.speculative.config import SpecConfig
    from aurora_jax.stack import Stack, StackConfig, build_stack, online_engine


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aurora_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
