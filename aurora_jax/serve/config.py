"""`aurora-jax serve`'s config: one YAML file (configs/serve.yaml documents every field) with
`key.sub=value` overrides, checked before anything loads."""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Literal

from aurora_jax.distributed import DistributedConfig
from aurora_jax.engine.guard import GuardConfig
from aurora_jax.errors import ConfigError
from aurora_jax.stack import LearnerConfig, StackConfig
from aurora_jax.store import kvstore

Learning = Literal["off", "thread", "workdir"]
Schedule = Literal["idle", "always"]
API_KEY_ENV = "AURORA_JAX_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeLearner(LearnerConfig):
    """How the draft keeps learning while the server serves (the learner's settings apply to
    mode thread)."""

    mode: Learning = "thread"
    """off: the draft never changes; thread: an online learner in this process over the
    engines' traces; workdir: traces go to `workdir` for an `aurora-jax learn --workdir`
    process, whose drafts the server swaps in."""
    workdir: str | None = None
    """mode workdir: the store shared with the learner process: a local directory or a
    kvstore URL (file://, gs://, s3://), so the learner may run on another host with no
    shared filesystem (store/kvstore.py)."""
    schedule: Schedule = "idle"
    """mode thread: "idle" steps the learner on the serving thread while no request is in
    flight (a request that arrives waits for at most one learner step); "always" runs it on
    its own thread beside serving (right where the learner has cores or devices of its own:
    on a shared CPU it slows every decoding step by about as much as it learns)."""

    def __post_init__(self):
        super().__post_init__()
        if self.mode == "workdir" and not self.workdir:
            raise ConfigError("learner.mode workdir needs learner.workdir")
        if self.devices is not None and self.mode != "thread":
            raise ConfigError(f"learner.devices places the learner of mode thread; mode "
                              f"{self.mode} has none in this process (set it to null)")
        if self.workdir:
            try:
                store = kvstore.spec(self.workdir)  # a typo'd URL fails here, not at serving
            except ConfigError as e:
                raise ConfigError(f"learner.workdir: {e}") from e
            if store["driver"] == "memory":
                raise ConfigError(f"learner.workdir: {self.workdir!r} lives in this process "
                                  "only, where no `aurora-jax learn` process can reach it; "
                                  "give a path or a file://, gs:// or s3:// URL")


@dataclasses.dataclass(frozen=True)
class ServeConfig(StackConfig):
    """An OpenAI-compatible server whose draft learns from the traffic it serves. The stack's
    keys (target, draft, draft_vocab_size, dtype, tp, seed, spec, adaptive, learner) are
    StackConfig's (aurora_jax/stack.py)."""

    RENAMED: ClassVar[dict[str, str]] = {"learning": "learner"}
    """Keys of older configs, read with a deprecation warning."""

    learner: ServeLearner = ServeLearner()
    """Online learning while serving."""
    window_steps: int | None = 32
    """Engine steps per adaptive window (null: no adaptive policy; every request is served
    with `spec` and nothing else is compiled)."""
    guard: GuardConfig = GuardConfig()
    """When a hot-swapped draft counts as collapsed and is rolled back (engine/guard.py)."""
    max_slots: int = 4
    """Requests decoded at once (continuous batching), over all engines together."""
    max_len: int = 1024
    """Longest prompt plus completion, in tokens; longer requests are a 400."""
    max_queue: int = 64
    """Requests waiting for a slot; one more is answered 429 at once."""
    default_max_tokens: int = 128
    """max_tokens when a request gives none."""
    warmup_prompt_tokens: int | None = None
    """Before /health says ok, every engine compiles (or loads from the compilation cache)
    each program prompts of up to this many tokens use: one prefill per prompt-length and
    group-size bucket. null: up to max_len, so no request waits for a compile; 0: only the
    decode steps and one short prompt's (other prompt shapes compile on first use)."""
    host: str = "127.0.0.1"
    """Interface to listen on; only this one."""
    port: int = 8000
    """TCP port (0: any free port, printed at start)."""
    model_name: str | None = None
    """The model id clients send and /v1/models lists (default: the target's folder name)."""
    api_key: str | None = None
    """When set (or $AURORA_JAX_API_KEY), every endpoint but /health needs
    `Authorization: Bearer <key>`."""
    max_body_bytes: int = 1 << 20
    """Request bodies above this are a 413."""
    distributed: DistributedConfig = DistributedConfig()
    """Joining a multi-process JAX job (aurora_jax/distributed.py); null fields come from the
    environment, and with nothing set anywhere the process runs alone."""

    def __post_init__(self):
        super().__post_init__()
        if min(self.max_slots, self.max_len, self.max_queue, self.default_max_tokens,
               self.max_body_bytes) < 1:
            raise ConfigError("max_slots, max_len, max_queue, default_max_tokens and "
                              "max_body_bytes must be >= 1")
        if self.warmup_prompt_tokens is not None and self.warmup_prompt_tokens < 0:
            raise ConfigError("warmup_prompt_tokens must be >= 0 or null, got "
                              f"{self.warmup_prompt_tokens}")
        if self.window_steps is not None and self.window_steps < 1:
            raise ConfigError(f"window_steps must be >= 1 or null, got {self.window_steps}")
        if self.draft == "none" and any(a.needs_draft for a in self.adaptive.alternatives):
            raise ConfigError("draft none cannot speculate with a draft; adaptive.alternatives "
                              "may only hold ngram settings")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.draft == "none" and self.spec.needs_draft:
            raise ConfigError(f"draft none cannot speculate in mode {self.spec.mode}; set "
                              "spec.mode: off or ngram")
        if self.draft == "none" and self.learner.mode != "off":
            raise ConfigError("draft none has nothing to learn; set learner.mode: off")
        if self.learner.mode != "off" and not self.spec.needs_draft:
            raise ConfigError("learning trains the draft from its speculation traces; use "
                              "spec.mode chain or tree, or learner.mode: off")

    def check_multiprocess(self, device_count: int) -> None:
        """A server across processes takes the same steps in every process: one engine chosen
        up front (no windows timed on each process's clock), drafts swapped in only by the
        serving loop (from a learner process's workdir: serve/lockstep.py), the target over
        every process's `device_count` devices."""
        if self.window_steps is not None:
            raise ConfigError("a server across processes serves one setting, chosen up front, "
                              "not by measured speed (each process has its own clock): set "
                              "window_steps=null")
        if self.learner.mode == "thread":
            raise ConfigError("a server across processes learns through a learner process, not "
                              "a thread (its swaps would land at different steps in each "
                              "process): set learner.mode=workdir with an `aurora-jax learn` "
                              "process, or learner.mode=off")
        if self.tp not in (1, device_count):
            raise ConfigError(f"a server across processes splits the target over all "
                              f"{device_count} devices of its processes: set "
                              f"tp={device_count} (or 1)")

    @property
    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None
