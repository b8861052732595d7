"""`builtin-tiny`: a small target trained on the machine itself (`prepare --recipe tiny`).

The embedded default target is SmolLM2-135M-Instruct (aurora_jax/builtin/); this recipe is
the model that needs nothing but Python: a SentencePiece tokenizer and a small
Llama-architecture decoder trained for a few minutes on CPU on text every Python installation
has (the standard library's source as code, pydoc's topic texts as prose; data/corpus.py).
The result is a Hugging Face checkpoint directory (config.json, model.safetensors,
generation_config.json, tokenizer.model) that `load_target` and `Tokenizer.load` read like any
other, plus prepare_summary.json with the losses reached.

Cache layout under `<cache>/builtin-tiny/` (cache: `--cache-dir`, else $AURORA_JAX_CACHE,
else ~/.cache/aurora-jax):
  hf/     the finished model; it appears only complete (written elsewhere, then renamed)
  work/   the tokenizer and config of an unfinished run
  ckpt/   orbax checkpoints of an unfinished run (train state + grain iterator position)
An interrupted prepare resumes from ckpt/; work/ and ckpt/ are removed once hf/ is in place.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aurora_jax import config_io
from aurora_jax.builtin.cache import cache_lock, cache_root
from aurora_jax.errors import ConfigError

_REQUIRED = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
             "prepare_summary.json")
# SentencePiece ids of the special pieces (Llama-2 layout).
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """The recipe of the built-in target; configs/prepare.yaml holds the same defaults.

    Sized so the whole prepare takes about 4 minutes on 2 CPU cores (training ~3.8 of them);
    `time_budget_s` stops training early on slower machines. Measured on 2 vCPUs with XLA CPU
    (~5k tokens/s for this model): at this compute the loss is limited by the number of
    optimizer steps, so the model is small (1.1M parameters; 256- and 128-wide models reached
    a worse held-out loss in the same time) and a step is only 4 x 256 tokens.
    """

    # ---- corpus and tokenizer
    max_corpus_bytes: int = 16_000_000
    """Upper bound on training text (prose first, then code files in a fixed hash order)."""
    vocab_size: int = 4096
    """SentencePiece BPE vocabulary (256 byte-fallback pieces and 4 specials included)."""
    tokenizer_sentences: int = 200_000
    """Lines sampled (with `seed`) to train the tokenizer on; more is slower, barely better."""
    # ---- model (Llama architecture)
    hidden_size: int = 96
    """H: residual stream width."""
    intermediate_size: int = 256
    """F: SwiGLU MLP width."""
    num_layers: int = 3
    """L: decoder layers."""
    num_heads: int = 2
    """Query heads."""
    num_kv_heads: int = 1
    """Key/value heads (grouped-query attention)."""
    head_dim: int = 48
    """D: width of one head."""
    max_position_embeddings: int = 1024
    """Longest sequence the exported model declares (positions past `seq_len` are never
    trained, so quality drops beyond it)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    tie_word_embeddings: bool = False
    """Share the token embedding with the lm_head."""
    # ---- training
    seq_len: int = 256
    """T: tokens per training window."""
    batch_size: int = 4
    """Windows per step."""
    steps: int = 1050
    """Optimizer steps (the cosine schedule's length)."""
    learning_rate: float = 8e-3
    """Peak AdamW learning rate."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    checkpoint_every: int = 200
    """Steps between orbax checkpoints (an interrupted run loses at most this many)."""
    time_budget_s: float = 240.0
    """Training stops after this many seconds even if `steps` are not done."""
    eval_windows: int = 32
    """Held-out windows scored per domain for the summary's held-out losses."""
    seed: int = 0
    """Seeds tokenizer sampling, weight init and data order."""

    def __post_init__(self):
        lenient = {"seed", "weight_decay", "warmup_steps", "min_lr_ratio", "tie_word_embeddings"}
        for f in dataclasses.fields(self):
            if f.name not in lenient and not getattr(self, f.name) > 0:
                raise ConfigError(f"{f.name} must be positive, got {getattr(self, f.name)!r}")
        if self.seed < 0 or self.weight_decay < 0:
            raise ConfigError("seed and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        if self.vocab_size < 384:  # 4 specials, 256 bytes, newline, ~100 characters, merges
            raise ConfigError(f"vocab_size must be >= 384, got {self.vocab_size}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads})")
        if self.seq_len > self.max_position_embeddings:
            raise ConfigError(f"seq_len ({self.seq_len}) exceeds max_position_embeddings "
                              f"({self.max_position_embeddings})")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "prepare config") -> PrepareConfig:
        """Validated construction; unknown keys and wrong types raise ConfigError."""
        return config_io.from_dict(cls, raw, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PrepareConfig:
        return cls.from_dict(config_io.read_yaml(path), source=str(path))

    def target_config(self, vocab_size: int):
        """The TargetConfig of the model this recipe trains, for a tokenizer of `vocab_size`."""
        from aurora_jax.models.config import TargetConfig

        return TargetConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rope_theta=self.rope_theta, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=BOS_ID,
            eos_token_ids=(EOS_ID,), pad_token_id=PAD_ID)


