"""Pallas kernels, each beside a pure-jnp reference and reached through one dispatch function.

Empty for now: attention runs through the jnp reference in aurora_jax/models/attention.py,
whose signature (new tokens against a cache prefix plus a masked block) is the contract the
tree-attention kernel will implement.
"""
