"""The static baseline: train an EAGLE-3 draft offline on a text corpus.

The target runs over windows of the corpus inside the jitted step to make the same features
the engine records while serving (aux hidden states and final hidden state at every position),
and the draft trains on them with the same objective (training-time test; there are no
rejected tree nodes offline, so the discard term is absent). The loop is the one that trains
the built-in target (learn/fit.py): a grain pipeline whose position is checkpointed with
orbax beside the learner state, a progress bar, and resumption from the last checkpoint. The
result is written in the Hugging Face EAGLE-3 layout, servable here and by SGLang/vLLM.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax import interrupt
from aurora_jax.data.pipeline import pack_documents, training_dataset, windows
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.errors import ConfigError
from aurora_jax.learn.fit import fit
from aurora_jax.learn.learner import Learner, learner_step_fn
from aurora_jax.learn.losses import LearnBatch, LossConfig
from aurora_jax.learn.optimizer import OptimizerSettings, make_optimizer
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.config import DtypeName
from aurora_jax.models.eagle3 import Draft, DraftConfig, build_draft_vocab, init_draft
from aurora_jax.models.eagle3_io import save_draft
from aurora_jax.models.transformer import Target

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


@dataclasses.dataclass(frozen=True)
class OfflineConfig:
    """An offline draft-training run (`aurora-jax train-draft --config YAML key=value ...`)."""

    target: str = "builtin"
    """The target whose features the draft learns: "builtin", "builtin-tiny", a Hugging
    Face checkpoint directory or a .gguf file (the command loads it)."""
    data: str | None = None
    """The corpus: a text file, a directory of .py/.txt/.md/.rst files, or a JSONL file with
    a "text" field per line (the command reads it; required there)."""
    dtype: DtypeName = "auto"
    """Target and draft parameter dtype; auto: float32 on CPU, bfloat16 on GPU/TPU."""
    steps: int = 1000
    """Learner steps."""
    batch_size: int = 8
    """Windows per step."""
    seq_len: int = 128
    """Tokens per window."""
    learning_rate: float = 1e-3
    """Peak AdamW learning rate (warmup then cosine decay)."""
    draft_vocab_size: int | None = 8192
    """Draft lm_head rows: the most frequent corpus tokens, stop tokens included (None, or at
    least the target's vocabulary size: the whole vocabulary)."""
    ttt_steps: int = 5
    """Training-time-test unroll length."""
    checkpoint_every: int = 200
    """Steps between orbax checkpoints."""
    seed: int = 0
    """Draft initialisation and data order."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "ttt_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ConfigError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")


def read_corpus(path: str | Path) -> list[str]:
    """Texts from a file or a directory tree (.py/.txt/.md/.rst files), or a JSONL file whose
    lines carry a "text" (or "prompt") field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        texts = [p.read_text(errors="replace") for p in files]
    elif path.suffix == ".jsonl" and path.is_file():
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                texts.append(obj.get("text", obj.get("prompt")))
            except (json.JSONDecodeError, AttributeError) as e:
                raise ConfigError(f'{path}:{n}: expected a JSON object with a "text" '
                                  "field") from e
            if not isinstance(texts[-1], str):
                raise ConfigError(f'{path}:{n}: expected a JSON object with a "text" field')
    elif path.is_file():
        texts = [path.read_text(errors="replace")]
    else:
        raise ConfigError(f"training data {path} does not exist")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ConfigError(f"no text found in {path}")
    return texts


def _features(tgraph, tstate, tokens_BxT):
    """The target's aux and final hidden states at every position of full windows."""
    model = nnx.merge(tgraph, tstate)
    b, t = tokens_BxT.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, aux, _ = model.hidden(tokens_BxT, positions, causal_mask(jnp.full((b,), t), t))
    return jax.lax.stop_gradient(aux), jax.lax.stop_gradient(h)


def _as_batch(tokens_BxT, aux, hidden) -> LearnBatch:
    b, t = tokens_BxT.shape
    h = hidden.shape[-1]
    return LearnBatch(  # no trees offline: one invalid placeholder keeps shapes fixed
        tokens=tokens_BxT, aux=aux, target_hidden=hidden, length=jnp.full((b,), t, jnp.int32),
        tree_tokens=jnp.zeros((b, 1, 2), jnp.int32),
        tree_parent=jnp.broadcast_to(jnp.array([-1, 0], jnp.int32), (b, 1, 2)),
        tree_hidden=jnp.zeros((b, 1, 2, h), hidden.dtype),
        tree_accepted=jnp.zeros((b, 1, 2), bool), tree_root_pos=jnp.ones((b, 1), jnp.int32),
        tree_valid=jnp.zeros((b, 1), bool))


def feature_batch(target: Target, tokens_BxT) -> LearnBatch:
    """A learner batch of full windows with the target's features at every position (what
    the engine records while serving; no trees). Traceable: jit it, or call it in a step."""
    aux, hidden = _features(target.graphdef, target.state, tokens_BxT)
    return _as_batch(tokens_BxT, aux, hidden)


def train_draft(target: Target, tokenizer: Tokenizer, texts: list[str], out: str | Path,
                cfg: OfflineConfig = OfflineConfig(), progress: bool = True,
                time_budget_s: float = float("inf"), draft_dtype: str | None = None) -> Draft:
    """Trains (or resumes training) a draft for `cfg.steps` steps or `time_budget_s`
    seconds, whichever ends first; writes out/checkpoints (orbax) and out/draft (Hugging Face
    EAGLE-3 layout). The draft trains in `draft_dtype` (default: the target's). Returns the
    trained draft."""
    out = Path(out)
    docs = [tokenizer.encode(t) for t in texts]
    eos = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
    stream = pack_documents(docs, eos)
    try:
        wins = windows(stream, cfg.seq_len)
        iterator = iter(training_dataset(np.ascontiguousarray(wins), cfg.batch_size, cfg.seed))
    except ValueError as e:
        raise ConfigError(f"training data too small: {e}") from e
    vocab = target.cfg.vocab_size
    ids = None
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size < vocab:  # else: every token
        ids = build_draft_vocab(stream, vocab, cfg.draft_vocab_size,
                                always=tokenizer.stop_ids(target.cfg.eos_token_ids))
    dcfg = DraftConfig.for_target(target.cfg, draft_vocab_size=None if ids is None else len(ids))
    draft = init_draft(dcfg, seed=cfg.seed, dtype=draft_dtype or target.dtype,
                       draft_to_target=ids, mesh=target.mesh)
    opt = OptimizerSettings(learning_rate=cfg.learning_rate, warmup_steps=min(100, cfg.steps),
                            total_steps=cfg.steps, min_lr_ratio=0.1, weight_decay=0.0,
                            grad_clip=1.0)
    loss = LossConfig(ttt_steps=cfg.ttt_steps, lambda_discard=0.0)
    learner = Learner(draft, target, loss, opt)
    inner = learner_step_fn(learner.graphdef, make_optimizer(opt), loss)
    tgraph = target.graphdef

    def step(state, consts, tokens_BxT):
        tstate, buffers, embed, head = consts
        aux, hidden = _features(tgraph, tstate, tokens_BxT)
        return inner(state, buffers, embed, head, _as_batch(tokens_BxT, aux, hidden))

    consts = (target.state, learner.buffers, learner.embed, learner.head)
    result = fit(learner.state, consts, jax.jit(step, donate_argnums=0), iterator,
                 total_steps=cfg.steps, ckpt_dir=out / "checkpoints",
                 checkpoint_every=cfg.checkpoint_every, time_budget_s=time_budget_s,
                 tokens_per_step=cfg.batch_size * (cfg.seq_len + 1), progress=progress)
    learner.state = result.state
    trained = Draft(dcfg, draft.graphdef, learner.publish())
    with interrupt.deferred(kept=f"kept the trained draft in {out / 'draft'}"):
        save_draft(out / "draft", trained)  # (a Ctrl-C waits until it is whole)
        (out / "draft" / "training.json").write_text(json.dumps({
            "steps": int(result.state.step), "final_loss": result.losses[-1] if result.losses
            else None, **dataclasses.asdict(cfg)}, indent=2))
    return trained


def corpus_of(cfg: OfflineConfig) -> list[str]:
    """The texts `cfg.data` names (`aurora-jax train-draft` reads them before it loads
    anything); ConfigError when there is none."""
    if cfg.data is None:
        raise ConfigError("train-draft needs a corpus: data=PATH (a text file, a directory of "
                          ".py/.txt/.md/.rst files, or a JSONL file with a \"text\" field)")
    return read_corpus(cfg.data)


def train_draft_for(target_dir: str | Path, texts: list[str], out: str | Path,
                    cfg: OfflineConfig) -> Path:
    """`train_draft` for the checkpoint in `target_dir`; returns the draft's directory."""
    from aurora_jax.models.hf_io import load_target

    target = load_target(target_dir, dtype=cfg.dtype)
    train_draft(target, Tokenizer.load(target_dir), texts, out, cfg)
    return Path(out) / "draft"
