"""aurora-jax: speculative-decoding serving whose draft keeps learning from live traffic."""

__version__ = "0.1.0"
