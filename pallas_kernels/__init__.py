"""Pallas kernels, each beside a pure-jnp reference and reached through one dispatch function.

- tree_attention.py: attention of a tree's nodes against a ragged KV-cache prefix plus the
  tree block under its mask (verification, drafting, decode), with `tree_attention_reference`
  beside it. One program per (sequence, kv head) walks that sequence's cache blocks one after
  another with FlashAttention's online softmax; the cache axis is not split across programs
  (no flash-decoding split-K).
- tree_attention_tpu.py: the same contract for TPU (Mosaic): a sequential grid over cache
  blocks with VMEM scratch, blocks past each sequence's length neither copied nor computed.
- _common.py: what both kernels share: `BlockSizes` (validated, frozen), the operand checks
  of every public wrapper, the query-row layout.
- dispatch.py: `attention(..., impl)`: the backend's kernel on GPU and TPU, the reference on
  CPU, or either one forced by the model config's `attention` field ("interpret" runs the
  GPU-style kernel anywhere, for tests).
"""

from pallas_kernels._common import BlockSizes

__all__ = ["BlockSizes"]
