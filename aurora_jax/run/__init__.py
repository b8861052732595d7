"""`aurora-jax run`: the config-driven serve-and-learn job, its metrics and its report."""
