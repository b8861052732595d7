"""`aurora-jax generate`: one prompt, or a file of them served with continuous batching while
the draft learns (in this process with `online`, or through a workdir with `workdir`).

`GenerateOptions` holds the command's settings and checks them before anything loads;
`generate(opts)` runs it, printing to stdout (text, or JSON lines with `json`) and a summary
line to stderr. In a multi-process job only process 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from aurora_jax import interrupt
from aurora_jax.builtin import resolve_target
from aurora_jax.data.prompts import read_prompts_file
from aurora_jax.data.tokenizer import Tokenizer
from aurora_jax.distributed import is_primary
from aurora_jax.engine.adaptive import AdaptiveConfig
from aurora_jax.engine.engine import Request, RequestResult
from aurora_jax.errors import ConfigError, PromptError
from aurora_jax.learn.learner import DEFAULT_OPTIMIZER
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig, Policy
from aurora_jax.sampling import SamplingParams
from aurora_jax.speculative.config import Mode, SpecConfig
from aurora_jax.stack import LearnerConfig, Learning, StackConfig, build_stack, load_models
from aurora_jax.store.workdir import workdir_paths


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """The settings of `aurora-jax generate` (the CLI's flags, one to one)."""

    target: str = "builtin"
    dtype: str = "auto"
    cache_dir: str | None = None
    prompt: str | None = None
    chat: bool = False
    echo: bool = False
    prompts: str | None = None
    max_slots: int = 8
    online: bool = False
    workdir: str | None = None
    sync_every: int = OnlineConfig().every_steps
    sync_policy: Policy = OnlineConfig().policy
    learn_per_request: int = 8
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    json: bool = False
    draft: str | None = None
    spec: Mode | None = None
    depth: int = SpecConfig().depth
    topk: int = SpecConfig().topk
    num_draft_tokens: int = SpecConfig().num_draft_tokens
    draft_vocab_size: int = 8192

    @classmethod
    def from_args(cls, args) -> GenerateOptions:
        """From the CLI's parsed arguments (an argparse Namespace)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    @property
    def learns(self) -> str | None:
        """The flag that makes the draft learn, if any."""
        return "--online" if self.online else "--workdir" if self.workdir else None

    def check(self, multiprocess: bool) -> None:
        """Refuses contradictory settings, naming the flags, before anything loads."""
        learns = self.learns
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
        if self.online and self.workdir:
            raise ConfigError("--online learns in this process, --workdir in another: pick one")
        if multiprocess and learns:
            raise ConfigError(f"{learns} swaps drafts at times that differ between processes; "
                              "a multi-process generate serves a fixed draft")
        if learns and self.prompts is None:
            raise ConfigError(f"{learns} learns across requests: use it with --prompts "
                              "FILE.jsonl")
        spec = self.spec_config()
        if spec.needs_draft and self.draft_name() is None:
            raise ConfigError(f"--spec {spec.mode} needs a draft: --draft scratch or --draft "
                              "PATH (--spec ngram needs none)")
        if learns and not spec.needs_draft:
            raise ConfigError(f"{learns} trains the draft from speculation traces; use --spec "
                              "chain or tree")
        if self.learn_per_request < 0:
            raise ConfigError(f"--learn-per-request must be >= 0, got {self.learn_per_request}")

    def draft_name(self) -> str | None:
        """--draft, where learning defaults it to a scratch draft."""
        return self.draft if self.draft is not None or not self.learns else "scratch"

    def spec_config(self) -> SpecConfig:
        mode = self.spec or ("off" if self.draft_name() is None else "tree")
        return SpecConfig(mode=mode, depth=self.depth, topk=self.topk,
                          num_draft_tokens=self.num_draft_tokens)

    def stack_config(self, target: str) -> StackConfig:
        return StackConfig(
            target=target, draft=self.draft_name() or "none",
            draft_vocab_size=self.draft_vocab_size or None, dtype=self.dtype,  # type: ignore[arg-type]
            seed=self.seed, spec=self.spec_config(), adaptive=AdaptiveConfig(enabled=False),
            learner=LearnerConfig(online=OnlineConfig(every_steps=self.sync_every,
                                                      policy=self.sync_policy),
                                  optimizer=DEFAULT_OPTIMIZER, loss=LossConfig()))


def add_arguments(g: argparse.ArgumentParser) -> None:
    """The flags of `aurora-jax generate` (one per GenerateOptions field)."""
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


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="builtin",
                   help="'builtin' (SmolLM2-135M-Instruct, prepared on first use), "
                        "'builtin-tiny' (a small model trained here), a Hugging Face "
                        "checkpoint directory (config.json + *.safetensors + tokenizer) or a "
                        ".gguf file")
    p.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"],
                   help="parameter dtype at load; auto: float32 on CPU, bfloat16 on GPU/TPU")
    p.add_argument("--cache-dir", default=None,
                   help="where the built-in model lives (default $AURORA_JAX_CACHE or "
                        "~/.cache/aurora-jax)")


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


def generate(opts: GenerateOptions, multiprocess: bool = False) -> None:
    """Runs `aurora-jax generate` as `opts` says."""
    opts.check(multiprocess)
    sampling = SamplingParams(opts.temperature, opts.top_p, opts.top_k)
    items = read_prompts_file(opts.prompts) if opts.prompts is not None else None
    path = resolve_target(opts.target, opts.cache_dir, log=lambda m: print(m, file=sys.stderr))
    cfg = opts.stack_config(str(path))
    if items is not None:
        _many(opts, cfg, path, sampling, items)
    else:
        _one(opts, cfg, path, sampling)


def _one(opts: GenerateOptions, cfg: StackConfig, path: Path,
         sampling: SamplingParams) -> None:
    models = load_models(cfg, path)
    tokenizer = models[2]
    assert opts.prompt is not None and tokenizer is not None
    prompt_ids = (tokenizer.encode_chat([{"role": "user", "content": opts.prompt}]) if opts.chat
                  else tokenizer.encode(opts.prompt))
    stack = build_stack(cfg, path, max_slots=1, alternatives=False, models=models,
                        max_len=max(64, len(prompt_ids) + opts.max_new_tokens))
    run = stack.run([Request(prompt_ids, opts.max_new_tokens, sampling)])
    if not is_primary():
        return
    res = run.results[0]
    text = tokenizer.decode(res.token_ids)
    tau = res.acceptance_length
    spec = cfg.spec
    if opts.json:
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
        return
    if opts.echo:  # the prompt as a block of its own, never run into the answer
        print(opts.prompt.rstrip("\n"), end="\n\n")
    print(text)
    spec_note = "" if tau is None or spec.mode == "off" else f", acceptance {tau:.2f}"
    print(f"[{len(res.token_ids)} tokens, {run.tokens_per_s:.1f} tokens/s{spec_note}, "
          f"{res.target_forwards} target forwards, finish={res.finish_reason}, "
          f"compile {run.compile_s:.1f}s]", file=sys.stderr)


def _many(opts: GenerateOptions, cfg: StackConfig, path: Path, sampling: SamplingParams,
          items: list[dict]) -> None:
    models = load_models(cfg, path)
    tokenizer = models[2]
    assert opts.prompts is not None and tokenizer is not None
    requests = [Request(_encode_item(tokenizer, it, opts.prompts), opts.max_new_tokens,
                        sampling, id=it["id"], domain=it["domain"]) for it in items]
    learning: Learning = "thread" if opts.online else "workdir" if opts.workdir else "off"
    stack = build_stack(cfg, path, max_slots=opts.max_slots, alternatives=False,
                        learning=learning, workdir=opts.workdir, models=models,
                        max_len=max(64, max(len(r.prompt) for r in requests)
                                    + opts.max_new_tokens))
    done: list = []
    primary = is_primary()

    def report(res: RequestResult) -> None:
        interrupt.check()  # (a Ctrl-C held for a safe point: between two requests is one)
        done.append(res.id)
        if not primary:
            return
        text = tokenizer.decode(res.token_ids)
        if opts.json:
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
        with stack:  # the trace thread and the store end before the process does
            run = stack.run(requests, on_result=report,
                            learn_per_request=opts.learn_per_request if opts.online else 0)
    except interrupt.Interrupted:
        traces = (f"; traces in {workdir_paths(opts.workdir)[0]}" if opts.workdir else "")
        raise interrupt.Interrupted(f"kept the {len(done)} of {len(requests)} results that "
                                    f"finished (on stdout, as they came){traces}") from None
    if not primary:
        return
    print(f"[{len(requests)} requests, {run.generated_tokens} tokens, "
          f"{run.tokens_per_s:.1f} tokens/s, acceptance {run.acceptance_length or 1.0:.2f}, "
          f"{stack.describe()}]", file=sys.stderr)


def _rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _encode_item(tokenizer: Tokenizer, item: dict, path: str) -> list[int]:
    """A prompts-file line's token ids: plain text, or chat messages under the template."""
    if item["messages"] is None:
        return tokenizer.encode(item["prompt"])
    try:
        return tokenizer.encode_chat(item["messages"])
    except PromptError as e:
        raise PromptError(f"{path}:{item['line']}: {e}") from e
