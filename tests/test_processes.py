"""A process a test starts keeps the suite's compile flags and gets the host devices it asks
for, whatever device count the parent had."""

from __future__ import annotations

from processes import child_env

from aurora_jax.distributed import child_xla_flags


def test_a_child_keeps_the_parents_flags_and_gets_its_own_device_count(monkeypatch):
    parent = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8 --x=1"
    env = {"XLA_FLAGS": parent}
    assert child_xla_flags(None, env) == "--xla_backend_optimization_level=0 --x=1"
    assert child_xla_flags(4, env) == ("--xla_backend_optimization_level=0 --x=1 "
                                       "--xla_force_host_platform_device_count=4")
    assert child_xla_flags(2, {}) == "--xla_force_host_platform_device_count=2"
    monkeypatch.setenv("XLA_FLAGS", parent)
    child = child_env(devices=2, EXTRA="y")
    assert child["XLA_FLAGS"].split() == ["--xla_backend_optimization_level=0", "--x=1",
                                          "--xla_force_host_platform_device_count=2"]
    assert child["JAX_PLATFORMS"] == "cpu" and child["EXTRA"] == "y"
