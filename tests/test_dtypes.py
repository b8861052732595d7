"""Accelerator numerics: the "auto" dtype per backend, and logits accumulated in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aurora_jax.models.config import device_dtype
from aurora_jax.models.layers import Linear, matmul_f32


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators():
    assert device_dtype("auto", backend="cpu") == "float32"
    assert device_dtype("auto", "float32", backend="gpu") == "bfloat16"
    assert device_dtype("auto", "bfloat16", backend="tpu") == "bfloat16"
    assert device_dtype("auto", "float16", backend="gpu") == "float16"
    for name in ("float32", "bfloat16", "float16"):  # explicit names are kept
        assert device_dtype(name, backend="gpu") == device_dtype(name, backend="cpu") == name


def test_bf16_logits_are_the_float32_products_of_bf16_operands():
    head = Linear(64, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 64)).astype(jnp.bfloat16)
    got = head.logits(x)
    assert got.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(head.kernel[...], np.float64)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # A bfloat16 result would have rounded them: most are not bfloat16 numbers.
    rounded = np.asarray(got.astype(jnp.bfloat16).astype(jnp.float32))
    assert (rounded != np.asarray(got)).mean() > 0.5
    np.testing.assert_array_equal(matmul_f32(x, head.kernel[...]), got)
