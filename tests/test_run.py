"""`aurora-jax run`: a tiny end-to-end run writes every output with consistent numbers; bad
configs and scenarios fail before anything runs; the adaptive policy follows measured speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from spec_models import copycat_pair, random_pair, tiny_cfg

from aurora_jax.cli import main
from aurora_jax.data.scenarios import ScenarioConfig, build_scenario
from aurora_jax.engine.adaptive import AdaptiveConfig, UtilityMonitor
from aurora_jax.engine.engine import Engine, Request
from aurora_jax.errors import ConfigError
from aurora_jax.run.config import RunConfig
from aurora_jax.speculative.config import SpecConfig

ROOT = Path(__file__).parents[1]


def test_default_yaml_is_the_built_in_default():
    assert RunConfig.load(ROOT / "configs" / "default.yaml") == RunConfig()


def test_learn_and_train_draft_yaml_are_their_defaults():
    from aurora_jax.config_io import load_config
    from aurora_jax.learn.offline import OfflineConfig
    from aurora_jax.learn_job import LearnJobConfig

    assert load_config(LearnJobConfig, ROOT / "configs" / "learn.yaml") == LearnJobConfig()
    assert load_config(OfflineConfig, ROOT / "configs" / "train_draft.yaml") == OfflineConfig()
    got = load_config(LearnJobConfig, None, ["online.every_steps=3", "loss.ttt_steps=2"])
    assert (got.learner.online.every_steps, got.learner.loss.ttt_steps) == (3, 2)


def test_tiny_run_writes_consistent_outputs(small_ckpt, tmp_path, monkeypatch):
    """Every number the run writes is recomputed from what it served: per request (the
    generations file against the engine's own counts), per window (acceptance from the
    window's requests' accepted tokens and steps, tokens/s from its tokens and decode time,
    the adaptive policy's rates and speedup) and in the summary (the final side-by-side)."""
    served_runs = []  # (engine, RunResult) of every Engine.run, in call order
    real_run = Engine.run

    def recording_run(self, *args, **kwargs):
        result = real_run(self, *args, **kwargs)
        served_runs.append((self, result))
        return result

    monkeypatch.setattr(Engine, "run", recording_run)
    out = tmp_path / "run"
    rc = main(["run", "--out", str(out), f"target={small_ckpt}", "scenario.requests=6",
               "scenario.prompt_tokens=16", "scenario.max_new_tokens=8", "window=2",
               "max_slots=2", "learner.steps_per_window=2", "learner.online.every_steps=2",
               "learner.online.batch_size=2", "learner.online.seq_len=16",
               "learner.online.trees_per_seq=2",
               "spec.depth=2", "spec.topk=2", "spec.num_draft_tokens=4",
               "adaptive.probe_every=2", "adaptive.alternatives=[{mode: ngram, depth: 2}]"])
    assert rc == 0
    for name in ("generations.jsonl", "metrics.jsonl", "summary.json", "config.json",
                 "acceptance.png", "throughput.png", "acceptance_by_domain.png"):
        assert (out / name).stat().st_size > 0, name
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(g["id"] for g in gens) == list(range(6))
    assert {g["domain"] for g in gens} == {"code", "prose"}
    assert [g["domain"] for g in sorted(gens, key=lambda g: g["id"])] == ["code"] * 3 + \
        ["prose"] * 3  # the shift order
    assert summary["requests"] == 6 and len(metrics) == summary["windows"] == 3
    tokens = sum(len(g["token_ids"]) for g in gens)
    assert summary["generated_tokens"] == tokens == sum(m["tokens"] for m in metrics)
    assert all(1 <= len(g["token_ids"]) <= 8 for g in gens)
    assert [m["mode"] for m in metrics] == ["spec", "alt1", "off"]  # each measured first
    # Per request: the generations file holds what the engine served, and its acceptance
    # length is the request's (accepted + steps) / steps.
    windows, final_runs = served_runs[:3], served_runs[3:]
    assert [e.spec.mode for e, _ in windows] == ["tree", "ngram", "off"]
    counts = {r.id: r for _, run in windows for r in run.results}
    assert sorted(counts) == list(range(6))
    for g in gens:
        r = counts[g["id"]]
        assert g["token_ids"] == r.token_ids and r.steps >= 1
        assert (g["steps"], g["accepted"]) == (r.steps, r.accepted)
        assert g["acceptance_length"] == round((r.accepted + r.steps) / r.steps, 4)
        assert g["draft_version"] == max(r.draft_versions)
    # Per window: acceptance recomputed from its requests' counts, tokens/s from its tokens
    # and decode time; the adaptive monitor's rate for the window's mode is that rate (one
    # window per mode: nothing to smooth yet), and its speedup is the best speculative rate
    # over target-only's.
    for w, m in enumerate(metrics):
        mine = [counts[g["id"]] for g in gens if g["window"] == w]
        assert {g["mode"] for g in gens if g["window"] == w} == {m["mode"]} and len(mine) == 2
        steps = sum(g["steps"] for g in gens if g["window"] == w)  # from the file alone
        accepted = sum(g["accepted"] for g in gens if g["window"] == w)
        np.testing.assert_allclose(m["acceptance_length"], (accepted + steps) / steps,
                                   rtol=1e-5)
        assert m["tokens"] == sum(len(r.token_ids) for r in mine)
        np.testing.assert_allclose(m["tokens_per_s"], m["tokens"] / m["decode_s"], rtol=1e-5)
        np.testing.assert_allclose(m["mode_tokens_per_s"][m["mode"]], m["tokens_per_s"],
                                   rtol=1e-5)
    assert metrics[2]["acceptance_length"] == 1.0  # target-only accepts no draft token
    last = metrics[-1]
    rates = last["mode_tokens_per_s"]
    best = max(("spec", "alt1"), key=lambda k: rates[k])
    assert last["best_spec"] == best
    np.testing.assert_allclose(last["measured_speedup"], rates[best] / rates["off"], rtol=1e-5)
    assert summary["measured_tokens_per_s"] == rates
    assert summary["speculative_windows"] == 2
    assert set(summary["measured_tokens_per_s"]) == {"spec", "alt1", "off"}
    assert summary["final_window"]["spec_setting"] in ("spec", "alt1")
    assert summary["final_window"]["greedy_outputs_equal"] is True
    # Training starts once 3 sequences are in (after window 1): 2 windows x 2 steps.
    assert summary["learner_steps"] == metrics[-1]["learner_steps"] == 4
    # Each learning window first scores the draft on that window's new sequences (TTT 3).
    fresh = [m.get("learner_fresh_sim_acceptance") for m in metrics]
    assert fresh[0] is None and all(1.0 <= f <= 4.0 for f in fresh[1:])
    assert set(summary["draft_vocab"]) >= {"outside_share_start", "outside_share_end",
                                           "changes"}
    from aurora_jax.models.eagle3_io import load_draft
    from aurora_jax.models.hf_io import load_target

    served = load_draft(out / "draft", target=load_target(small_ckpt).cfg)  # the final draft
    assert summary["draft_dir"] == str(out / "draft") and served.cfg.vocab_size == 512
    assert summary["drafts_published"] == 2
    # The summary's speedup and acceptance: the final window served again twice each way,
    # target-only and with the best measured setting, alternately.
    final = summary["final_window"]
    modes = [e.spec.mode for e, _ in final_runs]
    spec_mode = {"spec": "tree", "alt1": "ngram"}[final["spec_setting"]]
    assert final["spec_setting"] == best and modes == ["off", spec_mode] * 2

    def rate(mode):
        runs = [r for e, r in final_runs if e.spec.mode == mode]
        return sum(r.generated_tokens for r in runs) / sum(r.decode_s for r in runs)

    np.testing.assert_allclose(final["target_only_tokens_per_s"], rate("off"), rtol=1e-5)
    np.testing.assert_allclose(final["spec_tokens_per_s"], rate(spec_mode), rtol=1e-5)
    np.testing.assert_allclose(summary["speedup_vs_target_only"],
                               rate(spec_mode) / rate("off"), rtol=1e-5)
    last_spec = final_runs[-1][1].results
    steps = sum(r.steps for r in last_spec)
    np.testing.assert_allclose(summary["acceptance_length"],
                               (sum(r.accepted for r in last_spec) + steps) / steps, rtol=1e-5)
    assert summary["acceptance_length"] == final["acceptance_length"]
    assert [r.token_ids for r in final_runs[-1][1].results] == \
        [r.token_ids for r in final_runs[-2][1].results]  # greedy_outputs_equal, recomputed


def test_bad_config_or_scenario_fails_before_anything_runs(small_ckpt, tmp_path, capsys):
    out = tmp_path / "never"
    bad = tmp_path / "s.jsonl"
    bad.write_text('{"prompt": "x = 1", "domain": "code"}\n{"prompt": "no domain"}\n')
    typo = tmp_path / "c.yaml"
    typo.write_text("scenario:\n  requets: 4\n")
    cases = [
        ([f"target={small_ckpt}", f"scenario.file={bad}", "scenario.domains=[code]"],
         "s.jsonl:2"),
        (["scenario.order=sideways"], "scenario.order must be one of ['mixed', 'shift']"),
        (["spec.mode=tre"], "spec.mode must be one of ['off', 'chain', 'tree', 'ngram'], got "
                            "'tre' (did you mean 'tree'?)"),
        (["learner.loss.discard=kll"], "learner.loss.discard must be one of"),
        (["dtype=fp16"], "dtype must be one of ['float32', 'bfloat16', 'float16', 'auto']"),
        (["--config", str(typo)], "unknown key 'requets' (did you mean 'requests'?)"),
        (["scenario.domains=[code, poetry]"], "unknown domain(s) ['poetry']"),
        (["learner.lr=0.1"], "unknown key 'lr'"),
        (["learner.optimizer.learning_rate=fast"], "learning_rate must be float, got 'fast'"),
        (["learner.optimizer.learning_rate=-1e-3"], "learning_rate must be > 0"),
        (["window"], "expected key=value"),
    ]
    for args, message in cases:
        assert main(["run", "--out", str(out), *args]) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()


def test_scenario_orders_and_files(tmp_path):
    enc = lambda text: list(range(1, 1 + min(len(text), 50)))  # noqa: E731
    shift = build_scenario(ScenarioConfig(requests=10, prompt_tokens=20), enc)
    assert [r.domain for r in shift] == ["code"] * 5 + ["prose"] * 5
    assert all(1 <= len(r.prompt) <= 20 for r in shift)
    mixed = build_scenario(ScenarioConfig(requests=10, order="mixed", seed=3), enc)
    assert sorted(r.domain for r in mixed) == sorted(r.domain for r in shift)
    assert [r.domain for r in mixed] != [r.domain for r in shift]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "domain": d}) + "\n"
                         for i, d in enumerate(["sql", "sql", "chat"])))
    own = build_scenario(ScenarioConfig(domains=("chat", "sql"), requests=4, file=str(f)), enc)
    assert [r.domain for r in own] == ["chat", "chat", "sql", "sql"]
    with pytest.raises(ConfigError, match="no prompts of domain"):
        build_scenario(ScenarioConfig(domains=("math",), requests=2, file=str(f)), enc)


