"""CI runs scripts/kernel_hashes.py's check: every kernel's cubin (sm_90a and sm_80) matches the recorded sha256 in
tests/data/kernel_hashes.json, so a change meant to move code cannot change a kernel unnoticed. After an intended
cubin change, re-record: python scripts/kernel_hashes.py --record (and say in the commit which kernels changed)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "kernel_hashes.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("epcomm_kernel_hashes_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The script, compiling into the kernel cache test_compile_kernels.py fills in this session (no second compile)."""
    cache = tmp_path_factory.getbasetemp() / "epcomm-kernel-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPCOMM_CACHE_DIR", str(cache))
        mp.setenv("EPCOMM_JIT_QUIET", "1")
        mp.delenv("EPCOMM_JIT_DEBUG", raising=False)
        yield _load_script()


def test_cubins_match_the_recorded_hashes(script):
    result, report = script.check(str(ROOT / "tests" / "data" / "kernel_hashes.json"))
    if result == "skipped":
        pytest.skip(report)
    assert result == "ok", ("cubins differ from tests/data/kernel_hashes.json; if intended, re-record with "
                            "`python scripts/kernel_hashes.py --record` and name the changed kernels in the commit:\n"
                            + report)


def test_compare_reports_each_kind_of_difference(script):
    entry = {"kernel": "k<>", "entry": "k", "arch": "sm_80", "nvrtc": "13.0", "nvshmem": "", "sha256": "a"}
    recorded = [entry, dict(entry, kernel="gone<>"), dict(entry, kernel="same<>")]
    current = [dict(entry, sha256="b"), dict(entry, kernel="added<>"), dict(entry, kernel="same<>")]
    rows, skipped = script.compare(recorded, current)
    assert not skipped
    assert sorted(rows) == sorted([("changed", "k<>", "sm_80"), ("missing", "gone<>", "sm_80"),
                                   ("new", "added<>", "sm_80"), ("identical", "same<>", "sm_80")])
    rows, skipped = script.compare(recorded, [dict(e, nvrtc="13.1") for e in current])
    assert rows == [] and "NVRTC" in skipped[0]
