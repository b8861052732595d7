"""The `aurora-jax` command.

    aurora-jax prepare   [--cache-dir DIR] [--config YAML] [--force]
    aurora-jax generate  --target (builtin|PATH) --prompt TEXT [--max-new-tokens N]
                         [--temperature T --top-p P --top-k K --seed S] [--json]

Errors caused by input (a bad path, a malformed checkpoint, an over-long prompt, a config
typo) are printed as one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from aurora_jax.errors import AuroraError


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="builtin",
                   help="'builtin' (the embedded default, prepared on first use) or a Hugging "
                        "Face checkpoint directory (config.json + *.safetensors + tokenizer)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="parameter dtype at load; 'auto' uses the checkpoint's")
    p.add_argument("--cache-dir", default=None,
                   help="where the built-in model lives (default $AURORA_JAX_CACHE or "
                        "~/.cache/aurora-jax)")


def _target_dir(args) -> Path:
    if args.target == "builtin":
        from aurora_jax.builtin import ensure_builtin

        return ensure_builtin(args.cache_dir, log=lambda m: print(m, file=sys.stderr))
    return Path(args.target)


def cmd_prepare(args) -> int:
    from aurora_jax.builtin import PrepareConfig, prepare

    config = PrepareConfig.from_yaml(args.config) if args.config else PrepareConfig()
    out = prepare(args.cache_dir, config=config, force=args.force)
    print(f"built-in target ready in {out}")
    return 0


def cmd_generate(args) -> int:
    from aurora_jax.data.tokenizer import Tokenizer
    from aurora_jax.engine.target_only import TargetGenerator
    from aurora_jax.models.hf_io import load_target
    from aurora_jax.spec.sampling import SamplingParams

    sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
    path = _target_dir(args)
    target = load_target(path, dtype=args.dtype)
    tokenizer = Tokenizer.load(path)
    eos = tuple(dict.fromkeys(target.cfg.eos_token_ids + tokenizer.eos_ids))
    generator = TargetGenerator(target, eos_ids=eos)
    prompt_ids = tokenizer.encode(args.prompt)
    result = generator.generate([prompt_ids], args.max_new_tokens, sampling, seed=args.seed)
    c = result.completions[0]
    text = tokenizer.decode(c.token_ids)
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": c.token_ids,
            "prompt_tokens": len(prompt_ids),
            "generated_tokens": len(c.token_ids),
            "finish_reason": c.finish_reason,
            "tokens_per_s": round(result.tokens_per_s, 2),
            "decode_s": round(result.decode_s, 4),
            "compile_s": round(result.compile_s, 3),
        }))
    else:
        print(args.prompt + text)
        print(f"[{len(c.token_ids)} tokens, {result.tokens_per_s:.1f} tokens/s, "
              f"finish={c.finish_reason}, compile {result.compile_s:.1f}s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aurora-jax", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="train and cache the embedded default target model")
    p.add_argument("--cache-dir", default=None,
                   help="cache root (default $AURORA_JAX_CACHE or ~/.cache/aurora-jax)")
    p.add_argument("--config", default=None, help="YAML recipe (default: configs/prepare.yaml "
                                                  "values, built in)")
    p.add_argument("--force", action="store_true", help="retrain even if a model is cached")
    p.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="generate text from a prompt with the target model")
    _add_target_args(g)
    g.add_argument("--prompt", required=True, help="prompt text")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 keeps all tokens")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="aurora-jax: %(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuroraError as e:
        print(f"aurora-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
