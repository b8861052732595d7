"""scripts/accelerator_check.py --small: every section's path runs on CPU and its results
hold the invariants the full check reports on hardware."""

from __future__ import annotations

import json
import math

import jax

from aurora_jax.hardware.check import SECTIONS, main


def test_small_check_runs_every_section(small_ckpt, tmp_path):
    data = main(["--small", "--target", str(small_ckpt), "--out", str(tmp_path)])
    sections = data["sections"]
    assert list(sections) == list(SECTIONS)
    for name, res in sections.items():
        assert "error" not in res, f"{name}: {res.get('error')}"
    assert sections["device"]["backend"] == jax.default_backend()
    assert sections["device"]["copy_bandwidth_gbps"] > 0

    # The kernel (interpret mode here) agreed with the reference before it was timed.
    (krow,) = sections["kernels"]["rows"]
    assert krow["kernel_us"] is not None and "kernel_error" not in krow

    # Greedy output: device == CPU, and speculative == target-only, token for token.
    for row in sections["parity"]["rows"] + sections["pretrained"]["parity"]:
        assert row["equal"] == row["sequences"], row

    decode = {(r["batch"], r["spec"]): r for r in sections["decode"]["rows"]}
    assert set(decode) == {(2, "off"), (2, "tree"), (2, "chain")}
    assert decode[(2, "off")]["vs_off"] == 1.0
    for r in decode.values():
        assert r["step_ms"] > 0 and r["floor_weights_kv_ms"] > r["floor_weights_ms"] > 0
        assert r["compile_s"] > 0  # its program was compiled in the section, and reported

    pre = sections["pretrained"]
    assert pre["training"]["steps"] == 4 and math.isfinite(pre["training"]["final_loss"])
    speed = {r["spec"]: r for r in pre["rows"]}
    assert set(speed) == {"off", "tree"}
    assert speed["off"]["speedup_vs_target_only"] == 1.0
    for r in speed.values():
        assert r["outputs_equal_target_only"] == "8/8" and r["acceptance_length"] >= 1.0

    # Both files hold every section.
    on_disk = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert on_disk["sections"].keys() == sections.keys()
    md = (tmp_path / "accelerator_check.md").read_text()
    assert all(f"### {name} (" in md for name in SECTIONS)
