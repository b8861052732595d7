"""Pallas kernels, each beside a pure-jnp reference and reached through one dispatch function.

- tree_attention.py: attention of a tree's nodes against a ragged KV-cache prefix plus the
  tree block under its mask (verification, drafting, decode), flash-decoding style, with
  `tree_attention_reference` beside it.
- dispatch.py: `attention(..., impl)`: the kernel on GPU, the reference on CPU (and on TPU
  until a Mosaic variant exists), or either one forced by the model config's `attention`
  field ("interpret" runs the kernel anywhere, for tests).
"""
