"""Offline draft training (the static baseline): trains, resumes, writes a servable draft."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aurora_jax.cli import main
from aurora_jax.errors import ConfigError
from aurora_jax.learn.offline import OfflineConfig, read_corpus
from aurora_jax.models.eagle3_io import load_draft
from aurora_jax.models.hf_io import load_target


def test_train_draft_resumes_and_writes_a_draft_the_engine_serves(small_ckpt, tmp_path, capsys):
    from aurora_jax.data.corpus import held_out_code_files

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in held_out_code_files()[:3]:
        (corpus / p.name).write_text(p.read_text(errors="replace"))
    out = tmp_path / "run"
    args = ["train-draft", "--target", str(small_ckpt), "--data", str(corpus), "--out", str(out),
            "--batch-size", "4", "--seq-len", "32", "--draft-vocab-size", "256",
            "--ttt-steps", "2", "--checkpoint-every", "10", "--lr", "3e-3"]
    assert main(args + ["--steps", "20"]) == 0
    first = json.loads((out / "draft" / "training.json").read_text())
    assert first["steps"] == 20
    assert main(args + ["--steps", "40"]) == 0  # resumes at step 20
    info = json.loads((out / "draft" / "training.json").read_text())
    assert info["steps"] == 40 and info["final_loss"] < first["final_loss"]
    target = load_target(small_ckpt)
    draft = load_draft(out / "draft", target=target.cfg)
    assert draft.cfg.draft_vocab_size == 256
    ids = np.arange(256) + np.asarray(draft.state["d2t"][...])
    assert set(target.cfg.eos_token_ids) <= set(ids.tolist())  # stop tokens always drafted
    capsys.readouterr()
    gen = ["generate", "--target", str(small_ckpt), "--prompt", "import os\n",
           "--max-new-tokens", "12", "--json"]
    assert main(gen) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(gen + ["--draft", str(out / "draft"), "--spec", "chain"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain["token_ids"]


def test_bad_training_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_corpus(tmp_path / "missing")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 1}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        read_corpus(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="seq_len"):
        OfflineConfig(seq_len=1)


def test_a_draft_vocabulary_as_large_as_the_targets_keeps_every_token(small_ckpt, tmp_path):
    """The CLI default (8192 rows) on a smaller vocabulary means the whole vocabulary."""
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.learn.offline import train_draft

    target = load_target(small_ckpt)
    texts = ["def f(x):\n    return x + 1\n" * 40]
    train_draft(target, Tokenizer.load(small_ckpt), texts, tmp_path / "run",
                OfflineConfig(steps=2, batch_size=2, seq_len=16, ttt_steps=1,
                              draft_vocab_size=8192))
    draft = load_draft(tmp_path / "run" / "draft", target=target.cfg)
    assert draft.cfg.draft_vocab_size == target.cfg.vocab_size == 512
