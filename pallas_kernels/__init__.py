"""Pallas kernels, each beside a pure-jnp reference and reached through one dispatch function.

- tree_attention.py: attention of a tree's nodes against a ragged KV-cache prefix plus the
  tree block under its mask (verification, drafting, decode), flash-decoding style, with
  `tree_attention_reference` beside it.
- tree_attention_tpu.py: the same contract for TPU (Mosaic): a sequential grid over cache
  blocks with VMEM scratch, blocks past each sequence's length neither copied nor computed.
- dispatch.py: `attention(..., impl)`: the backend's kernel on GPU and TPU, the reference on
  CPU, or either one forced by the model config's `attention` field ("interpret" runs the
  GPU-style kernel anywhere, for tests).
"""
