"""HBM bytes counted per instruction from a compiled program's HLO (accelerators/hbm_traffic.py):
each rule on a module written by hand, then programs compiled for a TPU on this host, whose
true traffic is known (one read of a weight, two reads of it, an in-place row update, a row
gather). The compiled ones skip, saying why, where libtpu is not installed."""
# ruff: noqa: E501 (MODULE is HLO text as XLA prints it, one instruction per line)

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from aurora_jax.accelerators import tpu_compile as tc
from aurora_jax.accelerators.hbm_traffic import hbm_traffic, parse_shape

MODULE = """HloModule m, entry_computation_layout={(bf16[1024,256]{1,0})->f32[1,512]{1,0}}

%fused_slice (param_0: bf16[1024,256], param_1: s32[]) -> bf16[1,256] {
  %param_0 = bf16[1024,256]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1 = s32[]{:S(6)} parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = bf16[1,256]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={1,256}
}

%fused_update (param_0: bf16[64,256], param_1: bf16[1,256], param_2: s32[]) -> bf16[64,256] {
  %param_0 = bf16[64,256]{1,0} parameter(0)
  %param_1 = bf16[1,256]{1,0} parameter(1)
  %param_2 = s32[]{:S(6)} parameter(2)
  %c.1 = s32[] constant(0)
  ROOT %dus = bf16[64,256]{1,0} dynamic-update-slice(%param_0, %param_1, %param_2, %c.1)
}

%fused_dot (param_0: bf16[256,512], param_1: bf16[1,256]) -> f32[1,512] {
  %param_0 = bf16[256,512]{1,0:S(1)} parameter(0)
  %param_1 = bf16[1,256]{1,0:S(1)} parameter(1)
  ROOT %dot = f32[1,512]{1,0} dot(%param_1, %param_0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cheap (p: (f32[65536])) -> f32[65536] {
  %p = (f32[65536]{0}) parameter(0)
  %z = f32[] constant(0)
  ROOT %b = f32[65536]{0} broadcast(%z), dimensions={}
}

%dear (p.1: (f32[65536])) -> f32[65536] {
  %p.1 = (f32[65536]{0}) parameter(0)
  %g = f32[65536]{0} get-tuple-element(%p.1), index=0
  ROOT %n = f32[65536]{0} negate(%g)
}

%wbody (q: (s32[], f32[1,512])) -> (s32[], f32[1,512]) {
  %q = (s32[]{:S(6)}, f32[1,512]{1,0}) parameter(0)
  %k = s32[]{:S(6)} get-tuple-element(%q), index=0
  %v = f32[1,512]{1,0} get-tuple-element(%q), index=1
  %one = s32[]{:S(6)} constant(1)
  %k2 = s32[]{:S(6)} add(%k, %one)
  %v2 = f32[1,512]{1,0} add(%v, %v)
  ROOT %r = (s32[]{:S(6)}, f32[1,512]{1,0}) tuple(%k2, %v2)
}

%wcond (q.1: (s32[], f32[1,512])) -> pred[] {
  %q.1 = (s32[]{:S(6)}, f32[1,512]{1,0}) parameter(0)
  %k.1 = s32[]{:S(6)} get-tuple-element(%q.1), index=0
  %three = s32[]{:S(6)} constant(3)
  ROOT %lt = pred[]{:S(6)} compare(%k.1, %three), direction=LT
}

ENTRY %main (emb: bf16[1024,256], w: bf16[256,512], cache: bf16[64,256], i: s32[], big: f32[65536]) -> f32[1,512] {
  %emb = bf16[1024,256]{1,0:T(8,128)(2,1)} parameter(0)
  %w = bf16[256,512]{1,0} parameter(1)
  %cache = bf16[64,256]{1,0} parameter(2)
  %i = s32[]{:S(6)} parameter(3)
  %big = f32[65536]{0} parameter(4)
  %row = bf16[1,256]{1,0:S(1)} fusion(%emb, %i), kind=kLoop, calls=%fused_slice
  %cs = (bf16[256,512]{1,0:S(1)}, bf16[256,512]{1,0}, u32[]{:S(2)}) copy-start(%w)
  %cd = bf16[256,512]{1,0:S(1)} copy-done(%cs)
  %y = f32[1,512]{1,0} fusion(%cd, %row), kind=kOutput, calls=%fused_dot
  %upd = bf16[64,256]{1,0} fusion(%cache, %row, %i), kind=kLoop, calls=%fused_update
  %ss = ((bf16[256,512]{1,0}), bf16[128,512]{1,0:S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:128], [0:512]}
  %sd = bf16[128,512]{1,0:S(1)} slice-done(%ss)
  %t = f32[1,512]{1,0} add(%y, %y)
  %zero = s32[]{:S(6)} constant(0)
  %init = (s32[]{:S(6)}, f32[1,512]{1,0}) tuple(%zero, %t)
  %loop = (s32[]{:S(6)}, f32[1,512]{1,0}) while(%init), condition=%wcond, body=%wbody, backend_config={"known_trip_count":{"n":"3"}}
  %bt = (f32[65536]{0}) tuple(%big)
  %which = s32[]{:S(6)} constant(1)
  %cond = f32[65536]{0} conditional(%which, %bt, %bt), branch_computations={%cheap, %dear}
  ROOT %out = f32[1,512]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_each_rule_counts_what_crosses_hbm_and_nothing_else():
    """Every line of MODULE has its own expected bytes: a gathered row is 512 bytes of a
    512 KiB table; the prefetch of w reads it once and its use in on-chip memory reads
    nothing; the cache's in-place update moves only its row; a slice prefetch reads the
    slice; the loop's body counts three times; the conditional counts its dearer branch."""
    t = hbm_traffic(MODULE)
    row, w, half_w, vec = 256 * 2, 256 * 512 * 2, 128 * 512 * 2, 512 * 4
    big = 65536 * 4
    assert t.unknown_trip_counts == 0
    assert t.read == row + w + half_w + 2 * vec + 3 * 2 * vec + big
    assert t.written == vec + row + vec + 3 * vec + big
    assert t.by_opcode == {"fusion": row + vec + row, "copy-start": w, "slice-start": half_w,
                           "add": 3 * vec + 3 * 3 * vec, "conditional": 2 * big}


