"""The reference decoder: plain target-only generation, written apart from the engine.

It is the test oracle. It shares the model and the sampling functions with the engine but
none of its prefill, cache-slot, insert or step code, so the engine's greedy output (target
only, speculative, under hot swaps) is checked against it token for token. Serving goes
through the engine (engine/engine.py) even without a draft (`SpecConfig(mode="off")`);
scripts/bench_target.py times this bare loop against transformers.

The whole decode loop is one `lax.while_loop` inside one jitted function, so a batch of
requests costs one host round trip, not one per token.
Shapes are bucketed (prompt length to a power of two, cache to a multiple of 64) so that
similar requests reuse one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.distributed import to_host
from aurora_jax.errors import PromptError
from aurora_jax.models.attention import causal_mask
from aurora_jax.models.kv_cache import KVCache
from aurora_jax.models.sharding import cache_sharding
from aurora_jax.models.transformer import Target
from aurora_jax.sampling import SamplingParams, SamplingRows, sample


@dataclasses.dataclass
class Completion:
    """One finished request."""

    token_ids: list[int]
    """Generated ids, the stop token included when one ended the generation."""
    finish_reason: str
    """"stop" (a stop token) or "length" (max_new_tokens reached)."""


@dataclasses.dataclass
class GenerateResult:
    completions: list[Completion]
    decode_s: float
    """Wall time of prefill plus decoding, compilation excluded."""
    compile_s: float
    """Time spent compiling for this call (0 when the program was cached)."""

    @property
    def generated_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.completions)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.decode_s, 1e-9)


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def _decode(graphdef, state, tokens_BxT, lengths_B, key, sampling: SamplingRows, eos_E,
            *, max_new_tokens: int, cache_len: int, cache_sharding):
    """Prefill then decode; returns generated ids [B, max_new] and counts [B]."""
    model = nnx.merge(graphdef, state)
    b, t = tokens_BxT.shape
    cache = KVCache.zeros(model.cfg, b, cache_len, model.embed[...].dtype)
    cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, _, cache = model.hidden(tokens_BxT, positions, causal_mask(lengths_B, t), cache)
    last_BxH = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first_B = sample(sub, model.logits(last_BxH), sampling)
    out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, eos_E)
    carry = (1, first_B, lengths_B, done_B, jnp.ones((b,), jnp.int32), out_BxN, cache, key)

    def cond(c):
        step, _, _, done, *_ = c
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(c):
        step, last_B, cache_len_B, done_B, count_B, out_BxN, cache, key = c
        mask = jnp.ones((b, 1, 1), bool)
        h, _, cache = model.hidden(last_B[:, None], cache_len_B[:, None], mask, cache,
                                   cache_len_B)
        key, sub = jax.random.split(key)
        nxt_B = sample(sub, model.logits(h[:, 0]), sampling, jnp.full((b,), step, jnp.int32))
        out_BxN = out_BxN.at[:, step].set(jnp.where(done_B, 0, nxt_B))
        count_B = count_B + (~done_B).astype(jnp.int32)
        done_B = done_B | jnp.isin(nxt_B, eos_E)
        return step + 1, nxt_B, cache_len_B + 1, done_B, count_B, out_BxN, cache, key

    _, _, _, _, count_B, out_BxN, _, _ = jax.lax.while_loop(cond, body, carry)
    return out_BxN, count_B


class TargetGenerator:
    """Batched target-only generation over a loaded Target; caches compiled programs."""

    def __init__(self, target: Target, eos_ids: tuple[int, ...] | None = None):
        self.target = target
        eos = target.cfg.eos_token_ids if eos_ids is None else eos_ids
        self.eos = np.array(list(eos) or [-1], np.int32)
        self._compiled: dict[tuple, jax.stages.Compiled] = {}

    def check_prompt(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        limit = self.target.cfg.max_position_embeddings
        if not prompt_ids:
            raise PromptError("empty prompt: at least one token is needed")
        if len(prompt_ids) + max_new_tokens > limit:
            raise PromptError(
                f"prompt of {len(prompt_ids)} tokens plus max_new_tokens={max_new_tokens} "
                f"exceeds the model's maximum length of {limit} tokens")

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 seed: int = 0) -> GenerateResult:
        """Generates for a batch of token-id prompts; `sampling` is one setting or one per
        prompt (default greedy)."""
        if max_new_tokens < 1:
            raise PromptError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for p in prompts:
            self.check_prompt(p, max_new_tokens)
        b = len(prompts)
        sampling = SamplingParams() if sampling is None else sampling
        params = sampling if isinstance(sampling, list) else [sampling] * b
        lengths = np.array([len(p) for p in prompts], np.int32)
        t = _bucket(int(lengths.max()))
        s = -(-(t + max_new_tokens) // 64) * 64
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        cfg, mesh = self.target.cfg, self.target.mesh
        sharding = cache_sharding(mesh, KVCache.shape(cfg, b, s))
        args = (self.target.graphdef, self.target.state, jnp.asarray(tokens),
                jnp.asarray(lengths), jax.random.key(seed), SamplingRows.stack(params), self.eos)
        sig = (b, t, s, max_new_tokens)
        compile_s = 0.0
        if sig not in self._compiled:
            t0 = time.perf_counter()
            fn = jax.jit(functools.partial(_decode, max_new_tokens=max_new_tokens, cache_len=s,
                                           cache_sharding=sharding))
            with jax.set_mesh(mesh):  # the kernels shard over it (pallas_kernels/dispatch.py)
                self._compiled[sig] = fn.lower(*args).compile()
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out, counts = self._compiled[sig](*args)
        out, counts = to_host((out, counts))  # (replicated or gathered on every process)
        decode_s = time.perf_counter() - t0
        completions = []
        for i in range(b):
            ids = out[i, : counts[i]].tolist()
            stopped = bool(ids) and ids[-1] in set(self.eos.tolist())
            completions.append(Completion(ids, "stop" if stopped else "length"))
        return GenerateResult(completions, decode_s, compile_s)
