"""XLA compiler options for the programs that train a model, from the environment.

`AURORA_JAX_TRAIN_XLA_OPTIONS` holds a JSON object of XLA options, named as in XLA_FLAGS
without the dashes (`{"xla_backend_optimization_level": 1}`), as `jax.jit(...,
compiler_options=...)` takes them. They apply to the training steps alone (the online and
offline learners' steps and the built-in recipe's), on top of XLA_FLAGS, which every program
gets. Unset or empty: none. An option XLA does not know fails the first training step's
compile with XLA's own message ("No such compile option").

A serving program and a training step are compiled and run in different proportions: a
server compiles a handful of programs per shape bucket and runs them for as long as it
serves, while a short training run compiles its step once and runs it hundreds of times. The
test suite uses this: it compiles its many small serving programs at LLVM's lowest level (its
XLA_FLAGS) and its training steps at level 2. `tests/test_learner.py`'s learning-from-traces
test, with its training steps at level 0, 1 and 2 (serving programs at 0; 2 CPU cores, one run
each), took 47.4, 34.0 and 36.0 s with an empty cache and 51.3, 26.4 and 19.8 s with a warm one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from aurora_jax.errors import ConfigError

TRAIN_ENV = "AURORA_JAX_TRAIN_XLA_OPTIONS"


def train_options(environ: Mapping[str, str] | None = None) -> dict[str, bool | int | float | str]:
    """The XLA options for training steps that the environment asks for ({} for none)."""
    text = (os.environ if environ is None else environ).get(TRAIN_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{TRAIN_ENV} is not JSON ({e}): {text!r}") from None
    if not isinstance(options, dict) or not all(
            isinstance(v, (bool, int, float, str)) for v in options.values()):
        raise ConfigError(f"{TRAIN_ENV} must be a JSON object of XLA option names and "
                          f"values, like '{{\"xla_backend_optimization_level\": 1}}'; "
                          f"got {text!r}")
    return options
