"""The engine's step compiles for an H100 on this CPU host: jax's CUDA plugin compiles for a
GPU it is told about (a target description) instead of one it finds. Skipped, saying why,
where the plugin is not installed (`pip install -e ".[gpu]"`, about 3.5 GB; CI does not).

What this guards (issue 27): jax 0.10 lowers a GPU Pallas kernel to Mosaic GPU unless it is
marked for Triton, and Mosaic GPU cannot lay out the tree kernel's iota, so on a GPU "auto"
would drop the kernel at its self-check and serve through the reference."""

from __future__ import annotations

import pytest

from aurora_jax.accelerators import tpu_compile as tc
from aurora_jax.speculative.config import SpecConfig

pytestmark = pytest.mark.skipif(tc.gpu_compiler_available() is not None,
                                reason=str(tc.gpu_compiler_available()))


@pytest.mark.parametrize("attention", ["pallas", "reference"])
def test_the_tree_step_compiles_for_an_h100_with_the_triton_kernel(attention):
    topo = tc.Topology.parse("h100:1")
    mesh = topo.mesh()
    spec = SpecConfig(mode="tree", depth=2, topk=2, num_draft_tokens=4)
    engine = tc.engine_for(tc.MODELS["tiny"], attention, spec, mesh, batch=2, cache_size=768,
                           dtype="bfloat16")
    programs = {}

    def keep(name, fn, args):
        programs[name] = tc.compile_program(fn, args, mesh)
        return programs[name][0]

    tc.compile_engine_programs(engine, (), keep)
    compiled, report = programs["generate"]
    assert compiled is not None, report.get("error")
    assert report["peak_bytes"] < topo.hbm_bytes
    kernel = "__gpu$xla.gpu.triton" in compiled.as_text()
    assert kernel == (attention == "pallas")
