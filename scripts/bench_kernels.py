"""Tree-verification attention: the Pallas kernel against its jnp reference and XLA's own
attention, timed side by side on one device, with achieved memory bandwidth.

For every shape (batch B, tree nodes N, cache length S; head_dim 128, 32 query heads, 8 KV
heads by default) each implementation is compiled, run once, then timed over --repeats runs
(median). Bandwidth counts the bytes attention must move at least once: the visible KV cache
(every sequence full, S slots), queries, the tree's keys/values and the output; it is
compared with the device's own copy bandwidth (a large array copied by XLA), measured in the
same run. Outputs are checked against the reference before timing.

    python scripts/bench_kernels.py                   # accelerator: the realistic grid
    python scripts/bench_kernels.py --small           # CPU: one small shape, interpret mode

On CPU the kernel can only run in Pallas interpret mode, which says it works, not how fast.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.speculative.tree import ancestor_mask
from pallas_kernels.dispatch import attention
from pallas_kernels.tree_attention import tree_attention_reference


def timed(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of an XLA copy (read + write) of an nbytes array."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1)  # a real read and write, not an alias
    return 2 * nbytes / timed(copy, x, repeats=repeats)


def xla_attention(q, k_new, v_new, mask, k_cache, v_cache, cache_len):
    """jax.nn.dot_product_attention over cache ++ tree (XLA picks its implementation)."""
    s = k_cache.shape[1]
    k = jnp.concatenate([k_cache, k_new], axis=1)
    v = jnp.concatenate([v_cache, v_new], axis=1)
    prefix = jnp.arange(s)[None, None, :] < cache_len[:, None, None]
    full = jnp.concatenate([jnp.broadcast_to(prefix, (q.shape[0], q.shape[1], s)), mask], 2)
    return jax.nn.dot_product_attention(q, k, v, mask=full[:, None])


def inputs(b, n, s, nq, nk, d, dtype, seed=0):
    rs = np.random.RandomState(seed)
    key = jax.random.PRNGKey(seed)
    ks = jax.random.split(key, 5)
    parent = np.array([[-1] + [int(rs.randint(i)) for i in range(1, n)] for _ in range(b)])
    return (jax.random.normal(ks[0], (b, n, nq, d), dtype),
            jax.random.normal(ks[1], (b, n, nk, d), dtype),
            jax.random.normal(ks[2], (b, n, nk, d), dtype),
            ancestor_mask(jnp.asarray(parent)),
            jax.random.normal(ks[3], (b, s, nk, d), dtype),
            jax.random.normal(ks[4], (b, s, nk, d), dtype),
            jnp.full((b,), s, jnp.int32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="one small shape (CPU, interpret)")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--nodes", default="8,16,64")
    ap.add_argument("--caches", default="1024,4096,16384,32768")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-cache-bytes", type=float, default=24e9,
                    help="skip shapes whose K+V cache is larger")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="bench_results/kernels.json")
    args = ap.parse_args()

    backend = jax.default_backend()
    interpret = backend == "cpu"
    if args.small:
        grid = [(2, 8, 256)]
        nq, nk, d, repeats = 4, 2, 32, 3
    else:
        grid = list(itertools.product(*(map(int, x.split(",")) for x in
                                         (args.batches, args.nodes, args.caches))))
        nq, nk, d, repeats = args.q_heads, args.kv_heads, args.head_dim, args.repeats
    dtype = jnp.dtype(args.dtype)
    impls = {
        # The backend's kernel (Triton on GPU, Mosaic on TPU) through the dispatch function;
        # the GPU-style kernel in interpret mode on CPU.
        "kernel": jax.jit(lambda *a: attention(*a, impl="interpret" if interpret
                                               else "pallas")),
        "reference": jax.jit(tree_attention_reference),
        "xla_dpa": jax.jit(xla_attention),
    }
    copy_bw = copy_bandwidth(1 << 28 if not args.small else 1 << 24, repeats)
    print(f"device {jax.devices()[0].device_kind} ({backend}); copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s; kernel {'interpret mode' if interpret else 'compiled'}")
    print("| B | N | S | kernel us | reference us | xla_dpa us | kernel GB/s | % of copy | "
          "kernel vs ref |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for b, n, s in grid:
        cache_bytes = 2 * b * s * nk * d * dtype.itemsize
        if cache_bytes > args.max_cache_bytes:
            continue
        x = inputs(b, n, s, nq, nk, d, dtype)
        ref = impls["reference"](*x)
        row = {"batch": b, "nodes": n, "cache": s}
        for name, fn in impls.items():
            try:
                out = fn(*x)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
                tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
                if err > tol * max(1.0, float(jnp.max(jnp.abs(ref.astype(jnp.float32))))):
                    raise AssertionError(f"max error {err:.3g} against the reference")
                row[f"{name}_us"] = timed(fn, *x, repeats=repeats) * 1e6
            except Exception as e:  # noqa: BLE001 (report the failure in the table, go on)
                row[f"{name}_us"] = None
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        moved = cache_bytes + (2 * b * n * nq * d + 2 * b * n * nk * d) * dtype.itemsize
        k_us = row.get("kernel_us")
        row["kernel_gbps"] = moved / (k_us * 1e-6) / 1e9 if k_us else None
        row["kernel_pct_of_copy"] = (100 * row["kernel_gbps"] * 1e9 / copy_bw if k_us
                                     else None)
        rows.append(row)
        f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
        ratio = (row["reference_us"] / k_us) if k_us and row.get("reference_us") else None
        print(f"| {b} | {n} | {s} | {f(k_us, '.1f')} | {f(row.get('reference_us'), '.1f')} | "
              f"{f(row.get('xla_dpa_us'), '.1f')} | {f(row['kernel_gbps'], '.0f')} | "
              f"{f(row['kernel_pct_of_copy'], '.0f')} | {f(ratio, '.2f')}x |", flush=True)
        for name in impls:
            if f"{name}_error" in row:
                print(f"  {name}: {row[name + '_error']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": jax.devices()[0].device_kind, "backend": backend, "interpret": interpret,
        "dtype": args.dtype, "q_heads": nq, "kv_heads": nk, "head_dim": d,
        "copy_bandwidth_gbps": copy_bw / 1e9, "rows": rows, "platform": platform.platform(),
        "jax": jax.__version__}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