def test_chat_domains_become_chat_turns_and_the_rest_stays_raw():
    enc = lambda text: list(range(1, 1 + min(len(text), 50)))  # noqa: E731
    turns = []

    def chat_turn(text, max_tokens):
        turns.append((text, max_tokens))
        return [900, 901]

    cfg = ScenarioConfig(requests=6, prompt_tokens=20)
    stream = build_scenario(cfg, enc, chat_turn)
    assert [r.prompt for r in stream if r.domain == "prose"] == [[900, 901]] * 3
    assert all(len(r.prompt) == 20 and r.prompt[0] == 1 for r in stream if r.domain == "code")
    assert len(turns) == 3 and all(t.startswith("Explain this passage") and n == 20
                                   for t, n in turns)
    # No chat template (chat_turn None): every prompt raw, as before.
    assert [r.prompt for r in build_scenario(cfg, enc)] == [enc("x" * 20)] * 6


def test_utility_monitor_follows_the_measured_rates():
    m = UtilityMonitor(AdaptiveConfig(probe_every=4))
    assert [m.choose(), m.choose()] == ["spec", "off"]
    m.record("spec", 100, 1.0)
    m.record("off", 300, 1.0)
    assert m.speedup() == pytest.approx(1 / 3) and m.choose() == "off"  # window 2
    assert [m.choose(), m.choose()] == ["off", "spec"]  # window 4 is a probe
    for _ in range(3):  # the draft got good
        m.record("spec", 900, 1.0)
    assert m.choose() == "spec"
    assert [m.choose() for _ in range(3)] == ["spec", "spec", "off"]  # window 8 probes
    disabled = UtilityMonitor(AdaptiveConfig(enabled=False))
    assert [disabled.choose() for _ in range(4)][-1] == "spec"


