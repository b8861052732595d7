"""The engine's programs compile for TPU slices on this CPU host (libtpu's XLA:TPU and Mosaic
compilers, abstract chips): with the Pallas kernel on one chip and on 4-chip meshes split by
heads (tp) and by batch (dp), and with the jnp reference. Skipped, saying why, where libtpu is
not installed (`pip install -e ".[tpu]"`).

What this guards (issue 27): dispatch chose the kernel by the default backend, so a program
compiled for a TPU from a CPU host got the GPU-style kernel, and the TPU kernel on a mesh of
more than one chip failed with "Mosaic kernels cannot be automatically partitioned"."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aurora_jax.accelerators import tpu_compile as tc
from aurora_jax.learn.online import OnlineConfig
from aurora_jax.speculative.config import SpecConfig

pytestmark = pytest.mark.skipif(tc.tpu_compiler_available() is not None,
                                reason=str(tc.tpu_compiler_available()))

MESHES = ["v5e:1x1", "v6e:2x2/tp4", "v5e:2x2/dp2xtp2"]
# Small drafts: the same programs (draft, verify through the kernel or the reference, commit)
# with fewer unrolled draft steps than the check's defaults (tree depth 5, 16 nodes), which
# cost XLA:TPU 26 s of compiling the tp4 tree step here against 11 s for this tree.
SMALL = {"tree": SpecConfig(mode="tree", depth=2, topk=2, num_draft_tokens=4),
         "chain": SpecConfig(mode="chain", depth=2)}


@pytest.fixture(scope="module")
def meshes():
    return {name: (tc.Topology.parse(name), tc.Topology.parse(name).mesh()) for name in MESHES}


def _generate(meshes, name: str, attention: str, mode: str = "tree"):
    """(compiled step or None, its report, its relayouts of cache-sized arrays)."""
    topo, mesh = meshes[name]
    # 768 slots: no weight of the tiny model has as many elements as a cache shard (relayouts
    # are found by size; at 1024 slots the lm_head shard has as many under tp=4).
    engine = tc.engine_for(tc.MODELS["tiny"], attention, SMALL[mode], mesh, batch=2,
                           cache_size=768, dtype="bfloat16")
    programs = {}  # name -> (compiled program or None, report)

    def keep(name, fn, args):
        programs[name] = tc.compile_program(fn, args, mesh)
        return programs[name][0]

    tc.compile_engine_programs(engine, (), keep)
    compiled, report = programs["generate"]
    return compiled, report, [] if compiled is None else tc.cache_relayouts(engine, compiled)


@pytest.mark.parametrize("name", MESHES)
def test_the_tpu_kernel_compiles_on_one_chip_and_on_split_meshes(meshes, name):
    """The tree step with attention="pallas" compiles and calls the Mosaic kernel (a
    tpu_custom_call in the compiled program), on one chip and under shard_map on 4 chips,
    and the kernel reads the cache where it lies: no copy, transpose or reshape of an array
    as large as one layer's cache shard anywhere in the step."""
    compiled, report, relayouts = _generate(meshes, name, "pallas")
    assert compiled is not None, report.get("error")
    assert "tpu_custom_call" in compiled.as_text()
    assert relayouts == []
    assert report["peak_bytes"] < 16 << 30  # v5e's HBM, the smallest of the three


@pytest.mark.parametrize("name", MESHES)
def test_the_reference_compiles_everywhere_without_the_kernel(meshes, name):
    compiled, report, relayouts = _generate(meshes, name, "reference", mode="chain")
    assert compiled is not None, report.get("error")
    assert "tpu_custom_call" not in compiled.as_text()
    assert relayouts == []


def test_the_check_reports_every_program_of_a_setting(meshes):
    """Prefill and insert at a prompt length, and the step, each with its memory and cost;
    the step's bytes over what it must move is a ratio above 1 (it reads at least that), by
    XLA's count and by the HBM count, and the HBM count is the lower (XLA counts prefetches
    twice)."""
    topo, mesh = meshes["v6e:2x2/tp4"]
    rows = tc.check_engine("tiny", topo, mesh, "pallas", "off", 2, 256, (32,))
    assert [r["program"] for r in rows] == ["prefill b2 t32", "insert b2 t32", "generate"]
    assert all(r["compiled"] and r["peak_bytes"] > 0 and r["fits"] for r in rows), rows
    step = rows[-1]
    assert step["must_move_bytes"] > 0 and step["accessed_over_must_move"] > 1.0
    assert 1.0 <= step["traffic_over_must_move"] < step["accessed_over_must_move"]
    assert "| tiny | v6e:2x2/dp1xtp4 | pallas | off | 2 | 256 | generate | yes |" in \
        tc.markdown(rows)
    assert f"{step['traffic_over_must_move']:.3f}x" in tc.markdown(rows)


