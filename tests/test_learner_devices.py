"""The online learner on devices of its own (learn/placement.py): serving on 4 of 8 CPU devices
(tp=4), learning on the other 4 (and then on 1), the learner's state really lives there, every
published draft lands on exactly the serving draft's shardings by device-to-device copies,
serving through the hot swaps stays lossless, and nothing recompiles after warm-up.

jax fixes its device count at import, so the check runs in a child process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (as tests/test_tensor_parallel.py does).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from processes import child_env

from aurora_jax.config_io import load_config
from aurora_jax.errors import ConfigError
from aurora_jax.learn.placement import learner_devices
from aurora_jax.run.config import RunConfig
from aurora_jax.serve.config import ServeConfig, ServeLearner

CHILD = textwrap.dedent("""
    import contextlib
    import jax, numpy as np
    from jax._src.array import ArrayImpl
    assert len(jax.devices()) == 8, jax.devices()
    from aurora_jax.engine.engine import Request
    from aurora_jax.engine.target_only import TargetGenerator
    from aurora_jax.errors import ConfigError
    from aurora_jax.learn.learner import Learner
    from aurora_jax.learn.losses import LossConfig
    from aurora_jax.learn.online import OnlineConfig
    from aurora_jax.stack import online_engine
    from aurora_jax.learn.placement import split_meshes
    from aurora_jax.models.config import TargetConfig
    from aurora_jax.models.eagle3 import DraftConfig, init_draft
    from aurora_jax.models.sharding import shard_state
    from aurora_jax.models.transformer import Target, init_random
    from aurora_jax.speculative.config import SpecConfig

    @contextlib.contextmanager
    def host_reads():
        # Every jax array read into numpy (a host round trip), as (shape, device ids).
        reads, value, array = [], ArrayImpl._value, ArrayImpl.__array__
        def seen(x):
            reads.append((x.shape, {d.id for d in x.sharding.device_set}))
        def read_value(self):
            seen(self)
            return value.fget(self)
        def read_array(self, *a, **k):
            seen(self)
            return array(self, *a, **k)
        ArrayImpl._value, ArrayImpl.__array__ = property(read_value), read_array
        try:
            yield reads
        finally:
            ArrayImpl._value, ArrayImpl.__array__ = value, array

    def devices(tree):
        return set().union(*(x.sharding.device_set for x in jax.tree.leaves(tree)))

    serving, learning = split_meshes([4, 5, 6, 7], tp=4)
    serve_devs, learn_devs = set(serving.devices.flat), set(learning.devices.flat)
    assert {d.id for d in serve_devs} == {0, 1, 2, 3}, serve_devs
    cfg = TargetConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=4, head_dim=16, eos_token_ids=(),
                       max_position_embeddings=256)
    graphdef, state = init_random(cfg, seed=3)
    target = Target(cfg, graphdef, shard_state(state, serving), serving, "float32")
    embed = target.state["embed"][...]
    assert embed.sharding.spec[0] == "tp", embed.sharding  # split over the serving devices
    draft = init_draft(DraftConfig.for_target(cfg), seed=4, mesh=serving)
    serving_shardings = [x.sharding for x in jax.tree.leaves(draft.state)]

    # The learner copies the draft and the target's embedding and head to its devices, device
    # to device: nothing is read into host memory on the way.
    with host_reads() as reads:
        learner = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=3), mesh=learning)
        jax.block_until_ready((learner.state, learner.embed, learner.head))
    assert reads == [], reads
    assert devices(learner.state) == learn_devs and devices(learner.buffers) == learn_devs
    assert devices((learner.embed, learner.head)) == learn_devs
    np.testing.assert_array_equal(np.asarray(learner.embed), np.asarray(embed))

    spec = SpecConfig(mode="chain", depth=3)
    online_cfg = OnlineConfig(batch_size=4, seq_len=32, trees_per_seq=4, min_sequences=2,
                              every_steps=2)
    engine, online = online_engine(target, draft, spec, learner, online_cfg, max_slots=4,
                                   max_len=48)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(2, 64, size=rs.randint(3, 9)).tolist() for _ in range(4)]
    engine.run([Request(p, 16) for p in prompts])  # warm-up; its traces feed the learner
    engine.traces.flush()
    compiled = engine.compilations

    def learn(_result):  # between requests: two steps and a publication
        assert online.train_steps(2) == 2

    with host_reads() as reads:
        run = engine.run([Request(p, 16) for p in prompts], on_result=learn)
    engine.traces.flush()
    # No array of the learner's devices was read to the host but loss figures (scalars).
    assert not [r for r in reads if r[0] and r[1] & {d.id for d in learn_devs}], reads
    ref = TargetGenerator(target, eos_ids=()).generate(prompts, 16)
    assert [r.token_ids for r in run.results] == [c.token_ids for c in ref.completions]
    assert online.published == 4 and engine.draft_version == 4, online.published
    assert engine.compilations == compiled
    assert [x.sharding for x in jax.tree.leaves(engine.draft_state)] == serving_shardings
    def batch():
        return online.buffer.batch(4, 32, 4, spec.nodes + 1,
                                   sharding=learner.batch_sharding(4))

    assert devices(learner.state) == learn_devs and devices(batch()) == learn_devs
    assert learner._step._cache_size() == 1  # the learner's step compiled once as well
    served = engine.draft_state

    # A learner on one device publishes (the day-0 draft) into the same engine, and takes a
    # serving draft back (as at a rollback).
    _, one = split_meshes([-1], tp=4)
    solo = Learner(draft, target, LossConfig(ttt_steps=2, tree_depth=3), mesh=one)
    assert devices(solo.state) == {jax.devices()[7]}
    assert online.publisher.publish(solo.publish()) == 5
    assert [x.sharding for x in jax.tree.leaves(engine.draft_state)] == serving_shardings
    again = engine.run([Request(p, 16) for p in prompts])
    assert [r.token_ids for r in again.results] == [c.token_ids for c in ref.completions]
    assert engine.compilations == compiled
    solo.reset_to(served)
    assert devices(solo.state) == {jax.devices()[7]}
    for a, b in zip(jax.tree.leaves(solo.publish()), jax.tree.leaves(served), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Devices the serving mesh holds cannot learn; a spec that leaves too few cannot serve.
    for bad, why in [(lambda: Learner(draft, target, mesh=split_meshes([0], tp=1)[0]),
                      "overlap the serving devices"),
                     (lambda: split_meshes([3, 4, 5, 6, 7], tp=4), "tp=4 needs 4"),
                     (lambda: split_meshes([8], tp=1), "out of range"),
                     (lambda: split_meshes([7, -1], tp=1), "twice")]:
        try:
            bad()
        except ConfigError as e:
            assert why in str(e), e
        else:
            raise AssertionError(why)
    print("LEARNER-DEVICES-OK")
""")


def test_learner_on_its_own_devices_publishes_losslessly(tmp_path):
    env = child_env(devices=8)
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and "LEARNER-DEVICES-OK" in r.stdout, r.stdout + r.stderr


def test_device_specs_name_the_problem():
    devs = list("abcdefgh")  # any 8 devices
    assert learner_devices([-1], devs) == ["h"]
    assert learner_devices(2, devs) == ["g", "h"]
    for spec, why in [([8], "index 8 is out of range: there are 8 local devices"),
                      ([-9], "out of range"), ([0, -8], "names a device twice"),
                      (list(range(8)), "leaves none to serve"), (8, "leaves none to serve"),
                      (0, "count must be >= 1"), ([], "empty")]:
        with pytest.raises(ConfigError, match=why):
            learner_devices(spec, devs)


def test_configs_take_learner_devices_and_refuse_what_cannot_place():
    cfg = load_config(ServeConfig, None, ["learner.devices=[6, 7]", "learner.schedule=always"])
    assert cfg.learner.devices == (6, 7)
    assert load_config(RunConfig, None, ["learner.devices=[-1]"]).learner.devices == (-1,)
    with pytest.raises(ConfigError, match="mode thread"):
        ServeLearner(mode="workdir", workdir="/tmp/w", devices=(1,))
    with pytest.raises(ConfigError, match="named twice"):
        load_config(ServeConfig, None, ["learner.devices=[1, 1]"])
    with pytest.raises(ConfigError, match="must be a list"):
        load_config(RunConfig, None, ["learner.devices=2"])
    with pytest.raises(ConfigError, match="learner.enabled false"):
        load_config(RunConfig, None, ["learner.devices=[1]", "learner.enabled=false"])
