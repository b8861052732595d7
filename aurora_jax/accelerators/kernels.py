"""Tree-verification attention: the Pallas kernel against its jnp reference and XLA's own
attention, at the shapes a served model meets (batch B, tree nodes N, cache length S).

Each implementation is checked against the reference first, then timed (median); the
kernel's achieved bandwidth counts the bytes attention must move at least once: the visible
KV cache (every sequence full, S slots), the queries, the tree's keys and values and the
output. On CPU the kernel runs in Pallas interpret mode, which says it works, not how fast.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.accelerators.probe import timed
from aurora_jax.speculative.tree import ancestor_mask
from pallas_kernels.dispatch import attention
from pallas_kernels.tree_attention import tree_attention_reference


def xla_attention(q, k_new, v_new, mask, k_cache, v_cache, cache_len):
    """jax.nn.dot_product_attention over cache ++ tree (XLA picks its implementation; it
    takes keys as [B, S, K, D], so the [B, K, S, D] cache is transposed first)."""
    s = k_cache.shape[2]
    k = jnp.concatenate([k_cache.transpose(0, 2, 1, 3), k_new], axis=1)
    v = jnp.concatenate([v_cache.transpose(0, 2, 1, 3), v_new], axis=1)
    prefix = jnp.arange(s)[None, None, :] < cache_len[:, None, None]
    full = jnp.concatenate([jnp.broadcast_to(prefix, (q.shape[0], q.shape[1], s)), mask], 2)
    return jax.nn.dot_product_attention(q, k, v, mask=full[:, None])


def inputs(b, n, s, nq, nk, d, dtype, seed=0):
    """Random operands: queries [B,N,Q,D], the tree's keys/values [B,N,K,D], a random tree's
    ancestor mask [B,N,N], a full cache [B,K,S,D] and its lengths [B]."""
    rs = np.random.RandomState(seed)
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    parent = np.array([[-1] + [int(rs.randint(i)) for i in range(1, n)] for _ in range(b)])
    return (jax.random.normal(ks[0], (b, n, nq, d), dtype),
            jax.random.normal(ks[1], (b, n, nk, d), dtype),
            jax.random.normal(ks[2], (b, n, nk, d), dtype),
            ancestor_mask(jnp.asarray(parent)),
            jax.random.normal(ks[3], (b, nk, s, d), dtype),
            jax.random.normal(ks[4], (b, nk, s, d), dtype),
            jnp.full((b,), s, jnp.int32))


def implementations(interpret: bool) -> dict:
    """name -> jitted attention: the backend's kernel through the dispatch function (Triton
    on GPU, Mosaic on TPU; the GPU-style kernel in interpret mode on CPU), the reference, and
    XLA's dot_product_attention."""
    return {
        "kernel": jax.jit(lambda *a: attention(*a, impl="interpret" if interpret
                                               else "pallas")),
        "reference": jax.jit(tree_attention_reference),
        "xla_dpa": jax.jit(xla_attention),
    }


def kernel_rows(grid, *, nq: int, nk: int, d: int, dtype, repeats: int, copy_bw: float,
                interpret: bool, max_cache_bytes: float = 24e9,
                deadline: float = float("inf"), on_row=None) -> list[dict]:
    """One row per (B, N, S) of `grid`: each implementation's median microseconds (None and
    an error text where it failed or disagreed with the reference), the kernel's bandwidth
    and its share of the copy bandwidth. Stops starting shapes after `deadline`
    (time.monotonic())."""
    dtype = jnp.dtype(dtype)
    impls = implementations(interpret)
    rows = []
    for b, n, s in grid:
        cache_bytes = 2 * b * s * nk * d * dtype.itemsize
        if cache_bytes > max_cache_bytes or time.monotonic() > deadline:
            continue
        x = inputs(b, n, s, nq, nk, d, dtype)
        ref = impls["reference"](*x).astype(jnp.float32)
        scale = max(1.0, float(jnp.max(jnp.abs(ref))))
        tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
        row: dict = {"batch": b, "nodes": n, "cache": s}
        for name, fn in impls.items():
            try:
                err = float(jnp.max(jnp.abs(fn(*x).astype(jnp.float32) - ref)))
                if err > tol * scale:
                    raise AssertionError(f"max error {err:.3g} against the reference")
                row[f"{name}_us"] = timed(fn, *x, repeats=repeats) * 1e6
            except Exception as e:  # noqa: BLE001 (report the failure in the table, go on)
                row[f"{name}_us"] = None
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        moved = cache_bytes + (2 * b * n * nq * d + 2 * b * n * nk * d) * dtype.itemsize
        k_us = row.get("kernel_us")
        row["kernel_gbps"] = moved / (k_us * 1e-6) / 1e9 if k_us else None
        row["kernel_pct_of_copy"] = 100 * moved / (k_us * 1e-6) / copy_bw if k_us else None
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def format_row(row: dict) -> str:
    """A markdown table row: B, N, S, kernel/reference/XLA us, kernel GB/s, % of copy,
    reference/kernel time ratio."""
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    k_us, r_us = row.get("kernel_us"), row.get("reference_us")
    ratio = r_us / k_us if k_us and r_us else None
    return (f"| {row['batch']} | {row['nodes']} | {row['cache']} | {f(k_us, '.1f')} | "
            f"{f(r_us, '.1f')} | {f(row.get('xla_dpa_us'), '.1f')} | "
            f"{f(row['kernel_gbps'], '.0f')} | {f(row['kernel_pct_of_copy'], '.0f')} | "
            f"{f(ratio, '.2f')}x |")


TABLE_HEADER = ("| B | N | S | kernel us | reference us | xla_dpa us | kernel GB/s | % of copy | "
                "ref / kernel |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
