"""The run job's config: one YAML file (configs/default.yaml documents every field), with
`key.sub=value` overrides from the command line. Unknown keys, wrong types and invalid values
are refused, naming the key, before anything loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from aurora_jax.config_io import load_config
from aurora_jax.data.scenarios import ScenarioConfig
from aurora_jax.distributed import DistributedConfig
from aurora_jax.engine.adaptive import AdaptiveConfig
from aurora_jax.errors import ConfigError
from aurora_jax.speculative.config import SpecConfig
from aurora_jax.stack import LearnerConfig, StackConfig


@dataclasses.dataclass(frozen=True)
class RunLearner(LearnerConfig):
    """The online learner of a run; it trains between serving windows (on a shared CPU a
    learner thread would slow serving by as much as it learns; its time is reported
    separately). Its other settings are the stack's (LearnerConfig)."""

    enabled: bool = True
    """False: the draft never changes (a static-draft or target-only arm)."""
    steps_per_window: int = 20
    """Learner steps after each window."""

    def __post_init__(self):
        super().__post_init__()
        if self.steps_per_window < 1:
            raise ConfigError("learner.steps_per_window must be >= 1")
        if self.devices is not None and not self.enabled:
            raise ConfigError("learner.devices places the learner; with learner.enabled false "
                              "there is none (set it to null)")


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """`aurora-jax run --compare`: the four arms on the same traffic."""

    static_draft: str | None = None
    """The static (offline-trained) draft; None: train one on the built-in corpus (built-in
    target only)."""
    static_steps: int = 300
    """Offline steps when the static draft is trained here."""
    static_seq_len: int = 128
    """Offline training window."""

    def __post_init__(self):
        if min(self.static_steps, self.static_seq_len) < 1:
            raise ConfigError("compare.static_steps and static_seq_len must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig(StackConfig):
    """A serve-and-learn run. The stack's keys (target, draft, draft_vocab_size, dtype, tp,
    seed, spec, adaptive, learner) are StackConfig's (aurora_jax/stack.py)."""

    adaptive: AdaptiveConfig = AdaptiveConfig(alternatives=(
        SpecConfig(mode="ngram", depth=3), SpecConfig(mode="chain", depth=3)))
    """When to speculate, from measured tokens/s."""
    learner: RunLearner = RunLearner()
    """Online learning."""
    max_slots: int = 1
    """Requests served at once (1: one at a time, the latency-bound load where speculation
    pays on a CPU; at 8 two cores are compute-bound and the target alone is faster)."""
    window: int = 8
    """Requests per metrics window (the unit of the adaptive policy and of learning)."""
    scenario: ScenarioConfig = ScenarioConfig()
    """The traffic."""
    compare: CompareSettings = CompareSettings()
    """Only for --compare."""
    distributed: DistributedConfig = DistributedConfig()
    """Joining a multi-process JAX job (aurora_jax/distributed.py); null fields come from the
    environment, and with nothing set anywhere the process runs alone."""

    def __post_init__(self):
        super().__post_init__()
        if self.spec.mode == "off":
            raise ConfigError("spec.mode must be chain or tree (target-only is draft: none)")
        if self.draft == "none" and self.learner.enabled:
            raise ConfigError("draft: none serves target-only; set learner.enabled: false")
        if min(self.max_slots, self.window) < 1:
            raise ConfigError("max_slots and window must be >= 1")

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
        return load_config(cls, path, overrides)

    def check_multiprocess(self, compare: bool, device_count: int) -> None:
        """A multi-process run must take the same steps in every process: no choice made from
        timings (which differ between processes), the target over every process's
        `device_count` devices, and (for now) no learner."""
        if compare:
            raise ConfigError("--compare runs in one process")
        if self.adaptive.enabled or self.adaptive.alternatives:
            raise ConfigError("a multi-process run must pick its serving mode the same way in "
                              "every process, not from measured speed: set "
                              "adaptive.enabled=false and adaptive.alternatives=[]")
        if self.learner.enabled:
            raise ConfigError("the online learner runs in one process for now (its scoring "
                              "step closes over target params that span other processes' "
                              "devices): set learner.enabled=false for a multi-process run")
        if self.tp != device_count:
            raise ConfigError(f"a multi-process run splits the target over all {device_count} "
                              f"devices of its processes: set tp={device_count}")