def test_utility_monitor_picks_the_fastest_speculation_setting():
    m = UtilityMonitor(AdaptiveConfig(probe_every=3), modes=("spec", "alt1", "alt2", "off"))
    assert [m.choose() for _ in range(4)] == ["spec", "alt1", "alt2", "off"]
    for mode, rate in (("spec", 200), ("alt1", 500), ("alt2", 300), ("off", 400)):
        m.record(mode, rate, 1.0)
    assert m.best_spec() == "alt1" and m.speedup() == pytest.approx(1.25)
    chosen = [m.choose() for _ in range(4, 13)]  # windows 4..12
    assert chosen[0] == "alt1"
    probes = {chosen[w - 4] for w in (6, 9, 12)}  # every 3rd window probes the others in turn
    assert probes == {"spec", "alt2", "off"}
    with pytest.raises(ConfigError):
        UtilityMonitor(modes=("spec",))
    only = UtilityMonitor(modes=("off",))  # a target-only run (no draft)
    assert {only.choose() for _ in range(9)} == {"off"}


def test_utility_monitor_keeps_each_load_apart():
    """Rates measured at one load decide nothing at another; each load explores on its own.
    Loads are bucketed by powers of two."""
    from aurora_jax.engine.adaptive import load_bucket

    assert [load_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9)] == [1, 1, 2, 4, 4, 8, 8, 16]
    m = UtilityMonitor(AdaptiveConfig(probe_every=4))
    assert [m.choose(1), m.choose(1), m.choose(8)] == ["spec", "off", "spec"]
    m.record("spec", 300, 1.0, load=1)
    m.record("off", 100, 1.0, load=1)
    m.record("spec", 100, 1.0, load=8)
    assert m.choose(8) == "off"  # load 8 still explores: target-only not yet measured there
    m.record("off", 300, 1.0, load=7)  # same bucket as 8
    assert m.preferred(1) == "spec" and m.preferred(8) == "off"
    assert m.speedup(1) == pytest.approx(3) and m.speedup(8) == pytest.approx(1 / 3)
    assert m.rates(2) == {"spec": None, "off": None}


