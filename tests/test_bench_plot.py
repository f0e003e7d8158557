"""bench/plot.py: the SM-sweep plot drawn from benchmark records (CPU only; matplotlib comes with the test extra)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "bench", "plot.py")


def _record(op, dtype, variant, sms, physical, logical, commit="abc1234", ranks=2):
    return dict(op=op, dtype=dtype, variant=variant, num_sms=sms, physical_gbps=physical, logical_gbps=logical,
                ranks=ranks, gpus=ranks, card="Test GPU", commit=commit, ceiling_one_way_gbps=350.0)


def test_plot_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_record(op, dt, var, sms, 100.0 + sms, 200.0 + sms)
            for op, dt, var in (("dispatch", "fp8", "cached-graph"), ("dispatch", "bf16", "cached-graph"),
                                ("combine", "bf16", "graph"))
            for sms in (8, 16, 24)]
    rows.append(_record("dispatch", "fp8", "cached-graph", 24, 1.0, 1.0, commit="other"))
    results = tmp_path / "intranode.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sweep.png"
    done = subprocess.run([sys.executable, PLOT, "--commit", "abc1234", "--ranks", "2", "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # A commit with no records is an error that says so, not an empty plot.
    done = subprocess.run([sys.executable, PLOT, "--commit", "nothere", "--results", str(results), "--out",
                           str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no records of commit nothere" in done.stderr
    assert not (tmp_path / "none.png").exists()
