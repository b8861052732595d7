"""XLA options for the training steps from the environment (aurora_jax/xla_options.py): read
as a JSON object, refused with the variable's name when malformed, and given to the training
step's compile (an option XLA does not know fails it with XLA's message)."""

from __future__ import annotations

import jax.numpy as jnp
import optax
import pytest
from spec_models import tiny_cfg

from aurora_jax.errors import ConfigError
from aurora_jax.learn import train_target
from aurora_jax.xla_options import TRAIN_ENV, train_options


def test_the_options_are_a_json_object_or_nothing():
    assert train_options({}) == {}
    assert train_options({TRAIN_ENV: "  "}) == {}
    assert train_options({TRAIN_ENV: '{"xla_backend_optimization_level": 2}'}) == \
        {"xla_backend_optimization_level": 2}
    with pytest.raises(ConfigError, match=f"{TRAIN_ENV} is not JSON"):
        train_options({TRAIN_ENV: "xla_backend_optimization_level=2"})
    for bad in ('[["xla_backend_optimization_level", 2]]', '{"xla_dump_to": ["a"]}'):
        with pytest.raises(ConfigError, match=f"{TRAIN_ENV} must be a JSON object"):
            train_options({TRAIN_ENV: bad})


def test_a_training_step_compiles_with_them(monkeypatch):
    tx = optax.sgd(0.1)
    graphdef, buffers, state = train_target.init_model(tiny_cfg(), 0, tx)
    batch = jnp.ones((2, 9), jnp.int32)
    monkeypatch.setenv(TRAIN_ENV, '{"xla_no_such_option": 1}')
    with pytest.raises(Exception, match="No such compile option: 'xla_no_such_option'"):
        train_target.make_train_step(graphdef, tx)(state, buffers, batch)
    monkeypatch.setenv(TRAIN_ENV, '{"xla_backend_optimization_level": 2}')
    state, metrics = train_target.make_train_step(graphdef, tx)(state, buffers, batch)
    assert int(state.step) == 1 and jnp.isfinite(metrics["loss"])
