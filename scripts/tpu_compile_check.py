"""Compiles the engine's programs for TPU slices on this host, which needs no TPU: the real
XLA:TPU and Mosaic compilers from libtpu, abstract chips from jax's topology descriptions.

    pip install -e ".[tpu]"
    python scripts/tpu_compile_check.py                      # Llama-3.1-8B shapes, 5 slices
    python scripts/tpu_compile_check.py --model qwen3-8b --topology v6e:2x2/tp4 --spec tree
    pip install -e ".[gpu]"                                  # jax's CUDA plugin, ~3.5 GB
    python scripts/tpu_compile_check.py --topology h100:1 h200:1   # no GPU needed either

Writes bench_results/tpu_compile/tpu_compile.{json,md}: per program whether it compiled (the
compiler's error where not), peak memory against the chip's HBM, its HBM traffic counted from
the compiled HLO and XLA's bytes accessed, each over what a step must move, flops and XLA's
estimate. See aurora_jax/accelerators/tpu_compile.py and hbm_traffic.py.
"""

from aurora_jax.accelerators.tpu_compile import main

if __name__ == "__main__":
    main()
