"""Plots of a run (PNG, matplotlib's non-interactive backend): acceptance length versus
requests served (with each setting's measured break-even acceptance: the step-time ratio to
the target alone), tokens/s over time with draft swaps marked, acceptance per domain."""

from __future__ import annotations

from pathlib import Path


def plot_run(rows: list[dict], out: Path, labels: dict[str, str] | None = None) -> list[Path]:
    """`labels` names each speculation setting of the rows' "mode" (e.g. alt1 -> "ngram 3")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths, labels = [], labels or {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows if r["mode"] != "off")):
        pts = [(r["requests"], r["acceptance_length"]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i}",
                label=f"served: {labels.get(mode, mode)}", zorder=2)
        # Above its break-even line a setting is faster than the target alone.
        even = [(r["requests"], r["break_even_acceptance"]) for r in rows
                if r["mode"] == mode and r.get("break_even_acceptance")]
        if even:
            ax.plot(*zip(*even, strict=True), ":", color=f"C{i}", lw=1.2, marker="_",
                    markersize=14, label=f"break-even: {labels.get(mode, mode)}", zorder=1)
    if r_off := [r for r in rows if r["mode"] == "off"]:
        ax.scatter([r["requests"] for r in r_off], [1.0] * len(r_off), marker="x",
                   color="k", label="target-only windows (tau 1)", zorder=2)
    sim = [(r["requests"], r["learner_sim_acceptance"]) for r in rows
           if r.get("learner_sim_acceptance")]
    if sim:
        ax.plot(*zip(*sim, strict=True), "--", color="0.5",
                label="learner's simulated chain tau (its training traffic)", zorder=1)
    # Plotted at the window it was scored on (before training on it), hence the shift.
    fresh = [(r["requests"], r["learner_fresh_sim_acceptance"]) for r in rows
             if r.get("learner_fresh_sim_acceptance")]
    if fresh:
        ax.plot(*zip(*fresh, strict=True), "-.", color="0.3",
                label="same, on each new window before training on it", zorder=1)
    ax.set(xlabel="requests served", ylabel="acceptance length (tokens/step)",
           title="Acceptance length while the draft learns")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "acceptance.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    t = [r["elapsed_s"] for r in rows]
    ax.plot(t, [r["tokens_per_s"] for r in rows], "o-", label="window tokens/s")
    if any(r.get("off_tokens_per_s") for r in rows):
        ax.plot(t, [r.get("off_tokens_per_s") or float("nan") for r in rows], "--",
                color="C3", label="target-only tokens/s (measured)")
    prev = None
    for r in rows:
        v = r.get("draft_version")
        if prev is not None and v != prev:
            ax.axvline(r["elapsed_s"], color="0.6", lw=0.8, ls=":")
        prev = v
    ax.set(xlabel="seconds since start (dotted: draft swapped in)", ylabel="tokens/s",
           title="Throughput over time")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "throughput.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    domains = sorted({d for r in rows for d in r["per_domain_acceptance"]})
    for d in domains:
        pts = [(r["requests"], r["per_domain_acceptance"][d]) for r in rows
               if r["mode"] != "off" and d in r["per_domain_acceptance"]]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=d)
    ax.set(xlabel="requests served", ylabel="acceptance length",
           title="Acceptance length per domain (speculative windows)")
    if ax.get_legend_handles_labels()[0]:  # a target-only run has no speculative window
        ax.legend(fontsize=8)
    paths.append(_save(fig, out / "acceptance_by_domain.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
