"""Measurements of the device this process runs on: what the accelerator check reports.

probe.py      the device, its copy bandwidth and matmul rate
kernels.py    the tree-attention kernel against its reference and XLA's attention
decode.py     decode-step time of a model against its memory floor; engine parity vs CPU
speed.py      speculative settings against target-only, side by side on the same prompts
check.py      `scripts/accelerator_check.py`: all of the above, as JSON and a markdown table
"""
