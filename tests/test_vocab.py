"""The day-0 draft vocabulary: the most frequent built-in corpus tokens under the target's
tokenizer, stop tokens always in, and the same choice every time (an engine and a learner
process that both start from scratch must agree)."""

from __future__ import annotations

import numpy as np

from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.data.vocab import corpus_token_ids, coverage, day0_draft_vocab, scratch_draft_vocab
from aurora_jax.models.config import read_hf_config


def test_day0_vocabulary_is_the_most_frequent_tokens_plus_the_stops(small_ckpt):
    tok = Tokenizer.load(small_ckpt)
    cfg = read_hf_config(small_ckpt)
    stream = corpus_token_ids(tok, max_bytes=200_000)
    counts = np.bincount(stream, minlength=cfg.vocab_size)
    rare_stop = int(np.argmin(counts))  # pretend the rarest token ends a turn
    ids = day0_draft_vocab(tok, cfg.vocab_size, 100, (rare_stop,), max_bytes=200_000)
    assert len(ids) == 100 and np.all(np.diff(ids) > 0) and rare_stop in ids
    chosen = np.zeros(cfg.vocab_size, bool)
    chosen[ids] = True
    chosen[rare_stop] = False
    # Every chosen token (but the stop) is at least as frequent as every token left out.
    assert counts[chosen].min() >= counts[~chosen & (np.arange(cfg.vocab_size) != rare_stop)].max()
    assert coverage(stream, ids, cfg.vocab_size) > 100 / cfg.vocab_size  # frequent, not random
    again = scratch_draft_vocab(100, tok)
    assert scratch_draft_vocab(None, tok) is None
    first = again(cfg)
    assert len(first) == 100 and set(cfg.eos_token_ids) <= set(first.tolist())
    np.testing.assert_array_equal(first, scratch_draft_vocab(100, Tokenizer.load(small_ckpt))(cfg))
    assert scratch_draft_vocab(cfg.vocab_size, tok)(cfg) is None