# ------------------------------------------------------------------------------- locations
NAME = "builtin-tiny"


def builtin_dir(cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of this model (whether or not it exists yet)."""
    return cache_root(cache_dir) / NAME / "hf"


def is_prepared(cache_dir: str | Path | None = None) -> bool:
    """Whether a complete model is in the cache."""
    d = builtin_dir(cache_dir)
    return all((d / name).is_file() for name in _REQUIRED)


def load_summary(cache_dir: str | Path | None = None) -> dict:
    """The prepare_summary.json of the model."""
    return json.loads((builtin_dir(cache_dir) / "prepare_summary.json").read_text())


def ensure_builtin(cache_dir: str | Path | None = None,
                   log: Callable[[str], None] = print) -> Path:
    """The model's directory, prepared first (and said so) if the cache lacks it."""
    if is_prepared(cache_dir):
        return builtin_dir(cache_dir)
    log(f"aurora-jax: no {NAME} model in {cache_root(cache_dir)}; preparing it now "
        f"(about 4 minutes on 2 CPU cores)")
    return prepare(cache_dir)


# ------------------------------------------------------------------------------- preparing
def train_tokenizer(lines: list[str], cfg: PrepareConfig) -> bytes:
    """A SentencePiece BPE model (serialized) trained on `lines`.

    Whitespace is kept exactly (identity normalization, no dummy prefix, runs of spaces may
    form pieces) so indentation survives; newline is a piece of its own; byte fallback makes
    every string encodable, so decode(encode(text)) == text.
    """
    import sentencepiece as spm

    if len(lines) > cfg.tokenizer_sentences:  # sample here, with our seed: reproducible
        keep = np.random.default_rng(cfg.seed).choice(len(lines), cfg.tokenizer_sentences,
                                                      replace=False)
        lines = [lines[i] for i in np.sort(keep)]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe",
            vocab_size=cfg.vocab_size, hard_vocab_limit=False, byte_fallback=True,
            character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            max_sentence_length=1 << 14, num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:  # the one a recipe can cause: too few pieces for the characters
        raise ConfigError(f"cannot train the tokenizer with vocab_size={cfg.vocab_size}: "
                          f"{e}") from e
    return model.getvalue()


def prepare(cache_dir: str | Path | None = None, config: PrepareConfig = PrepareConfig(),
            force: bool = False, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None) -> Path:
    """Trains the built-in model into the cache (resuming an interrupted run) and returns its
    Hugging Face directory. A complete model is kept unless `force`.

    `on_step(step, loss)` sees every training step (a step late); raising from it interrupts
    the run like a crash would.
    """
    root = cache_root(cache_dir) / NAME
    with cache_lock(root):
        if is_prepared(cache_dir) and not force:
            return builtin_dir(cache_dir)
        return _run(root, config, force, progress, on_step)


def write_hf_dir(root: Path, target_cfg, params, tokenizer_model: bytes, summary: dict) -> Path:
    """Exports into root/hf atomically: a complete directory appears, or nothing changes."""
    from aurora_jax.models.hf_io import save_target

    final = root / "hf"
    tmp = root / f"hf.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_target(tmp, target_cfg, params, dtype="float32")
    (tmp / "tokenizer.model").write_bytes(tokenizer_model)
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True,
        "add_eos_token": False, "model_max_length": target_cfg.max_position_embeddings},
        indent=2))
    summary = dict(summary, created=datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), python=sys.version.split()[0])
    (tmp / "prepare_summary.json").write_text(json.dumps(summary, indent=2))
    old = root / f"hf.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _reset_if_stale(root: Path, cfg: PrepareConfig, force: bool, say) -> None:
    """Drops unfinished state that a different recipe (or --force) made unusable."""
    work, ckpt = root / "work", root / "ckpt"
    recorded = work / "prepare_config.json"
    want = dataclasses.asdict(cfg)
    if work.exists() or ckpt.exists():
        same = recorded.is_file() and json.loads(recorded.read_text()) == want
        if force or not same:
            say("discarding an unfinished run" + ("" if force else " of a different recipe"))
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(ckpt, ignore_errors=True)
        else:
            say(f"resuming the unfinished run in {root}")
    work.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(want, indent=2))


def _tokenizer(work: Path, docs, cfg: PrepareConfig, say) -> bytes:
    """The run's tokenizer: trained once, kept in work/ so a resumed run uses the same one."""
    path = work / "tokenizer.model"
    if path.is_file():
        return path.read_bytes()
    t0 = time.monotonic()
    lines = [line for d in docs for line in d.text.split("\n") if line.strip()]
    model = train_tokenizer(lines, cfg)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(model)
    tmp.rename(path)
    say(f"trained a {cfg.vocab_size}-piece tokenizer in {elapsed(t0)} s")
    return model