def test_adaptive_policy_chooses_per_load_from_real_measurements():
    """Measured on real engines, into one monitor. Under heavy load (8 requests at once) with
    a random draft (nothing accepted) speculation is slower than the target alone, so the
    monitor prefers target-only at that load; one request at a time with a draft that copies
    the target's choices (tau = depth + 1) it is faster, so it prefers speculation there.
    Neither measurement moves the other load's choice."""
    cfg = tiny_cfg(eos=())
    rs = np.random.RandomState(0)
    monitor = UtilityMonitor()
    for pair, load in (("useless", 8), ("copycat", 1)):
        target, draft = (random_pair(cfg, seed=1) if pair == "useless" else copycat_pair(cfg)[:2])
        reqs = [Request(rs.randint(3, 40, size=6).tolist(), 48) for _ in range(load)]
        kw = dict(max_slots=load, max_len=64, eos_ids=())
        engines = {"spec": Engine(target, draft, SpecConfig(mode="chain", depth=6), **kw),
                   "off": Engine(target, None, SpecConfig(mode="off"), **kw)}
        for e in engines.values():
            e.run(reqs)  # compile
        for _ in range(3):
            for mode, e in engines.items():
                run = e.run(reqs)
                monitor.record(mode, run.generated_tokens, run.decode_s, load)
        tau = engines["spec"].run(reqs).acceptance_length
        print(f"{pair} at load {load}: tau {tau:.2f}, speedup {monitor.speedup(load):.2f}")
        assert (tau < 1.2) if pair == "useless" else (tau > 5)
    assert monitor.preferred(8) == "off" and monitor.preferred(1) == "spec"


def test_compare_arms_differ_only_in_draft_and_learning(tmp_path):
    from aurora_jax.run.compare import ARMS, arm_config, static_draft

    cfg = RunConfig(target="/some/ckpt")
    arms = {a: arm_config(cfg, a, "/drafts/static") for a in ARMS}
    assert {a: (c.draft, c.learner.enabled) for a, c in arms.items()} == {
        "target-only": ("none", False), "static": ("/drafts/static", False),
        "online-scratch": ("scratch", True), "online-static": ("/drafts/static", True)}
    assert {c.scenario for c in arms.values()} == {cfg.scenario}  # the same traffic
    with pytest.raises(ConfigError, match="needs compare.static_draft"):
        static_draft(cfg, tmp_path, tmp_path)


@pytest.mark.parametrize("name", ["fixture", "llama3.1-8b-instruct", "qwen3-8b"])
def test_example_configs_load(name):
    cfg = RunConfig.load(ROOT / "configs" / f"{name}.yaml")
    assert cfg.spec.mode == "tree" and cfg.learner.enabled
