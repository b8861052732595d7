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


class _Batches:
    """Wraps train-draft's data pipeline (its grain iterator, checkpointable as before): counts
    the batches a run draws, and can stop a run with Ctrl-C (KeyboardInterrupt) when it asks
    for one batch more than `stop_after`."""

    def __init__(self, monkeypatch):
        from aurora_jax.learn import offline

        self.drawn, self.stop_after = 0, None
        real, batches = offline.training_dataset, self

        class Iterator:
            def __init__(self, it):
                self.it = it

            def __next__(self):
                if batches.stop_after is not None and batches.drawn >= batches.stop_after:
                    raise KeyboardInterrupt
                batches.drawn += 1
                return next(self.it)

            def get_state(self):
                return self.it.get_state()

            def set_state(self, state):
                self.it.set_state(state)

        class Dataset:
            def __init__(self, ds):
                self.ds = ds

            def __iter__(self):
                return Iterator(iter(self.ds))

        monkeypatch.setattr(offline, "training_dataset", lambda *a, **k: Dataset(real(*a, **k)))

    def run(self, args, stop_after=None) -> int:
        """Runs `aurora-jax ARGS`; returns the batches it drew."""
        self.drawn, self.stop_after = 0, stop_after
        assert main(args) == 0
        return self.drawn


def _loss_history(out) -> list[float]:
    """The per-step training losses train-draft keeps in its newest checkpoint."""
    import orbax.checkpoint as ocp

    mgr = ocp.CheckpointManager((out / "checkpoints").absolute())
    try:
        got = mgr.restore(mgr.latest_step(),
                          args=ocp.args.Composite(history=ocp.args.JsonRestore()))
    finally:
        mgr.close()
    return list(got["history"]["losses"])


def _draft_weights(out) -> dict[str, np.ndarray]:
    import safetensors.numpy

    return {k: v for f in sorted((out / "draft").glob("*.safetensors"))
            for k, v in safetensors.numpy.load_file(f).items()}


def test_train_draft_resumes_and_writes_a_draft_the_engine_serves(small_ckpt, tmp_path, capsys,
                                                                  monkeypatch):
    """A run extended to more steps runs only the new ones, on top of the restored history. A
    run stopped by Ctrl-C (between two checkpoints) and started again runs only the remaining
    steps and gives, step for step, the losses and the draft of a run never stopped."""
    from aurora_jax.data.corpus import held_out_code_files

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in held_out_code_files()[:3]:
        (corpus / p.name).write_text(p.read_text(errors="replace"))
    out = tmp_path / "run"
    args = ["train-draft", "--out", str(out), f"target={small_ckpt}", f"data={corpus}",
            "batch_size=4", "seq_len=32", "draft_vocab_size=256", "ttt_steps=2",
            "checkpoint_every=10", "learning_rate=3e-3"]
    batches = _Batches(monkeypatch)
    assert batches.run(args + ["steps=20"]) == 20
    first = json.loads((out / "draft" / "training.json").read_text())
    assert first["steps"] == 20
    uninterrupted, weights = _loss_history(out), _draft_weights(out)
    assert len(uninterrupted) == 20 and uninterrupted[-1] == first["final_loss"]
    assert batches.run(args + ["steps=40"]) == 20  # resumes at step 20
    info = json.loads((out / "draft" / "training.json").read_text())
    assert info["steps"] == 40 and info["final_loss"] < first["final_loss"]
    extended = _loss_history(out)
    assert len(extended) == 40 and extended[:20] == uninterrupted

    # The same 20-step run, stopped by Ctrl-C after step 7 (the interrupt saves it), resumed.
    stopped = tmp_path / "stopped"
    again = list(args)
    again[again.index(str(out))] = str(stopped)
    with pytest.raises(KeyboardInterrupt):
        batches.run(again + ["steps=20"], stop_after=7)
    np.testing.assert_allclose(_loss_history(stopped), uninterrupted[:7], rtol=1e-5)
    assert batches.run(again + ["steps=20"]) == 13
    assert json.loads((stopped / "draft" / "training.json").read_text())["steps"] == 20
    np.testing.assert_allclose(_loss_history(stopped), uninterrupted, rtol=1e-5)
    resumed = _draft_weights(stopped)
    assert resumed.keys() == weights.keys()
    for k, v in weights.items():
        np.testing.assert_allclose(resumed[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
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
