"""A day-0 draft vocabulary: the target tokens the machine can count before any traffic.

An EAGLE-3 draft predicts over a reduced vocabulary (its lm_head has `draft_vocab_size` rows;
d2t/t2d map them to target ids; Li et al. 2025, EAGLE-3). Trained drafts take the most frequent
tokens of their training data. A draft that starts from scratch has no data yet, so it takes
the most frequent tokens of the built-in corpus (the standard library's source and pydoc's
prose, data/corpus.py) under the target's own tokenizer, plus the stop tokens, which a draft
must be able to propose for a generation to end early.
"""

from __future__ import annotations

import numpy as np

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.models.eagle3 import build_draft_vocab

DEFAULT_CORPUS_BYTES = 4_000_000
"""Text counted for day-0 frequencies: enough for the head of a 49k vocabulary (counting
takes a few seconds), small enough to stay out of the way of serving."""


def corpus_token_ids(tokenizer: Tokenizer, max_bytes: int = DEFAULT_CORPUS_BYTES) -> np.ndarray:
    """The built-in training corpus (up to `max_bytes`) as one stream of target token ids."""
    from aurora_jax.data.corpus import training_documents

    docs = training_documents(max_bytes)
    return np.concatenate([np.asarray(tokenizer.encode(d.text), np.int64) for d in docs])


def day0_draft_vocab(tokenizer: Tokenizer, vocab_size: int, draft_vocab_size: int,
                     stop_ids: tuple[int, ...] = (),
                     max_bytes: int = DEFAULT_CORPUS_BYTES) -> np.ndarray:
    """Sorted target ids of a scratch draft's vocabulary: the `draft_vocab_size` most frequent
    built-in corpus tokens, the stop tokens always among them."""
    stream = corpus_token_ids(tokenizer, max_bytes)
    return build_draft_vocab(stream, vocab_size, draft_vocab_size, always=tuple(stop_ids))


def coverage(token_ids, draft_ids: np.ndarray, vocab_size: int) -> float:
    """Share of `token_ids` that a draft with vocabulary `draft_ids` can propose at all."""
    inside = np.zeros(vocab_size, bool)
    inside[draft_ids] = True
    ids = np.asarray(token_ids, np.int64).ravel()
    return float(inside[ids].mean()) if ids.size else 1.0


def scratch_draft_vocab(draft_vocab_size: int | None, tokenizer: Tokenizer):
    """What `load_pair(..., draft_vocab=)` takes to give a scratch draft its day-0 vocabulary:
    a function of the target config (None where the draft keeps the whole vocabulary).
    Deterministic, so an engine and a learner process that both start from scratch agree."""
    if draft_vocab_size is None:
        return None

    def choose(tcfg):
        if draft_vocab_size >= tcfg.vocab_size:
            return None
        stops = tokenizer.stop_ids(tcfg.eos_token_ids)
        return day0_draft_vocab(tokenizer, tcfg.vocab_size, draft_vocab_size, stops)

    return choose
