"""The builtin-tiny target: corpus split, grain pipeline, PrepareConfig, and prepare end to
end with a tiny recipe (seconds, not minutes)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from aurora_jax.builtin import ENV_CACHE, default_cache_dir
from aurora_jax.builtin import tiny as builtin
from aurora_jax.builtin.tiny import PrepareConfig
from aurora_jax.data import corpus
from aurora_jax.data.pipeline import eval_batches, pack_documents, training_dataset, windows
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import ConfigError
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.hf_io import load_target
from aurora_jax.models.transformer import forward

REPO = Path(__file__).resolve().parents[1]
TINY = PrepareConfig(
    max_corpus_bytes=150_000, vocab_size=400, tokenizer_sentences=5_000, hidden_size=64,
    intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
    max_position_embeddings=128, seq_len=64, batch_size=8, steps=12, learning_rate=1e-2,
    warmup_steps=2, checkpoint_every=4, eval_windows=8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = builtin.prepare(cache, TINY, progress=False)
    return cache, out, builtin.load_summary(cache)


# ------------------------------------------------------------------------------ prepare
def test_prepared_model_loads_and_tokenizer_round_trips(prepared):
    cache, out, _ = prepared
    assert out == builtin.builtin_dir(cache) and builtin.is_prepared(cache)
    assert not list(out.parent.glob("hf.*")), "no temporary export directory left behind"
    assert not (out.parent / "ckpt").exists() and not (out.parent / "work").exists()
    target = load_target(out)
    tok = Tokenizer.load(out)
    assert target.cfg.vocab_size == tok.vocab_size
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (
        target.cfg.bos_token_id, target.cfg.eos_token_ids, target.cfg.pad_token_id)
    snippet = "def f(x):\n\tif x:  # naïve → ok\n        return {'a': [1, 2]}\n\n"
    ids = tok.encode(snippet)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids) == snippet
    tokens = jnp.asarray([ids])
    logits, *_ = forward(target.graphdef, target.state, tokens, jnp.arange(len(ids))[None],
                         causal_mask(jnp.asarray([len(ids)]), len(ids)))
    assert logits.shape == (1, len(ids), tok.vocab_size)
    assert bool(jnp.isfinite(logits).all())


def test_training_loss_went_down(prepared):
    _, _, summary = prepared
    losses = summary["train_losses"]
    assert summary["steps"] == TINY.steps == len(losses)
    assert np.mean(losses[-3:]) < losses[0] - 0.5
    uniform = np.log(summary["config"]["vocab_size"])
    for domain in ("code", "prose"):
        assert summary["held_out_loss"][domain] < uniform - 0.5


def test_summary_names_the_held_out_split(prepared):
    _, _, summary = prepared
    held = {str(p.relative_to(corpus.stdlib_root())) for p in corpus.held_out_code_files()}
    assert set(summary["held_out_code_files"]) == held
    assert summary["config"] == dataclasses.asdict(TINY)


def test_ensure_builtin_reuses_a_complete_cache(prepared):
    cache, out, _ = prepared
    weights = out / "model.safetensors"
    before = weights.stat().st_mtime_ns
    said = []
    assert builtin.ensure_builtin(cache, log=said.append) == out
    assert builtin.prepare(cache, TINY, progress=False) == out
    assert said == [] and weights.stat().st_mtime_ns == before


def test_ensure_builtin_announces_and_prepares_an_empty_cache(tmp_path, monkeypatch):
    calls, said = [], []
    monkeypatch.setattr(builtin, "prepare", lambda cache_dir: calls.append(cache_dir) or "dir")
    assert builtin.ensure_builtin(tmp_path, log=said.append) == "dir"
    assert calls == [tmp_path]
    assert len(said) == 1 and "preparing it now" in said[0] and str(tmp_path) in said[0]


def test_crashed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(
        prepared, tmp_path):
    _, _, uninterrupted = prepared

    def crash_at_6(step, loss):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        builtin.prepare(tmp_path, TINY, progress=False, on_step=crash_at_6)
    assert not builtin.is_prepared(tmp_path)
    ckpt = tmp_path / "builtin-tiny" / "ckpt"
    assert ocp.CheckpointManager(ckpt).latest_step() == 4  # the last periodic checkpoint

    builtin.prepare(tmp_path, TINY, progress=False)
    resumed = builtin.load_summary(tmp_path)
    assert resumed["resumed_from_step"] == 4 and resumed["steps"] == TINY.steps
    # Same weights, same batches from the restored grain iterator: the same losses.
    np.testing.assert_allclose(resumed["train_losses"], uninterrupted["train_losses"],
                               atol=2e-4)


def test_ctrl_c_saves_a_checkpoint_between_periodic_ones(tmp_path):
    def interrupt_at_2(step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        builtin.prepare(tmp_path, TINY, progress=False, on_step=interrupt_at_2)
    # Step 3 was already dispatched when step 2's loss was read: it is the one saved.
    assert ocp.CheckpointManager(tmp_path / "builtin-tiny" / "ckpt").latest_step() == 3


def test_changed_recipe_discards_an_unfinished_run(tmp_path):
    work = tmp_path / "builtin-tiny" / "work"
    work.mkdir(parents=True)
    (work / "prepare_config.json").write_text(json.dumps({"steps": 1}))
    (work / "tokenizer.model").write_bytes(b"stale")
    builtin._reset_if_stale(tmp_path / "builtin-tiny", TINY, force=False, say=lambda m: None)
    assert not (work / "tokenizer.model").exists()
    assert json.loads((work / "prepare_config.json").read_text()) == dataclasses.asdict(TINY)


# ------------------------------------------------------------------------------ config
def test_yaml_recipe_equals_the_defaults():
    path = REPO / "configs" / "prepare.yaml"
    assert set(yaml.safe_load(path.read_text())) == {
        f.name for f in dataclasses.fields(PrepareConfig)}
    assert PrepareConfig.from_yaml(path) == PrepareConfig()


@pytest.mark.parametrize("text, message", [
    ("lerning_rate: 0.1\n", "unknown key 'lerning_rate' \\(did you mean 'learning_rate'"),
    ("steps: ten\n", "steps must be int"),
    ("num_kv_heads: 3\n", "multiple of num_kv_heads"),
    ("seq_len: 4096\n", "exceeds max_position_embeddings"),
    ("- 1\n", "expected a mapping"),
])
def test_bad_yaml_raises_config_error(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        PrepareConfig.from_yaml(path)


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    assert builtin.builtin_dir() == tmp_path / "builtin-tiny" / "hf"
    monkeypatch.delenv(ENV_CACHE)
    assert default_cache_dir() == Path.home() / ".cache" / "aurora-jax"


# ------------------------------------------------------------------------------ data
def test_pipeline_state_round_trip_gives_identical_batches():
    stream = pack_documents([list(range(1, 400)), list(range(500, 900))], eos_id=0)
    w = windows(stream, seq_len=16)
    it = iter(training_dataset(w, batch_size=4, seed=7))
    for _ in range(30):  # past the first epoch (50 windows = 12 batches)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    again = iter(training_dataset(w, batch_size=4, seed=7))
    again.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(again), want)
    assert expected[0].shape == (4, 17) and expected[0].dtype == np.int32


def test_pipeline_covers_each_window_once_per_epoch():
    stream = np.arange(16 * 40 + 1, dtype=np.int32)
    w = windows(stream, seq_len=16)
    assert len(w) == 40
    it = iter(training_dataset(w, batch_size=8, seed=0))
    epoch = np.concatenate([next(it) for _ in range(5)])
    # Windows overlap by one token, so every stream token after the first is a target once.
    np.testing.assert_array_equal(np.sort(epoch[:, 0]), np.arange(0, 640, 16))
    np.testing.assert_array_equal(epoch[:, 1:] - epoch[:, :-1], 1)
    second = np.concatenate([next(it) for _ in range(5)])
    assert not np.array_equal(second[:, 0], epoch[:, 0]), "each epoch is reshuffled"


def test_eval_batches_pad_to_the_batch_shape():
    w = windows(np.arange(16 * 10 + 1, dtype=np.int32), seq_len=16)
    batches = eval_batches(w, batch_size=4, max_windows=10)
    assert [n for _, n in batches] == [4, 4, 2]
    assert all(x.shape == (4, 17) for x, _ in batches)


def test_corpus_split_is_disjoint_and_has_both_domains():
    held = corpus.held_out_documents()
    train = corpus.training_documents()
    assert {d.domain for d in held} == {d.domain for d in train} == {"code", "prose"}
    assert not {d.name for d in held} & {d.name for d in train}
    root = corpus.stdlib_root()
    assert corpus.held_out_code_files() == [root / d.name for d in held if d.domain == "code"]
    limited = corpus.training_documents(max_bytes=100_000)
    assert sum(len(d.text.encode()) for d in limited) <= 100_000
    assert limited == corpus.training_documents(max_bytes=100_000)  # deterministic
    assert not any("site-packages" in d.name or "/test/" in f"/{d.name}" for d in train)
