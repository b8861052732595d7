"""Accelerators: measuring the one this process runs on (the accelerator check), and
compiling for ones that are not here (TPU and GPU targets, from any host).

probe.py      the device, its copy bandwidth and matmul rate
kernels.py    the tree-attention kernel against its reference and XLA's attention
decode.py     decode-step time of a model against its memory floor; engine parity vs CPU
speed.py      speculative settings against target-only, side by side on the same prompts
check.py      `scripts/accelerator_check.py`: all of the above, as JSON and a markdown table
pretrained.py the check on a pretrained target (SmolLM2 or a given checkpoint)
tpu_compile.py `scripts/tpu_compile_check.py`: every serving and learner program compiled for
              TPU slices (and H100/H200) with their memory and HBM traffic
hbm_traffic.py what a compiled program moves across HBM, instruction by instruction
"""
