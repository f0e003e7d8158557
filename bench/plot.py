"""Plots of benchmark records (bench/results/*.jsonl): GB/s against SMs for the intranode sweep (used by
bench_intranode.py after a run, and offline: `python bench/plot.py --commit dee4104 --ranks 2`), and the zero-copy
times of every commit measured, against the goals (`python bench/plot.py --versions`). Plots are not tracked: they are
drawn on demand from the JSON lines, by default into gpu_out/plots/ (ignored), or wherever --out says. Records of
ranks sharing a GPU ("oversubscribed": true, not NVLink timings) are left out unless --oversubscribed asks for them."""
from __future__ import annotations

import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
PLOT_DIR = os.path.join(os.path.dirname(HERE), "gpu_out", "plots")  # ignored, like everything a run produces

OPS = (("dispatch", "fp8", "cached-graph"), ("dispatch", "bf16", "cached-graph"), ("combine", "bf16", "graph"))


def plot_sm_sweep(rows: list[dict], ceiling_gbps: float | None, title: str, path: str) -> None:
    """Physical GB/s (bytes that crossed NVLink per call time; solid) and logical GB/s (DeepEP's count; dashed) of the
    CUDA-graph rows against num_sms, with the one-way peer-store ceiling measured in the same run (None or 0: the run
    had none, e.g. one rank)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (op, dt, variant), color in zip(OPS, ("tab:blue", "tab:orange", "tab:green")):
        pts = sorted((r["num_sms"], r["physical_gbps"], r["logical_gbps"]) for r in rows
                     if r["op"] == op and r["dtype"] == dt and r.get("variant") == variant and r["num_sms"])
        if not pts:
            continue
        sms = [p[0] for p in pts]
        ax.plot(sms, [p[1] for p in pts], marker="o", color=color, label=f"{dt} {op}: physical")
        ax.plot(sms, [p[2] for p in pts], marker=".", ls="--", color=color, alpha=0.6, label=f"{dt} {op}: logical")
    if ceiling_gbps:
        ax.axhline(ceiling_gbps, ls=":", c="gray", label=f"one-way peer-store ceiling ({ceiling_gbps:.0f} GB/s)")
    ax.set_xlabel("SMs (Config.num_sms)")
    ax.set_ylabel("GB/s (CUDA-graph replay, median)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# The zero-copy rows of the version history and issue 3's goals for them (us at 24 SMs).
VERSION_OPS = (("dispatch", "fp8", "cached-graph, zero-copy", 100.0),
               ("dispatch", "bf16", "cached-graph, zero-copy", 190.0),
               ("combine", "bf16", "graph, zero-copy", 200.0))


def version_series(rows: list[dict], ranks: int = 2, num_sms: int = 24) -> tuple[list[str], dict]:
    """(commits in the order of their first record, {(op, dtype): [median us per commit, None where unmeasured]}):
    VERSION_OPS rows at `ranks` ranks and `num_sms` SMs, one GPU per rank (oversubscribed records are not NVLink
    timings); a commit measured in several runs gets the median of them."""
    import statistics
    wanted = {(op, dt, variant) for op, dt, variant, _ in VERSION_OPS}
    commits: list[str] = []
    values: dict = {}
    for r in sorted(rows, key=lambda r: r.get("timestamp") or ""):
        key = (r["op"], r["dtype"], r.get("variant"))
        if (r.get("ranks"), r.get("num_sms")) != (ranks, num_sms) or key not in wanted or r.get("oversubscribed"):
            continue
        if r["commit"] not in commits:
            commits.append(r["commit"])
        values.setdefault((r["op"], r["dtype"]), {}).setdefault(r["commit"], []).append(r["median_us"])
    series = {key: [statistics.median(per[c]) if c in per else None for c in commits] for key, per in values.items()}
    return commits, series


def plot_versions(rows: list[dict], title: str, path: str, ranks: int = 2) -> None:
    """One panel per op: the zero-copy CUDA-graph median of every commit measured (in record order), and the goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    commits, series = version_series(rows, ranks)
    if not commits:
        raise ValueError(f"no zero-copy records at {ranks} ranks and 24 SMs")
    fig, axes = plt.subplots(1, len(VERSION_OPS), figsize=(12, 4.2), sharex=True)
    x = list(range(len(commits)))
    for ax, (op, dt, _, goal), color in zip(axes, VERSION_OPS, ("tab:blue", "tab:orange", "tab:green")):
        ys = series.get((op, dt), [None] * len(commits))
        pts = [(i, y) for i, y in zip(x, ys) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color)
        ax.axhline(goal, ls=":", c="red", label=f"goal {goal:.0f} us")
        ax.set_title(f"{dt} {op}")
        ax.set_xticks(x)
        ax.set_xticklabels(commits, rotation=70, fontsize=7)
        ax.set_ylabel("us (CUDA-graph replay, median)")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_out(commit: str | None, ranks: int, versions: bool, oversubscribed: bool = False) -> str:
    """Where a plot goes without --out: gpu_out/plots/, one file name per (kind, ranks, commit, oversubscribed), so a
    redraw overwrites its own file."""
    over = "_oversubscribed" if oversubscribed and not versions else ""
    name = f"intranode_versions_ep{ranks}.png" if versions else f"intranode_sms_ep{ranks}{over}_{commit}.png"
    return os.path.join(PLOT_DIR, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--commit", help="plot this commit's SM sweep")
    ap.add_argument("--versions", action="store_true", help="plot the zero-copy times of every commit instead")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(HERE, "results", "intranode.jsonl"))
    ap.add_argument("--out", help="the PNG to write (default: gpu_out/plots/, named by kind, ranks and commit)")
    ap.add_argument("--oversubscribed", action="store_true",
                    help="plot the commit's records of ranks sharing a GPU (not NVLink timings) instead")
    args = ap.parse_args()
    if not args.versions and not args.commit:
        ap.error("--commit or --versions is required")
    if args.out is None:
        args.out = default_out(args.commit, args.ranks, args.versions, args.oversubscribed)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.versions:
        try:
            plot_versions(rows, f"epcomm intranode EP{args.ranks}, zero-copy, 24 SMs: each commit measured", args.out,
                          args.ranks)
        except ValueError as exc:
            raise SystemExit(str(exc))
        print(f"wrote {args.out}")
        return
    over = args.oversubscribed
    rows = [r for r in rows if r["commit"] == args.commit and r["ranks"] == args.ranks
            and bool(r.get("oversubscribed")) == over]
    if not rows:
        raise SystemExit(f"no records of commit {args.commit} with {args.ranks} ranks "
                         f"{'sharing a GPU' if over else 'one GPU each'} in {args.results}")
    ceiling = max(r.get("ceiling_one_way_gbps") or 0 for r in rows)
    card, gpus = rows[0]["card"], rows[0]["gpus"]
    note = ", oversubscribed: not NVLink timings" if over else ""
    plot_sm_sweep(rows, ceiling, f"epcomm intranode EP{args.ranks} on {gpus}x {card} ({args.commit}{note})", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