def _tokens(sp, docs) -> np.ndarray:
    from aurora_jax.data.pipeline import pack_documents

    # bos first, as Tokenizer.encode does for prompts; pack_documents closes each with eos.
    return pack_documents(sp.encode([d.text for d in docs], add_bos=True), EOS_ID)


def _held_out_losses(sp, graphdef, buffers, params, cfg: PrepareConfig) -> dict:
    """Mean next-token loss (nats/token) on the held-out code files and prose topics."""
    from aurora_jax.builtin.train_target import make_eval_step, mean_loss
    from aurora_jax.data import corpus
    from aurora_jax.data.pipeline import eval_batches, windows

    eval_step = make_eval_step(graphdef)
    out: dict[str, float | None] = {}
    held = corpus.held_out_documents()
    for domain in ("code", "prose"):
        stream = _tokens(sp, [d for d in held if d.domain == domain])
        if len(stream) <= cfg.seq_len:
            out[domain] = None
            continue
        batches = eval_batches(windows(stream, cfg.seq_len), cfg.batch_size, cfg.eval_windows)
        loss = mean_loss(eval_step, params, buffers, batches)
        out[domain] = None if loss is None else round(loss, 4)
    return out


def _run(root: Path, cfg: PrepareConfig, force: bool, progress: bool, on_step) -> Path:
    import sentencepiece as spm

    from aurora_jax.builtin import train_target
    from aurora_jax.data import corpus
    from aurora_jax.data.pipeline import training_dataset, windows
    from aurora_jax.learn.fit import fit
    from aurora_jax.learn.optimizer import OptimizerSettings, make_optimizer

    t0 = time.monotonic()
    say = ((lambda m: print(f"aurora-jax: {m}", file=sys.stderr, flush=True)) if progress
           else (lambda m: None))
    _reset_if_stale(root, cfg, force, say)
    docs = corpus.training_documents(cfg.max_corpus_bytes)
    sp_model = _tokenizer(root / "work", docs, cfg, say)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    stream = _tokens(sp, docs)
    n_bytes = sum(len(d.text.encode()) for d in docs)
    say(f"corpus: {len(docs)} documents, {n_bytes / 1e6:.1f} MB, {len(stream):,} tokens; "
        f"training {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens")

    target_cfg = cfg.target_config(sp.get_piece_size())
    tx = make_optimizer(OptimizerSettings(
        learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
        min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip))
    graphdef, buffers, state = train_target.init_model(target_cfg, cfg.seed, tx)
    iterator = iter(training_dataset(windows(stream, cfg.seq_len), cfg.batch_size, cfg.seed))
    result = fit(
        state, buffers, train_target.make_train_step(graphdef, tx), iterator,
        total_steps=cfg.steps, ckpt_dir=root / "ckpt", checkpoint_every=cfg.checkpoint_every,
        time_budget_s=cfg.time_budget_s, tokens_per_step=cfg.batch_size * cfg.seq_len,
        progress=progress, on_step=on_step)
    if result.start_step:
        say(f"resumed at step {result.start_step}")
    if result.stopped_by_time:
        say(f"time budget of {cfg.time_budget_s:.0f} s reached after {len(result.losses)} steps")
    params = result.state.params
    held_out = _held_out_losses(sp, graphdef, buffers, params, cfg)
    tail = result.losses[-10:]
    summary = {
        "steps": len(result.losses), "target_steps": cfg.steps,
        "resumed_from_step": result.start_step, "stopped_by_time_budget": result.stopped_by_time,
        "first_train_loss": round(result.losses[0], 4),
        "final_train_loss": round(sum(tail) / len(tail), 4),
        "held_out_loss": held_out,
        "held_out_code_files": [str(p.relative_to(corpus.stdlib_root()))
                                for p in corpus.held_out_code_files()],
        "held_out_prose_topics": corpus.held_out_prose_topics(),
        "corpus": {"documents": len(docs), "bytes": n_bytes, "tokens": int(len(stream))},
        "num_params": target_cfg.num_params,
        "seconds": {"total": elapsed(t0), "training": round(result.seconds, 1)},
        "train_losses": [round(x, 4) for x in result.losses],
        "config": dataclasses.asdict(cfg),
    }
    out = write_hf_dir(root, target_cfg, params, sp_model, summary)
    shutil.rmtree(root / "work", ignore_errors=True)
    shutil.rmtree(root / "ckpt", ignore_errors=True)
    say(f"built-in model ready in {out} ({elapsed(t0)} s; held-out loss: code "
        f"{held_out['code']}, prose {held_out['prose']} nats/token)")
    return out


def elapsed(t0: float) -> float:
    """Seconds since monotonic time t0, rounded for messages."""
    return round(time.monotonic() - t0, 1)
