"""bench/plot.py: the SM-sweep plot drawn from benchmark records (CPU only; matplotlib comes with the test extra)."""
import json
import os
import shutil
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


def test_plot_without_ceiling_and_oversubscribed_records(tmp_path):
    """One rank has no peer (no ceiling: the record says None); records of ranks sharing a GPU are plotted only when
    asked for, and never mixed with the one-GPU-per-rank records of the same commit and rank count."""
    pytest.importorskip("matplotlib")
    rows = [_record("dispatch", "fp8", "cached-graph", sms, 0.0, 100.0 + sms, ranks=1) for sms in (8, 24)]
    for r in rows:
        r.update(gpus=1, ceiling_one_way_gbps=None)
    shared = [_record("combine", "bf16", "graph", sms, 10.0, 20.0) for sms in (8, 24)]
    for r in shared:
        r.update(gpus=1, ceiling_one_way_gbps=None, oversubscribed=True)
    results = tmp_path / "intranode.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows + shared))
    for extra, out in ((["--ranks", "1"], tmp_path / "ep1.png"), (["--oversubscribed"], tmp_path / "shared.png")):
        done = subprocess.run([sys.executable, PLOT, "--commit", "abc1234", *extra, "--results", str(results),
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    done = subprocess.run([sys.executable, PLOT, "--commit", "abc1234", "--results", str(results), "--out",
                           str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "one GPU each" in done.stderr  # EP2 here is only the shared-GPU run


def test_version_series_orders_commits_and_takes_medians():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import plot
    finally:
        sys.path.pop(0)
    rows = []
    for i, (commit, us) in enumerate((("c1", 120.0), ("c2", 100.0), ("c2", 110.0), ("c2", 90.0), ("c3", 95.0))):
        r = _record("dispatch", "fp8", "cached-graph, zero-copy", 24, 1.0, 1.0, commit=commit)
        r.update(median_us=us, timestamp=f"2026-01-01T00:00:0{i}")
        rows.append(r)
    other = _record("dispatch", "fp8", "cached-graph, zero-copy", 16, 1.0, 1.0, commit="c4")  # another SM count
    other.update(median_us=1.0, timestamp="2026-01-01T00:00:09")
    comb = _record("combine", "bf16", "graph, zero-copy", 24, 1.0, 1.0, commit="c3")
    comb.update(median_us=199.0, timestamp="2026-01-01T00:00:08")
    shared = _record("dispatch", "fp8", "cached-graph, zero-copy", 24, 1.0, 1.0, commit="c5")  # 2 ranks on 1 GPU
    shared.update(median_us=5000.0, timestamp="2026-01-01T00:00:10", oversubscribed=True)
    commits, series = plot.version_series(rows + [other, comb, shared])
    assert commits == ["c1", "c2", "c3"]  # not c5: ranks sharing a GPU are not NVLink timings
    assert series[("dispatch", "fp8")] == [120.0, 100.0, 95.0]  # c2: the median of its three runs
    assert series[("combine", "bf16")] == [None, None, 199.0]


def test_versions_plot_from_records(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for i, commit in enumerate(("c1", "c2")):
        for op, dt, var in (("dispatch", "fp8", "cached-graph, zero-copy"), ("combine", "bf16", "graph, zero-copy")):
            r = _record(op, dt, var, 24, 1.0, 1.0, commit=commit)
            r.update(median_us=100.0 - i, timestamp=f"2026-01-01T00:00:0{i}")
            rows.append(r)
    results = tmp_path / "intranode.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "versions.png"
    done = subprocess.run([sys.executable, PLOT, "--versions", "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    done = subprocess.run([sys.executable, PLOT, "--versions", "--ranks", "8", "--results", str(results), "--out",
                           str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no zero-copy records at 8 ranks" in done.stderr


def test_default_out_is_ignored_and_stable():
    """Without --out a plot goes to gpu_out/plots/ (ignored by git, so runs add no files to the tree), under a name
    fixed by what it shows, so drawing it again overwrites it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import plot
    finally:
        sys.path.pop(0)
    sweep = plot.default_out("dee4104", 4, versions=False)
    versions = plot.default_out(None, 2, versions=True)
    assert sweep == os.path.join(ROOT, "gpu_out", "plots", "intranode_sms_ep4_dee4104.png")
    assert versions == os.path.join(ROOT, "gpu_out", "plots", "intranode_versions_ep2.png")
    assert plot.default_out("dee4104", 2, versions=False, oversubscribed=True) == \
        os.path.join(ROOT, "gpu_out", "plots", "intranode_sms_ep2_oversubscribed_dee4104.png")
    if shutil.which("git") is None:
        pytest.skip("git not found")
    ignored = subprocess.run(["git", "check-ignore", "-q", sweep], cwd=ROOT)
    if ignored.returncode == 128:  # not a git checkout (e.g. an unpacked sdist)
        pytest.skip("git check-ignore needs a git checkout")
    assert ignored.returncode == 0, f"{sweep} is not ignored by .gitignore"
