"""Shared test helpers: a small trained checkpoint the tests make themselves, the prepared
built-in target, and tiny random Hugging Face models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from aurora_jax.compile_cache import directory as compile_cache_directory

# One persistent compilation cache for the whole suite, set in the environment before jax is
# imported, so that every process a test starts (multi-process jobs, learner processes,
# servers, the notebook's kernel) reads and writes it too: an engine built by a second test
# loads the programs the first one compiled. Every program is written, however fast it
# compiled. `AURORA_JAX_COMPILE_CACHE=off` runs the suite without it; a folder there, or in
# JAX_COMPILATION_CACHE_DIR, replaces the default (<cache root>/jax-compile).
_COMPILE_CACHE = compile_cache_directory()
if _COMPILE_CACHE is not None:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_COMPILE_CACHE))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Compile for the suite at LLVM's lowest optimization level, with XLA:CPU's older loop emitters
# (the newer fusion emitters cost more to compile). With an empty cache the suite is bound by
# compilation on 2 cores. These flags cut a tiny engine's tree step from 10.2 s of compiling to
# 3.5 s, and the whole suite on an empty cache from 37:52 to 21:39 (docs/testing.md). The
# programs run slower (SmolLM2's target-only step 61 -> 137 ms); the suite runs little
# compute. The suite passes with and without them: its parity and lossless tests compare
# tokens exactly either way. Every process a test starts inherits them (tests/processes.py
# keeps them where it sets a device count). `AURORA_JAX_TEST_FULL_OPT=1` runs the suite with
# XLA's defaults.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
if os.environ.get("AURORA_JAX_TEST_FULL_OPT", "").lower() not in ("1", "true", "yes"):
    _flags = os.environ.get("XLA_FLAGS", "").split()
    _named = {f.split("=")[0] for f in _flags}  # a flag the caller set wins
    os.environ["XLA_FLAGS"] = " ".join(
        _flags + [f for f in FAST_COMPILE if f.split("=")[0] not in _named])

# libtpu (the `tpu` extra, for the TPU compile tests) makes every jax process try a TPU backend
# first; on a host without one that fails, after printing warnings into the output of every
# subprocess a test reads. Keep such hosts on the CPU unless JAX_PLATFORMS says otherwise.
if ("JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None
        and not any(Path("/dev").glob("accel*")) and not Path("/dev/vfio").exists()):
    os.environ["JAX_PLATFORMS"] = "cpu"

# The builtin-tiny recipe at test size: a Llama-architecture model with a SentencePiece
# tokenizer, trained for a few seconds on the standard library, in Hugging Face layout.
SMALL_RECIPE = dict(
    max_corpus_bytes=300_000, vocab_size=512, tokenizer_sentences=10_000, hidden_size=64,
    intermediate_size=160, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
    max_position_embeddings=512, seq_len=64, batch_size=8, steps=150, learning_rate=1e-2,
    warmup_steps=10, checkpoint_every=1000, eval_windows=4)


# The files that take longest (over a minute each with a warm cache on 2 cores), slowest
# first. pytest-xdist (`-n 2 --dist loadfile`) hands out whole files in collection order once
# its own reordering (most tests first) is off; that reordering left these, with one or two
# long tests each, to the end, where one worker ran them while the other had nothing left.
# Run first, the many short files fill in around them.
SLOWEST_FIRST = ("test_smollm2.py", "test_learner.py", "test_soak.py", "test_serve.py",
                 "test_tpu_compile.py", "test_engine.py", "test_multihost.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    import jax

    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest as found
    on_accel = any(d.platform in ("gpu", "tpu") for d in jax.devices())
    skip = pytest.mark.skip(reason="needs a GPU or TPU")
    for item in items:
        if "gpu" in item.keywords and not on_accel:
            item.add_marker(skip)


def _mapped_regions() -> int | None:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return None


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs(request):
    """Frees what a test module compiled once it ends. Every compiled XLA:CPU program holds
    memory mappings of its own (its JIT-linked code sections), and Linux caps a process at
    vm.max_map_count (65530) of them: a suite that kept every engine's programs alive ended
    with LLVM aborting ("report_fatal_error" from RuntimeDyld's emitSection) when the next
    program could not be mapped. Programs still in use (a session fixture's server) stay."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    log = os.environ.get("AURORA_JAX_TEST_MAPS_LOG")
    if log:  # a debugging aid: mapped regions left after each module
        with open(log, "a") as f:
            f.write(f"{request.module.__name__} {_mapped_regions()}\n")


def _small_ckpt_key() -> str:
    """What the small checkpoint is made from: the recipe, the package's every source file,
    and the versions of the libraries that train it. Any change makes a new one."""
    import hashlib

    import flax
    import jax
    import sentencepiece

    import aurora_jax

    h = hashlib.sha256(repr(sorted(SMALL_RECIPE.items())).encode())
    for v in (jax.__version__, flax.__version__, sentencepiece.__version__, np.__version__):
        h.update(v.encode())
    package = Path(aurora_jax.__file__).parent
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """A small trained checkpoint directory (config.json, model.safetensors, tokenizer.model),
    made by the builtin-tiny recipe (about 25 s on 2 cores). Like the compiled programs it
    is kept in the cache root (<root>/test-checkpoints/<key>) and made once for every worker
    and every later session of the same code: `prepare` locks its folder, so a second worker
    waits for the first and reuses its model. With the compilation cache off, once per worker
    in a temporary folder."""
    from aurora_jax.builtin import default_cache_dir
    from aurora_jax.builtin.tiny import PrepareConfig, prepare

    if _COMPILE_CACHE is None:
        cache = tmp_path_factory.mktemp("small-ckpt")
    else:
        cache = default_cache_dir() / "test-checkpoints" / _small_ckpt_key()
    return prepare(cache, PrepareConfig(**SMALL_RECIPE), progress=False)


@pytest.fixture(scope="session")
def chat_ckpt(small_ckpt, tmp_path_factory) -> Path:
    """The small checkpoint with a chat template (the serving tests' target)."""
    import json
    import shutil

    from serving import CHAT_TEMPLATE

    out = tmp_path_factory.mktemp("chat-ckpt") / "tiny"
    shutil.copytree(small_ckpt, out)
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="session")
def shared_server(chat_ckpt):
    """(server, base url): one server for test_serve.py and test_serve_fuzz.py
    (serving.shared_config), built and warmed once per session. A test that changes its
    runtime state (its queue bound, its draft) puts it back or says what it leaves."""
    from serving import shared_config

    from aurora_jax.serve.server import Server, serving_in_thread

    server = Server(shared_config(chat_ckpt), chat_ckpt)
    with serving_in_thread(server) as url:
        yield server, url


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The built-in target (SmolLM2-135M-Instruct) as `aurora-jax prepare` caches it."""
    from aurora_jax.builtin import is_prepared, pretrained_dir

    if not is_prepared():
        pytest.skip(f"SmolLM2-135M-Instruct is not prepared in {pretrained_dir().parent.parent} "
                    "(run `aurora-jax prepare`; .ci/run does)")
    return pretrained_dir()


def make_hf_model(tmp_path: Path, family: str = "llama", *, num_heads=4, num_kv_heads=2,
                  tie=False, rope_scaling=None, head_dim=16, hidden=64, layers=4, vocab=97,
                  seed=0, max_pos=256):
    """Saves a random tiny LlamaForCausalLM / Qwen3ForCausalLM; returns (dir, torch model).

    Weights are drawn wider than the default init (and norm weights away from 1) so that a
    wrong transpose or a missed norm changes the logits by far more than the tolerance.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_scaling:
        rope = {"rope_theta": 500000.0, **rope_scaling}
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden + 8,
                  num_hidden_layers=layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_pos, tie_word_embeddings=tie,
                  initializer_range=0.08, rms_norm_eps=1e-5, rope_parameters=rope,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3Config(**common, use_sliding_window=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model = model.eval().float()
    out = tmp_path / f"{family}-{num_heads}x{num_kv_heads}-{'tied' if tie else 'untied'}"
    model.save_pretrained(out)
    return out, model


def full_forward_logits(path, ids):
    """Our fp32 logits [B, T, V] for token ids [B, T] from the checkpoint at `path` (a
    directory or a .gguf file), by one causal forward; and the loaded target."""
    import jax
    import jax.numpy as jnp

    from aurora_jax.models.attention import causal_mask
    from aurora_jax.models.hf_io import load_target
    from aurora_jax.models.transformer import forward

    target = load_target(path)
    b, t = ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    logits, *_ = jax.jit(forward)(target.graphdef, target.state, jnp.asarray(ids), pos,
                                  causal_mask(jnp.full((b,), t), t))
    return np.asarray(logits), target


def rng_tokens(shape, vocab, seed=0):
    return np.random.RandomState(seed).randint(3, vocab, size=shape).astype(np.int32)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
