"""NVRTC-compile every registered kernel (all_example_specs) for Hopper and Ampere: no GPU needed."""
from __future__ import annotations

import collections

import pytest

from epcomm.runtime import ELF_MAGIC, all_example_specs, compile_to_cubin

ARCHS = ("sm_90a", "sm_80")
SPECS = all_example_specs()


def _ids(specs):
    names = [s.describe().replace(" ", "") for s in specs]
    counts, seen = collections.Counter(names), collections.Counter()
    ids = []
    for name in names:
        seen[name] += 1
        ids.append(name if counts[name] == 1 else f"{name}#{seen[name]}")
    return ids


def session_kernel_cache(tmp_path_factory):
    """An empty kernel cache per pytest session, shared with tests/test_kernel_hashes.py (same folder name there), so
    that the hash check reads the cubins compiled here instead of compiling them again."""
    path = tmp_path_factory.getbasetemp() / "epcomm-kernel-cache"
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def fresh_cache(tmp_path_factory):
    """Compile for real: a kernel cache that starts empty in this session, and no progress lines."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EPCOMM_CACHE_DIR", session_kernel_cache(tmp_path_factory))
        mp.setenv("EPCOMM_JIT_QUIET", "1")
        mp.delenv("EPCOMM_JIT_DEBUG", raising=False)
        yield


def test_registry_is_not_empty():
    entries = {s.entry_name for s in SPECS}
    assert {"epcomm_probe_write_peer", "epcomm_probe_nvshmem_put_ring"} <= entries, entries


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids(SPECS))
def test_compiles(spec, arch):
    cubin = compile_to_cubin(spec, arch)
    assert isinstance(cubin, bytes) and cubin.startswith(ELF_MAGIC)
    assert spec.entry_name.encode() in cubin  # the extern "C" entry is in the symbol table, unmangled