def test_a_loop_of_unknown_trip_count_is_counted_once_and_said_to_be():
    t = hbm_traffic(MODULE.replace(', backend_config={"known_trip_count":{"n":"3"}}', ""))
    assert t.unknown_trip_counts == 1
    assert t.by_opcode["add"] == 3 * 512 * 4 + 3 * 512 * 4


def test_a_conditional_on_a_predicate_counts_its_dearer_branch_too():
    """XLA prints a two-way conditional on a predicate with true_/false_computation, not
    branch_computations; the count is the same either way round."""
    want = hbm_traffic(MODULE).by_opcode["conditional"]
    for true, false in (("dear", "cheap"), ("cheap", "dear")):
        t = hbm_traffic(MODULE.replace(
            "branch_computations={%cheap, %dear}",
            f"true_computation=%{true}, false_computation=%{false}"))
        assert t.by_opcode["conditional"] == want == 2 * 65536 * 4


def test_shapes_name_their_memory_space():
    a, _ = parse_shape("bf16[8,128]{1,0:T(8,128)(2,1)S(1)}")
    assert (a.dims, a.bytes, a.in_hbm) == ((8, 128), 2048, False)
    (src,), dst, flag = parse_shape("((s8[64]{0}), s8[32]{0:S(1)}, s32[]{:S(2)})")[0]
    assert (src.in_hbm, dst.in_hbm, dst.bytes, flag.bytes) == (True, False, 32, 4)
    with pytest.raises(ValueError, match="no HLO shape"):
        parse_shape("%x")


needs_tpu = pytest.mark.skipif(tc.tpu_compiler_available() is not None,
                               reason=str(tc.tpu_compiler_available()))


def _compile(fn, *args, donate=()):
    topo = tc.Topology.parse("v5e:1x1")
    mesh = topo.mesh()
    placed = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
              for a in args]
    compiled, report = tc.compile_program(jax.jit(fn, donate_argnums=donate), placed, mesh)
    assert compiled is not None, report.get("error")
    return hbm_traffic(compiled.as_text()), report


W = jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)  # 128 MiB: no on-chip memory holds it
X = jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16)


@needs_tpu
def test_a_matrix_vector_product_reads_its_weight_once():
    t, _ = _compile(lambda w, x: x @ w, W, X)
    assert 1.0 <= t.total / (8192 * 8192 * 2) < 1.001


@needs_tpu
def test_two_products_in_sequence_read_the_weight_twice():
    t, _ = _compile(lambda w, x: (x @ w) @ w, W, X)
    assert 2.0 <= t.total / (8192 * 8192 * 2) < 2.002


@needs_tpu
def test_an_in_place_row_update_moves_only_the_row():
    cache = jax.ShapeDtypeStruct((8, 4096, 128), jnp.bfloat16)  # 8 MiB
    row = jax.ShapeDtypeStruct((8, 1, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((), jnp.int32)
    t, _ = _compile(lambda c, r, p: jax.lax.dynamic_update_slice(c, r, (0, p, 0)),
                    cache, row, pos, donate=(0,))
    assert 0 < t.total < 4 * 8 * 128 * 2 + 64  # the row read and written, and the index


@needs_tpu
def test_a_row_gather_reads_only_the_rows():
    # 256 MiB: XLA:TPU copies a table that fits on-chip memory (v5e: 128 MiB) there whole
    # first, and then the count is the whole table (64 MiB: 67117072 bytes), as it should be.
    table = jax.ShapeDtypeStruct((65536, 2048), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((4,), jnp.int32)
    t, _ = _compile(lambda e, i: e[i], table, ids)
    assert 0 < t.total <= 2 * 4 * 2048 * 2 + 64  # four rows read and written, and the ids
