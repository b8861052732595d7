"""The objective-comparison harness (experiments/objectives.py) on a small checkpoint: every
arm trains on the same batches in the same order from the same start draft, and the report
holds what it claims."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from aurora_jax.errors import ConfigError
from aurora_jax.experiments.objectives import (
    Arm,
    ObjectivesConfig,
    Scenario,
    run_objectives,
    same_batches,
)
from aurora_jax.learn.losses import LossConfig

TINY = dict(draft_vocab_size=64, train_requests=3, held_out_requests=2, prompt_tokens=16,
            max_new_tokens=8, served_prompts=1, served_new_tokens=4, steps=4, eval_every=2,
            eval_batches=1, batch_size=2, seq_len=16, trees_per_seq=2, ttt_steps=2,
            shift_steps=2, seeds=(0, 1),
            arms=(Arm("ttt"), Arm("kl", LossConfig(lambda_discard=0.5, discard="kl",
                                                   discard_nodes="all")),
                  Arm("unlikelihood", LossConfig(lambda_discard=0.5, discard="unlikelihood",
                                                 discard_nodes="frontier"))),
            scenarios=(Scenario("code", "code"),
                       Scenario("prose-after-code", "prose", start="code",
                                arms=("ttt", "unlikelihood"))))


@pytest.fixture(scope="module")
def experiment(small_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("objectives")
    cfg = ObjectivesConfig(target=str(small_ckpt), **TINY)
    return out, run_objectives(cfg, small_ckpt, out, say=lambda m: None)


def test_arms_differ_only_in_their_objective(experiment):
    _, results = experiment
    assert results["same_batches"]
    for sc in results["scenarios"].values():
        for seed in (0, 1):
            runs = [r for rs in sc["runs"].values() for r in rs if r["seed"] == seed]
            assert len({tuple(r["fingerprints"]) for r in runs}) == 1
            assert len(runs[0]["fingerprints"]) == TINY["steps"]
            # the same start draft: the same held-out score before any step
            assert len({r["curve"][0]["held_out_sim_acceptance"] for r in runs}) == 1
        # other seeds, other batch orders
        fp = {r["seed"]: tuple(r["fingerprints"]) for r in sc["runs"]["ttt"]}
        assert fp[0] != fp[1]


def test_other_objectives_train_other_drafts(experiment):
    """The arms differ in what they learn, not only in name: on the same batches from the
    same start, each arm's last loss differs from every other arm's, and so does its last
    TTT loss (the term every arm shares, on weights its own objective trained)."""
    _, results = experiment
    for name, sc in results["scenarios"].items():
        for seed in (0, 1):
            last = {arm: next(r for r in runs if r["seed"] == seed)["last_metrics"]
                    for arm, runs in sc["runs"].items()}
            assert len(last) >= 2
            for key in ("loss", "ttt_loss"):
                values = {arm: m[key] for arm, m in last.items()}
                assert len(set(values.values())) == len(values), (name, seed, key, values)


def test_report_files_and_summary(experiment):
    out, results = experiment
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"].keys() == {"code", "prose-after-code"}
    assert set(saved["summary"]["prose-after-code"]["arms"]) == {"ttt", "unlikelihood"}
    for sc in saved["summary"].values():
        for row in sc["arms"].values():
            assert row["seeds"] == 2 and row["step_s"]["mean"] > 0
            assert 1.0 <= row["equal_seconds"]["mean"] <= 1.0 + TINY["ttt_steps"]
            assert row["served"]["mean"] >= 1.0
    assert "| kl |" in (out / "results.md").read_text()
    assert (out / "objectives.png").stat().st_size > 0


def test_same_batches_notices_a_different_order(experiment):
    _, results = experiment
    changed = copy.deepcopy(results)
    runs = changed["scenarios"]["code"]["runs"]["kl"]
    runs[0]["fingerprints"] = runs[0]["fingerprints"][::-1]
    assert not same_batches(changed)


def test_config_errors_name_the_problem():
    with pytest.raises(ConfigError, match="unknown arm"):
        ObjectivesConfig(scenarios=(Scenario("x", "code", arms=("nope",)),))
    with pytest.raises(ConfigError, match="ttt_steps is shared"):
        Arm("bad", LossConfig(ttt_steps=2))
    with pytest.raises(ConfigError, match="not recorded"):
        ObjectivesConfig(scenarios=(Scenario("x", "code", start="legal"),))


def test_the_shipped_config_loads():
    cfg = ObjectivesConfig.load(Path(__file__).parent.parent / "configs" / "exp_objectives.yaml")
    assert cfg.arms[0].name == "ttt" and len(cfg.seeds) >= 3
    assert all(cfg.arm_loss(a).ttt_steps == cfg.ttt_steps for a in cfg.arms)
