"""Plots of benchmark records (bench/results/*.jsonl): GB/s against SMs for the intranode sweep. Used by
bench_intranode.py after a run, and offline: `python bench/plot.py --commit 43a3d02 --ranks 2 --out plot.png`."""
from __future__ import annotations

import argparse
import json
import os

OPS = (("dispatch", "fp8", "cached-graph"), ("dispatch", "bf16", "cached-graph"), ("combine", "bf16", "graph"))


def plot_sm_sweep(rows: list[dict], ceiling_gbps: float, title: str, path: str) -> None:
    """Physical GB/s (bytes that crossed NVLink per call time; solid) and logical GB/s (DeepEP's count; dashed) of the
    CUDA-graph rows against num_sms, with the one-way peer-store ceiling measured in the same run."""
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
    ax.axhline(ceiling_gbps, ls=":", c="gray", label=f"one-way peer-store ceiling ({ceiling_gbps:.0f} GB/s)")
    ax.set_xlabel("SMs (Config.num_sms)")
    ax.set_ylabel("GB/s (CUDA-graph replay, median)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "intranode.jsonl"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r["commit"] == args.commit and r["ranks"] == args.ranks]
    if not rows:
        raise SystemExit(f"no records of commit {args.commit} with {args.ranks} ranks in {args.results}")
    ceiling = max(r.get("ceiling_one_way_gbps") or 0 for r in rows)
    card, gpus = rows[0]["card"], rows[0]["gpus"]
    plot_sm_sweep(rows, ceiling, f"epcomm intranode EP{args.ranks} on {gpus}x {card} ({args.commit})", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