def _kernel_operands(mesh, s: int):
    """The TPU kernel's operands for one sequence of 8 query heads over one kv head (D=128),
    one new token and a bfloat16 cache of S slots, as shape structs on the mesh."""
    def shape(*dims, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(dims, dtype, sharding=NamedSharding(mesh, P()))

    return (shape(1, 1, 8, 128), shape(1, 1, 1, 128), shape(1, 1, 1, 128),
            shape(1, 1, 1, dtype=jnp.bool_), shape(1, 1, s, 128), shape(1, 1, s, 128),
            shape(1, dtype=jnp.int32))


@pytest.mark.parametrize("name, limit_mib, too_big", [("v5e:1x1", 16, 16384),
                                                      ("v6e:1x1", 32, 32768)])
def test_a_block_too_large_for_vmem_is_refused_and_the_default_fits(name, limit_mib, too_big,
                                                                     monkeypatch):
    """Over a 131072-slot cache, a block of `too_big` slots needs more than the chip's scoped
    VMEM: asked for, it is refused with the numbers before Mosaic sees it, and it really does
    not fit (with the check removed, Mosaic fails with a VMEM OOM). Half of it, the block
    `fit_blocks` shrinks it to (as the kernel shrinks its default when blocks are unset),
    compiles, and so does the kernel's default."""
    from pallas_kernels import BlockSizes
    from pallas_kernels import tree_attention_tpu as tpu

    mesh = tc.Topology.parse(name).mesh()
    args = _kernel_operands(mesh, 131072)

    def compile_with(blocks):
        return tc.compile_program(jax.jit(functools.partial(tpu.tree_attention_tpu,
                                                             blocks=blocks)), args, mesh)

    compiled, report = compile_with(BlockSizes(block_s=too_big))
    assert compiled is None
    assert f"BlockSizes(block_s={too_big}) needs about" in report["error"]
    assert f"over the {limit_mib} MiB scoped limit" in report["error"]
    assert f"block_s={too_big // 2} fits" in report["error"]
    with monkeypatch.context() as m:
        m.setattr(tpu, "check_fits", lambda *a, **k: None)
        compiled, report = compile_with(BlockSizes(block_s=too_big))
    assert compiled is None and "CompileTimeScopedVmemOom" in report["error"]
    fitted = tpu.fit_blocks(BlockSizes(block_s=too_big), 131072, 8, 8, 128, jnp.bfloat16,
                            limit_mib << 20)
    assert fitted == BlockSizes(block_s=too_big // 2)
    assert compile_with(fitted)[0] is not None
    compiled, report = compile_with(None)
    assert compiled is not None, report.get("error")


def test_the_learner_step_compiles_on_chips_of_its_own():
    """The online learner's train step (`learner.devices`: two chips beside the two that
    serve) compiles for TPU; it runs on the learner's chips only, its batch split between
    them, the draft's state and the target's embedding and lm_head whole on each."""
    topo = tc.Topology.parse("v5e:2x2/tp2+learner2")
    serving, learner = topo.mesh(), topo.learner_mesh()
    online = OnlineConfig(batch_size=2, seq_len=32, trees_per_seq=2)
    row, compiled = tc.check_learner("tiny", topo, serving, "chain", online)
    assert compiled is not None, row.get("error")
    assert row["fits"] and row["peak_bytes"] > 0 and row["flops"] > 0
    assert row["program"] == "learner step b2 t32" and row["topology"] == str(topo)
    state, buffers, embed, head, batch = compiled.input_shardings[0]
    ids = {d.id for d in learner.devices.flat}
    assert not ids & {d.id for d in serving.devices.flat}
    assert all({d.id for d in s.device_set} == ids
               for s in jax.tree.leaves((state, buffers, embed, head, batch)))
    assert batch.tokens.spec == P("dp") and embed.is_fully_replicated
    assert "| tiny | v5e:2x2/dp1xtp2+learner2 | - | chain | 2 | 32 | learner step b2 t32 | yes |" \
        in tc.markdown([row])


def test_a_learner_sharing_the_serving_chip_counts_the_targets_weights_there():
    """Without chips of its own, the learner step fits only beside the target's weights that
    are not its arguments: every layer's (q, k, v, o, gate, up, down and two norms), the
    final norm and the RoPE frequencies, counted here by hand for the tiny model."""
    topo = tc.Topology.parse("v5e:1x1")
    online = OnlineConfig(batch_size=2, seq_len=32, trees_per_seq=2)
    row, compiled = tc.check_learner("tiny", topo, topo.mesh(), "chain", online)
    assert compiled is not None, row.get("error")
    c = tc.MODELS["tiny"]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layer = (2 * c.hidden_size * q + 2 * c.hidden_size * kv
             + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size)
    rope = 4 * c.head_dim // 2  # the RoPE inverse frequencies, float32
    assert row["serving_weight_bytes"] == 2 * (c.num_layers * layer + c.hidden_size) + rope
    assert row["fits"]
    gb = f"{row['peak_bytes'] / 1e9:.2f} + {row['serving_weight_bytes'] / 1e9:.2f} serving / 17.2"
    assert f"| learner step b2 t32 | yes | {gb} |" in tc.markdown([row])


def test_a_program_larger_than_hbm_is_reported_as_not_fitting(meshes):
    """A program whose buffers exceed the chip's HBM fails to compile, and the row says it
    does not fit (not that it cannot compile); a compile error of another kind does not."""
    topo, mesh = meshes["v5e:1x1"]
    x = jax.ShapeDtypeStruct((2 << 30,), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled, report = tc.compile_program(jax.jit(lambda x: x + 1), (x,), mesh)  # 2 x 8 GiB
    assert compiled is None and report["fits"] is False, report
    row = dict(model="tiny", topology=str(topo), attention="-", spec="off", batch=1,
               context=1, hbm_bytes=topo.hbm_bytes, program="p", **report)
    assert "| p | no, does not fit: JaxRuntimeError: RESOURCE_EXHAUSTED" in tc.markdown([row])
    _, report = tc.compile_program(jax.jit(lambda x: x.reshape(3, -1)), (x,), mesh)
    assert not report["compiled"] and "fits" not in report, report


def test_topology_names_are_checked():
    with pytest.raises(ValueError, match="needs 8 chips, the slice has 4"):
        tc.Topology.parse("v5e:2x2/dp2xtp4")
    with pytest.raises(ValueError, match=r"tp=4 \+ 1 learner chips needs 5 chips"):
        tc.Topology.parse("v5e:2x2/tp4+learner1")
    topo = tc.Topology.parse("v5e:2x2/tp2+learner2")
    assert (topo.tp, topo.learner, str(topo)) == (2, 2, "v5e:2x2/dp1xtp2+learner2")
    assert tc.Topology.parse("v5e:1x1").learner_mesh() is None
    with pytest.raises(ValueError, match="expected GEN:AxB"):
        tc.Topology.parse("v9:2x2")
    assert tc.Topology.parse("v5p:1x1x1").chips == 1
    gpus = tc.Topology.parse("h200:8/dp2xtp4")
    assert (gpus.chips, gpus.dp, gpus.tp, gpus.is_gpu) == (8, 2, 4, True)
    assert tc.Topology.parse("h100:1").hbm_bytes == 84_929_347_584
    for wrong in ("h100:2x2", "v5e:4"):  # a GPU count, a TPU slice's shape
        with pytest.raises(ValueError, match="GPU:N"):
            tc.Topology.parse(wrong)


def test_a_run_stopped_part_way_keeps_the_rows_it_made(tmp_path, monkeypatch):
    """The check writes its table after every setting: the 8B default takes about an hour,
    and a run stopped (or failing) in its second setting still leaves the first's rows."""
    check_engine = tc.check_engine
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return check_engine(*args, **kwargs)

    monkeypatch.setattr(tc, "check_engine", second_fails)
    with pytest.raises(KeyboardInterrupt):
        tc.main(["--model", "tiny", "--topology", "v5e:1x1", "--attention", "reference",
                 "--spec", "off", "--batch", "1", "2", "--context", "256", "--prompt-len",
                 "--learner", "none", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "tpu_compile.json").read_text())["rows"]
    assert [(r["program"], r["batch"], r["compiled"]) for r in rows] == [("generate", 1, True)]
    assert "| tiny | v5e:1x1/dp1xtp1 | reference | off | 1 | 256 | generate | yes |" in \
        (tmp_path / "tpu_compile.md").read_text()
