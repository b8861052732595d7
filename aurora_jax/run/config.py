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
from aurora_jax.learn import placement
from aurora_jax.learn.losses import LossConfig
from aurora_jax.learn.online import OnlineConfig
from aurora_jax.learn.optimizer import OptimizerSettings
from aurora_jax.models.config import DtypeName
from aurora_jax.speculative.config import SpecConfig


@dataclasses.dataclass(frozen=True)
class LearnSettings:
    """The online learner; it trains between serving windows (on a shared CPU a learner
    thread would slow serving by as much as it learns; its time is reported separately).
    Its parts are the learner's own configs, with the run's defaults."""

    enabled: bool = True
    """False: the draft never changes (a static-draft or target-only arm)."""
    steps_per_window: int = 20
    """Learner steps after each window."""
    online: OnlineConfig = OnlineConfig(seq_len=96, every_steps=10, min_sequences=3)
    """Batches and publication (learn/online.py): batch_size, seq_len, trees_per_seq,
    every_steps, policy, holdout, vocab (re-choosing the draft vocabulary)."""
    optimizer: OptimizerSettings = OptimizerSettings(learning_rate=3e-3)
    """AdamW and its schedule (learn/optimizer.py)."""
    loss: LossConfig = LossConfig(ttt_steps=3)
    """The draft objective: the TTT unroll and the rejected-node term (learn/losses.py,
    learn/discard.py); its tree_depth follows spec.depth."""
    devices: tuple[int, ...] | None = None
    """Local devices for the learner alone, by index ([-1]: the last one); the target serves
    on the first `tp` of the others (learn/placement.py). null: the learner shares the serving
    devices."""

    def __post_init__(self):
        if self.steps_per_window < 1:
            raise ConfigError("learner.steps_per_window must be >= 1")
        if self.devices is not None and not self.enabled:
            raise ConfigError("learner.devices places the learner; with learner.enabled false "
                              "there is none (set it to null)")
        placement.check_spec(self.devices, "learner.devices")


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
class RunConfig:
    """A serve-and-learn run."""

    target: str = "builtin"
    """"builtin" (SmolLM2-135M-Instruct, prepared on first use), "builtin-scratch" (a small
    model trained here), a Hugging Face checkpoint directory or a .gguf file."""
    draft: str = "warm"
    """"scratch" (random, day 0), "warm" (day 0, warm-started from the target's head and top
    layer), an EAGLE-3 directory, or "none" (target only)."""
    draft_vocab_size: int | None = 8192
    """A scratch draft's head rows: the most frequent built-in corpus tokens under the target's
    tokenizer, stop tokens included (None: the whole target vocabulary)."""
    dtype: DtypeName = "auto"
    """Parameter dtype; auto: float32 on CPU, bfloat16 on GPU/TPU (models/config.device_dtype)."""
    tp: int = 1
    """Tensor-parallel degree: the target is split over this many local devices."""
    max_slots: int = 1
    """Requests served at once (1: one at a time, the latency-bound load where speculation
    pays on a CPU; at 8 two cores are compute-bound and the target alone is faster)."""
    window: int = 8
    """Requests per metrics window (the unit of the adaptive policy and of learning)."""
    seed: int = 0
    """Seeds the scratch draft and sampling."""
    spec: SpecConfig = SpecConfig(mode="tree", depth=4, topk=4, num_draft_tokens=12)
    """Speculation when speculating (mode chain or tree)."""
    scenario: ScenarioConfig = ScenarioConfig()
    """The traffic."""
    learner: LearnSettings = LearnSettings()
    """Online learning."""
    adaptive: AdaptiveConfig = AdaptiveConfig(alternatives=(
        SpecConfig(mode="ngram", depth=3), SpecConfig(mode="chain", depth=3)))
    """When to speculate, from measured tokens/s."""
    compare: CompareSettings = CompareSettings()
    """Only for --compare."""
    distributed: DistributedConfig = DistributedConfig()
    """Joining a multi-process JAX job (aurora_jax/distributed.py); null fields come from the
    environment, and with nothing set anywhere the process runs alone."""

    def __post_init__(self):
        if self.spec.mode == "off":
            raise ConfigError("spec.mode must be chain or tree (target-only is draft: none)")
        if self.draft == "none" and self.learner.enabled:
            raise ConfigError("draft: none serves target-only; set learner.enabled: false")
        if min(self.max_slots, self.window, self.tp) < 1:
            raise ConfigError("max_slots, window and tp must be >= 1")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise ConfigError(f"draft_vocab_size must be >= 1 or null, got "
                              f"{self.draft_vocab_size}")

    @classmethod
    def load(cls, path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
        return load_config(cls, path, overrides)
