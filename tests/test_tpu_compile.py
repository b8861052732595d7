"""The engine's programs compile for TPU slices on this CPU host (libtpu's XLA:TPU and Mosaic
compilers, abstract chips): with the Pallas kernel on one chip and on 4-chip meshes split by
heads (tp) and by batch (dp), and with the jnp reference. Skipped, saying why, where libtpu is
not installed (`pip install -e ".[tpu]"`).

What this guards (issue 27): dispatch chose the kernel by the default backend, so a program
compiled for a TPU from a CPU host got the GPU-style kernel, and the TPU kernel on a mesh of
more than one chip failed with "Mosaic kernels cannot be automatically partitioned"."""

from __future__ import annotations

import pytest

from aurora_jax.hardware import tpu_compile as tc

pytestmark = pytest.mark.skipif(tc.tpu_compiler_available() is not None,
                                reason=str(tc.tpu_compiler_available()))

MESHES = ["v5e:1x1", "v6e:2x2/tp4", "v5e:2x2/dp2xtp2"]


@pytest.fixture(scope="module")
def meshes():
    return {name: (tc.Topology.parse(name), tc.Topology.parse(name).mesh()) for name in MESHES}


def _generate(meshes, name: str, attention: str, mode: str = "tree"):
    topo, mesh = meshes[name]
    engine = tc.engine_for(tc.MODELS["tiny"], attention, mode, mesh, batch=2, cache_size=256,
                        dtype="bfloat16")
    programs = {}  # name -> (compiled program or None, report)

    def keep(name, fn, args):
        programs[name] = tc.compile_program(fn, args, mesh)
        return programs[name][0]

    tc.compile_engine_programs(engine, (), keep)
    return programs["generate"]


@pytest.mark.parametrize("name", MESHES)
def test_the_tpu_kernel_compiles_on_one_chip_and_on_split_meshes(meshes, name):
    """The tree step with attention="pallas" compiles and calls the Mosaic kernel (a
    tpu_custom_call in the compiled program), on one chip and under shard_map on 4 chips."""
    compiled, report = _generate(meshes, name, "pallas")
    assert compiled is not None, report.get("error")
    assert "tpu_custom_call" in compiled.as_text()
    assert report["peak_bytes"] < 16 << 30  # v5e's HBM, the smallest of the three


@pytest.mark.parametrize("name", MESHES)
def test_the_reference_compiles_everywhere_without_the_kernel(meshes, name):
    compiled, report = _generate(meshes, name, "reference", mode="chain")
    assert compiled is not None, report.get("error")
    assert "tpu_custom_call" not in compiled.as_text()


def test_the_check_reports_every_program_of_a_setting(meshes):
    """Prefill and insert at a prompt length, and the step, each with its memory and cost;
    the step's bytes over what it must move is a ratio above 1 (it reads at least that)."""
    topo, mesh = meshes["v6e:2x2/tp4"]
    rows = tc.check_engine("tiny", topo, mesh, "pallas", "off", 2, 256, (32,))
    assert [r["program"] for r in rows] == ["prefill b2 t32", "insert b2 t32", "generate"]
    assert all(r["compiled"] and r["peak_bytes"] > 0 and r["fits"] for r in rows), rows
    step = rows[-1]
    assert step["must_move_bytes"] > 0 and step["accessed_over_must_move"] > 1.0
    assert "| tiny | v6e:2x2/dp1xtp4 | pallas | off | 2 | 256 | generate | yes |" in \
        tc.markdown(rows)


def test_topology_names_are_checked():
    with pytest.raises(ValueError, match="needs 8 chips, the slice has 4"):
        tc.Topology.parse("v5e:2x2/dp2xtp4")
    with pytest.raises(ValueError, match="expected GEN:AxB"):
        tc.Topology.parse("v9:2x2")
    assert tc.Topology.parse("v5p:1x1x1").chips == 1
