"""bench/: every script compiles, none writes into a Buffer's backend (tuning goes through Buffer.set_tuning, kernel
diagnostics through EPCOMM_DEBUG_* switches set before a Buffer is made), and the shared records mark ranks that
share a GPU (CPU only; the scripts themselves need GPUs)."""
import ast
import os
import py_compile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(BENCH.rglob("*.py"))


def test_bench_layout():
    names = {str(p.relative_to(BENCH)) for p in SCRIPTS}
    assert {"common.py", "plot.py", "bench_intranode.py", "bench_low_latency.py"} <= names
    assert any(n.startswith("experiments" + os.sep) for n in names), "no experiments in bench/experiments/"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_script_compiles(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "x.pyc"), doraise=True)


def _mentions_backend(node) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "_backend" for n in ast.walk(node))


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_no_writes_into_the_backend(path):
    """No `buf._backend.<x> = ...`, nor `ll = buf._backend.low_latency; ll.<x> = ...` (reading is fine)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = set()  # names bound to something reached through _backend
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _mentions_backend(node.value):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    bad = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for sub in ast.walk(t):
                if not isinstance(sub, ast.Attribute) or not isinstance(sub.ctx, ast.Store):
                    continue
                base = sub.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if _mentions_backend(sub.value) or (isinstance(base, ast.Name) and base.id in aliases):
                    bad.append(f"line {node.lineno}: {ast.unparse(sub)} = ...")
    bad = sorted(set(bad), key=lambda line: int(line.split()[1][:-1]))
    assert not bad, f"{path.relative_to(ROOT)} writes into the backend (use Buffer.set_tuning or an EPCOMM_DEBUG_* " \
                    "switch):\n" + "\n".join(bad)


def _common():
    sys.path.insert(0, str(BENCH))
    try:
        import common
    finally:
        sys.path.pop(0)
    return common


def test_records_mark_ranks_that_share_a_gpu():
    common = _common()
    args = ("dispatch", "fp8", 2, 1, 4096, 7168, 8, 256, 24, 100.0, 10**8, 5 * 10**7, "Test GPU")
    shared = common.record(*args)
    assert shared["oversubscribed"] is True and (shared["ranks"], shared["gpus"]) == (2, 1)
    one_each = common.record("dispatch", "fp8", 2, 2, *args[4:])
    assert "oversubscribed" not in one_each
    ep1 = common.record("dispatch", "fp8", 1, 1, *args[4:], ceiling_one_way_gbps=None)
    assert "oversubscribed" not in ep1 and ep1["physical_gbps"] == 500.0 and ep1["ceiling_one_way_gbps"] is None
    for key in ("card", "ranks", "gpus", "commit", "timestamp", "median_us", "logical_gbps", "physical_gbps"):
        assert key in shared
