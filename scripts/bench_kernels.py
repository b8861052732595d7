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
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from aurora_jax.accelerators import kernels
from aurora_jax.accelerators.probe import copy_bandwidth


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
    copy_bw = copy_bandwidth(1 << 28 if not args.small else 1 << 24, repeats)
    print(f"device {jax.devices()[0].device_kind} ({backend}); copy bandwidth "
          f"{copy_bw / 1e9:.0f} GB/s; kernel {'interpret mode' if interpret else 'compiled'}")
    print(kernels.TABLE_HEADER)

    def show(row):
        print(kernels.format_row(row), flush=True)
        for name in ("kernel", "reference", "xla_dpa"):
            if f"{name}_error" in row:
                print(f"  {name}: {row[name + '_error']}")

    rows = kernels.kernel_rows(grid, nq=nq, nk=nk, d=d, dtype=jnp.dtype(args.dtype),
                               repeats=repeats, copy_bw=copy_bw, interpret=interpret,
                               max_cache_bytes=args.max_cache_bytes, deadline=float("inf"),
                               on_row=show)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": jax.devices()[0].device_kind, "backend": backend, "interpret": interpret,
        "dtype": args.dtype, "q_heads": nq, "kv_heads": nk, "head_dim": d,
        "copy_bandwidth_gbps": copy_bw / 1e9, "rows": rows, "platform": platform.platform(),
        "jax": jax.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
