"""scripts/accelerator_check.py --small: every section's path runs on CPU, and what a CPU can
check holds: the kernel (in Pallas interpret mode) agrees with its reference, speculative
greedy output equals target-only's token for token, each setting's step is timed and its
compile time reported, the draft trains, and both report files hold every section.

On CPU the "device" is the CPU itself, so this test makes none of the hardware claims the
full check reports: a target-only parity row compares a program with itself there, and the
memory floors and the target-only baseline's ratios (1 by definition) are arithmetic."""

from __future__ import annotations

import json
import math

from aurora_jax.accelerators.check import SECTIONS, main


def test_small_check_runs_every_section(small_ckpt, tmp_path):
    data = main(["--small", "--target", str(small_ckpt), "--out", str(tmp_path)])
    sections = data["sections"]
    assert list(sections) == list(SECTIONS)
    for name, res in sections.items():
        assert "error" not in res, f"{name}: {res.get('error')}"
    assert sections["device"]["copy_bandwidth_gbps"] > 0  # a copy was timed

    # The kernel (interpret mode here) agreed with the reference before it was timed.
    (krow,) = sections["kernels"]["rows"]
    assert krow["kernel_us"] is not None and "kernel_error" not in krow

    # Speculative greedy output == target-only's, token for token, on the random model and
    # on the small checkpoint (the parity sections' speculative rows: here both sides run on
    # the CPU, so that is all they check).
    parity = sections["parity"]["rows"] + sections["pretrained"]["parity"]
    speculative = [row for row in parity if row["spec"] != "off"]
    assert [row["spec"] for row in speculative] == ["tree", "tree"]
    for row in speculative:
        assert row["equal"] == row["sequences"], row

    decode = {(r["batch"], r["spec"]): r for r in sections["decode"]["rows"]}
    assert set(decode) == {(2, "off"), (2, "tree"), (2, "chain")}
    for r in decode.values():
        assert r["step_ms"] > 0  # timed
        assert r["compile_s"] > 0  # its program was compiled in the section, and reported

    pre = sections["pretrained"]
    assert pre["training"]["steps"] == 4 and math.isfinite(pre["training"]["final_loss"])
    speed = {r["spec"]: r for r in pre["rows"]}
    assert set(speed) == {"off", "tree"}
    assert speed["tree"]["outputs_equal_target_only"] == "8/8"
    assert speed["tree"]["acceptance_length"] >= 1.0  # each step commits the target's token

    # Both files hold every section.
    on_disk = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert on_disk["sections"].keys() == sections.keys()
    md = (tmp_path / "accelerator_check.md").read_text()
    assert all(f"### {name} (" in md for name in SECTIONS)
