"""The acceptance-collapse guard: a hot-swapped draft that is valid in shape but wrong in
content costs a few windows of speed, never more (correctness it cannot cost: verification
keeps every output the target's).

Such drafts happen. Acceptance fell to 1.0 after a weight sync in RL systems that train
their speculator (miles #1926: 2.71 -> 1.00; the Aurora reference's debugging notes name a
dtype mismatch and a corrupted draft), and a learner can diverge on its own. Shape checks
do not catch any of these; measured acceptance does.

After each hot swap the new version is on probation. The engines count, per draft version,
the rows they verified and the draft tokens accepted (`Batcher.by_version`). Once the new
version has verified `min_rows` rows in a speculation setting where the last trusted version
also did, their acceptance lengths are compared there; the new one has collapsed when it is
lower by at least max(`min_drop`, `drop_share` x (trusted - 1)): a drop by a margin, and
acceptance near 1.0 where the trusted draft was well above it, both count; noise at day-0
acceptance (1.05 against 1.02) does not. A collapsed version is rolled back: the trusted
draft serves again under its own version number, and the caller tells the publisher not to
publish from that state again. A version that passes becomes the trusted one. Where the
trusted version has no measurement to compare with, the new one is trusted once measured.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from aurora_jax.engine.batcher import Batcher, acceptance_length
from aurora_jax.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """When a hot-swapped draft counts as collapsed."""

    enabled: bool = True
    """False: every swap stands, whatever it accepts."""
    min_rows: int = 64
    """Rows (one per request per verification step) a version must have verified in a
    speculation setting before it is judged there, or serves as the baseline there."""
    min_drop: float = 0.25
    """Smallest drop in acceptance length that counts as a collapse."""
    drop_share: float = 0.5
    """A collapse also needs a drop of at least this share of the trusted version's gain over
    1.0 (so 2.7 -> 1.8 is one, 1.3 -> 1.1 is not)."""

    def __post_init__(self):
        if self.min_rows < 1 or self.min_drop <= 0 or not 0 < self.drop_share <= 1:
            raise ConfigError("guard: min_rows must be >= 1, min_drop > 0 and drop_share in "
                              "(0, 1]")


@dataclasses.dataclass
class Rollback:
    """A collapsed version and the trusted draft to serve again."""

    bad_version: int
    version: int
    state: Any
    reason: str


class CollapseGuard:
    """Judges each swapped-in draft version against the last trusted one."""

    def __init__(self, cfg: GuardConfig, initial: tuple[Any, int]):
        self.cfg = cfg
        self.trusted = initial  # (state, version): what a rollback serves again
        self.probation: tuple[Any, int] | None = None  # the version being judged
        self.rolled_back: dict[int, str] = {}  # bad version -> why
        self.judged: dict[int, str] = {}  # version -> "trusted" / reason of its rollback

    def swapped(self, new: tuple[Any, int]) -> None:
        """Steps now propose with `new` = (state, version). A version swapped in while
        another is on probation replaces it there (it is judged against the same trusted
        one); the trusted draft coming back (a rollback taking effect) is not a new version."""
        if not self.cfg.enabled or new[1] == self.trusted[1]:
            return
        self.probation = new

    def check(self, batchers: dict[str, Batcher]) -> Rollback | None:
        """Judges the version on probation by what the draft engines' batchers counted
        (mode name -> batcher); returns the rollback to do, if it collapsed."""
        if self.probation is None:
            return None
        (state, version), trusted = self.probation, self.trusted[1]
        measured = compared = False
        for mode, batcher in batchers.items():
            new, old = batcher.by_version.get(version), batcher.by_version.get(trusted)
            if new is None or new[0] < self.cfg.min_rows:
                continue
            measured = True
            if old is None or old[0] < self.cfg.min_rows:
                continue  # no baseline in this setting: nothing to compare with
            compared = True
            tau_new = acceptance_length(new[1], new[0]) or 1.0
            tau_old = acceptance_length(old[1], old[0]) or 1.0
            drop = tau_old - tau_new
            if drop >= max(self.cfg.min_drop, self.cfg.drop_share * (tau_old - 1.0)):
                reason = (f"acceptance collapsed in {mode}: {tau_new:.2f} over {new[0]} rows "
                          f"against {tau_old:.2f} for version {trusted}")
                self.probation = None
                self.rolled_back[version] = self.judged[version] = reason
                return Rollback(version, trusted, self.trusted[0], reason)
        baseline = any(b.by_version.get(trusted, (0, 0))[0] >= self.cfg.min_rows
                       for b in batchers.values())
        if compared or (measured and not baseline):
            self.trusted, self.probation = (state, version), None
            self.judged[version] = "trusted"
        return None
