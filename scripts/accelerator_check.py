"""One command that says what aurora-jax does on this GPU or TPU host (about 8 minutes):
the tree-attention kernels, engine parity with the CPU, a Llama-3.1-8B-shaped decode step
against the memory floor, and SmolLM2 with a draft trained on the device.

    python scripts/accelerator_check.py                  # on the accelerator host
    python scripts/accelerator_check.py --small          # the whole path at CPU size (~1 min)

Writes bench_results/accelerator_check/accelerator_check.{json,md}; see
aurora_jax/accelerators/check.py for what each section measures.
"""

from aurora_jax.accelerators.check import main

if __name__ == "__main__":
    main()
