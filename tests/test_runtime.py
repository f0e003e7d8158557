"""The kernel runtime without a GPU: stubs, options, the disk cache and its key, compile errors, argument conversion,
the phase / error-record mirrors of cuda_src, and bounded host waits."""
from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import re
import shutil
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from epcomm.config import ENV_VARS
from epcomm.errors import CommTimeoutError, CompileError, ConfigError
from epcomm.runtime import (ELF_MAGIC, ERROR_RECORD_DTYPE, PHASE_NAMES, KernelSpec, all_example_specs,
                            arch_from_compute_capability, cache_key, compile_options, compile_to_cubin,
                            cuda_src_dir, decode_error, host_wait, normalize_grid, nvshmem_version, timeout_ns)
from epcomm.runtime import compiler, diagnostics, registry, watchdog

WRITE_PEER = KernelSpec(family="probe", op="write_peer", template_args=(("kNumThreads", 256),),
                        params=(("int*", "dst"), ("int", "value"), ("long long", "n")), num_threads=256)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A fresh kernel cache per test, quiet compiles, and no per-process caches leaking between tests."""
    monkeypatch.setenv("EPCOMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EPCOMM_JIT_QUIET", "1")
    monkeypatch.delenv("EPCOMM_JIT_DEBUG", raising=False)
    compiler.clear_caches()
    yield
    compiler.clear_caches()


@pytest.fixture
def cuda_src_copy(tmp_path, monkeypatch):
    """A private copy of cuda_src that the runtime uses instead of the real one."""
    root = tmp_path / "cuda_src"
    shutil.copytree(cuda_src_dir(), root)
    monkeypatch.setattr(compiler, "cuda_src_dir", lambda: str(root))
    compiler.clear_caches()
    return root


def _kernel_files(cache: str) -> list[str]:
    folder = os.path.join(cache, "kernels")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ---------------------------------------------------------------- specs and stubs


def test_stub_text_shape():
    assert WRITE_PEER.entry_name == "epcomm_probe_write_peer"
    assert WRITE_PEER.stub_source() == (
        "// epcomm stub: family=probe op=write_peer kNumThreads=256\n"
        '#include "epcomm/probe.cuh"\n'
        'extern "C" __global__ void __launch_bounds__(256, 1) '
        "epcomm_probe_write_peer(int* dst, int value, long long n) {\n"
        "    epcomm::probe::write_peer<256>(dst, value, n);\n"
        "}\n")


def test_template_args_in_order_with_bools():
    spec = KernelSpec(family="fam", op="op", template_args=(("kA", 7), ("kUseFp8", True), ("kB", False)),
                      params=(("float*", "x"),), num_threads=64, min_blocks_per_sm=2)
    assert spec.template_args_text() == "7, true, false"
    stub = spec.stub_source()
    assert "__launch_bounds__(64, 2)" in stub
    assert "epcomm::fam::op<7, true, false>(x);" in stub
    no_targs = KernelSpec(family="fam", op="op", params=(("int", "n"),))
    assert "epcomm::fam::op(n);" in no_targs.stub_source()


@pytest.mark.parametrize("bad", [
    dict(family="Probe", op="x"),
    dict(family="probe", op="x", params=(("double", "d"),)),
    dict(family="probe", op="x", params=(("int", "n"), ("int", "n"))),
    dict(family="probe", op="x", template_args=(("kX", 1.5),)),
    dict(family="probe", op="x", num_threads=2048),
    dict(family="probe", op="x", smem_bytes=-1),
])
def test_spec_validation(bad):
    with pytest.raises(ConfigError):
        KernelSpec(**bad)


def test_spec_is_hashable_and_normalised():
    a = KernelSpec(family="probe", op="x", template_args=[["kN", 2]], params=[["int", "n"]])
    b = KernelSpec(family="probe", op="x", template_args=(("kN", 2),), params=(("int", "n"),))
    assert a == b and hash(a) == hash(b)


# ---------------------------------------------------------------- defines (diagnostics switches)


def test_defines_are_validated_sorted_and_described():
    spec = KernelSpec(family="probe", op="write_peer", template_args=(("kNumThreads", 256),),
                      defines=(("EPCOMM_DEBUG_TRACE", 1), ("EPCOMM_DEBUG_SEND_ROLES", 3)))
    assert spec.defines == (("EPCOMM_DEBUG_SEND_ROLES", 3), ("EPCOMM_DEBUG_TRACE", 1))
    assert spec.describe() == ("epcomm_probe_write_peer<kNumThreads=256>"
                               "[EPCOMM_DEBUG_SEND_ROLES=3, EPCOMM_DEBUG_TRACE=1]")
    assert spec.stub_source() == dataclasses.replace(spec, defines=()).stub_source()  # the stub never changes
    for bad in ((("lower", 1),), (("EPCOMM_X", True),), (("EPCOMM_X", "1"),), (("EPCOMM_X", 1), ("EPCOMM_X", 2))):
        with pytest.raises(ConfigError, match="defines"):
            KernelSpec(family="probe", op="x", defines=bad)


def test_defines_become_options_and_change_the_cache_key():
    plain = compile_options(WRITE_PEER, "sm_90a")
    traced = dataclasses.replace(WRITE_PEER, defines=(("EPCOMM_DEBUG_TRACE", 1),))
    assert compile_options(traced, "sm_90a") == plain + ["-DEPCOMM_DEBUG_TRACE=1"]
    assert not any(o.startswith("-DEPCOMM_DEBUG") for o in plain)
    assert cache_key(traced, "sm_90a") != cache_key(WRITE_PEER, "sm_90a")


def test_diagnostics_defines_follow_the_environment(monkeypatch):
    for name in ("EPCOMM_DEBUG_TRACE", "EPCOMM_DEBUG_SEND_ROLES", "EPCOMM_DEBUG_LL_COMBINE_SKIP"):
        monkeypatch.delenv(name, raising=False)
        assert name in ENV_VARS
    assert diagnostics.defines("intranode") == () and diagnostics.defines("low_latency") == ()
    monkeypatch.setenv("EPCOMM_DEBUG_TRACE", "1")
    monkeypatch.setenv("EPCOMM_DEBUG_SEND_ROLES", "7")  # its normal value: no define
    monkeypatch.setenv("EPCOMM_DEBUG_LL_COMBINE_SKIP", "0x6")
    assert diagnostics.defines("intranode") == (("EPCOMM_DEBUG_TRACE", 1),)
    assert diagnostics.defines("low_latency") == (("EPCOMM_DEBUG_LL_COMBINE_SKIP", 6),)
    assert diagnostics.defines("layout") == ()
    monkeypatch.setenv("EPCOMM_DEBUG_SEND_ROLES", "8")
    with pytest.raises(ConfigError, match="EPCOMM_DEBUG_SEND_ROLES"):
        diagnostics.defines("intranode")


def test_spec_functions_keep_only_the_switches_their_kernel_reads():
    from epcomm import intranode, low_latency
    family = (("EPCOMM_DEBUG_SEND_ROLES", 3), ("EPCOMM_DEBUG_TRACE", 1))
    assert intranode.dispatch_send_spec(2, defines=family).defines == family
    assert intranode.dispatch_recv_spec(2, defines=family).defines == (("EPCOMM_DEBUG_TRACE", 1),)
    assert intranode.dispatch_recv_spec(2, defines=()) == intranode.dispatch_recv_spec(2)
    assert low_latency.combine_send_spec(defines=(("EPCOMM_DEBUG_LL_COMBINE_SKIP", 1),)).defines == \
        (("EPCOMM_DEBUG_LL_COMBINE_SKIP", 1),)
    with pytest.raises(ConfigError, match="unknown diagnostics switch"):
        intranode.combine_stage_spec(2, defines=(("EPCOMM_DEBUG_NOPE", 1),))
    # Every switch names kernels that exist and an environment variable that is declared.
    ops = {(s.family, s.op) for s in all_example_specs()}
    for switch in diagnostics.SWITCHES:
        assert switch.name in ENV_VARS and set(switch.kernels) <= ops
        assert ENV_VARS[switch.name].default == switch.off


def test_trace_marks_exist_only_with_the_switch(cuda_src_copy):
    (cuda_src_copy / "epcomm" / "tracecheck.cuh").write_text(
        '#pragma once\n#include "epcomm/trace.cuh"\nnamespace epcomm::tracecheck {\n'
        "template <int kN> __device__ void run() { trace::mark(trace::kStart); trace::stamp(trace::kRowsDone); }\n}\n")
    spec = KernelSpec(family="tracecheck", op="run", template_args=(("kN", 1),))
    assert diagnostics.TRACE_SYMBOL.encode() not in compile_to_cubin(spec, "sm_90a")
    traced = dataclasses.replace(spec, defines=(("EPCOMM_DEBUG_TRACE", 1),))
    assert diagnostics.TRACE_SYMBOL.encode() in compile_to_cubin(traced, "sm_90a")


def test_read_marks_refuses_a_kernel_without_the_switch():
    with pytest.raises(ConfigError, match="EPCOMM_DEBUG_TRACE"):
        diagnostics.read_marks(SimpleNamespace(spec=WRITE_PEER, module=None))


# ---------------------------------------------------------------- argument conversion


def test_convert_args_types():
    spec = KernelSpec(family="probe", op="conv", params=(
        ("const int*", "a"), ("uint64_t*", "b"), ("void*", "c"), ("int", "i"), ("unsigned", "u"),
        ("long long", "ll"), ("int64_t", "i64"), ("uint64_t", "u64"), ("float", "f"), ("int32_t", "i32"),
        ("uint32_t", "u32")))
    fake_cupy_array = SimpleNamespace(data=SimpleNamespace(ptr=0x7F0000001000))
    # Named, in any order: the result follows the parameter order.
    out = spec.convert_args(dict(u32=9, i32=3, f=1.5, u64=2**63, i64=-(2**40), ll=2**40, u=7, i=-5, c=None,
                                 b=0x1234, a=fake_cupy_array))
    expected = [(np.uint64, 0x7F0000001000), (np.uint64, 0x1234), (np.uint64, 0), (np.int32, -5), (np.uint32, 7),
                (np.int64, 2**40), (np.int64, -(2**40)), (np.uint64, 2**63), (np.float32, 1.5), (np.int32, 3),
                (np.uint32, 9)]
    assert [type(v) for v in out] == [t for t, _ in expected]
    assert [v.item() for v in out] == [v for _, v in expected]
    assert spec.param_names == ("a", "b", "c", "i", "u", "ll", "i64", "u64", "f", "i32", "u32")


def test_convert_args_errors():
    with pytest.raises(TypeError, match=r"epcomm_probe_write_peer: .*missing n\b"):
        WRITE_PEER.convert_args(dict(dst=0, value=1))
    with pytest.raises(TypeError, match=r"unknown count"):
        WRITE_PEER.convert_args(dict(dst=0, value=1, n=2, count=3))
    with pytest.raises(TypeError, match=r"missing n; unknown num"):
        WRITE_PEER.convert_args(dict(dst=0, value=1, num=2))  # a misspelt name: both sides named
    with pytest.raises(TypeError, match="expected a mapping"):
        WRITE_PEER.convert_args((0, 1, 2))  # positional tuples are no longer accepted
    with pytest.raises(TypeError, match="'value'"):
        WRITE_PEER.convert_args(dict(dst=0, value=1.5, n=2))  # a float for an int
    with pytest.raises(TypeError, match="'dst'"):
        WRITE_PEER.convert_args(dict(dst=np.zeros(4, np.int32), value=1, n=2))  # host memory is not a device pointer
    with pytest.raises(ConfigError, match="'value'"):
        WRITE_PEER.convert_args(dict(dst=0, value=2**31, n=2))  # does not fit int32


def test_normalize_grid():
    assert normalize_grid(3) == (3, 1, 1)
    assert normalize_grid((2, 4)) == (2, 4, 1)
    for bad in (0, (1, 0), (1, 1, 1, 1), 2.0, (True,)):
        with pytest.raises(ConfigError):
            normalize_grid(bad)


# ---------------------------------------------------------------- locations and options


def test_locations_and_versions():
    assert os.path.isfile(os.path.join(cuda_src_dir(), "epcomm", "common.cuh"))
    dirs = compiler.cuda_include_dirs()
    assert dirs and all(os.path.isdir(d) for d in dirs)
    assert re.fullmatch(r"\d+\.\d+\.\d+", nvshmem_version())
    assert re.fullmatch(r"\d+\.\d+", compiler.nvrtc_version())


def test_arch_from_compute_capability():
    assert arch_from_compute_capability("90") == "sm_90a"
    assert arch_from_compute_capability((9, 0)) == "sm_90a"
    assert arch_from_compute_capability(80) == "sm_80"
    assert arch_from_compute_capability("100") == "sm_100"
    with pytest.raises(ValueError):
        compile_options(WRITE_PEER, "compute_90")


def test_options_plain_vs_nvshmem(monkeypatch):
    plain = compile_options(WRITE_PEER, "sm_90a")
    assert plain[:2] == ["-std=c++17", "-arch=sm_90a"] and "-DNDEBUG" in plain
    assert not any("nvshmem" in o.lower() for o in plain)  # non-NVSHMEM kernels never see NVSHMEM headers
    nv = compile_options(KernelSpec(family="probe", op="x", uses_nvshmem=True), "sm_90a")
    for opt in ("-default-device", "-D__NVSHMEM_NUMBA_SUPPORT__", "-DEPCOMM_NVSHMEM=1"):
        assert opt in nv
    nvshmem_include = f"-I{compiler.nvshmem_include_dir()}"
    shadow_opts = [o for o in nv if "nvshmem-shadow" in o]
    if shadow_opts:  # the stock build options of this NVSHMEM need the shadow: first on the include path
        assert nv.index(shadow_opts[0]) < nv.index(nvshmem_include) < nv.index(f"-I{cuda_src_dir()}")
        shadow = os.path.join(shadow_opts[0][2:], "non_abi", "nvshmem_build_options.h")
        text = open(shadow).read()
        assert "#undef NVSHMEM_IBGDA_SUPPORT" in text and "#define NVSHMEM_ENABLE_ALL_DEVICE_INLINING" in text
    monkeypatch.setenv("EPCOMM_JIT_DEBUG", "1")
    debug = compile_options(WRITE_PEER, "sm_90a")
    assert "-lineinfo" in debug and "-DNDEBUG" not in debug


def test_top_level_defines_ignores_conditional_blocks():
    text = ("#define A\n/* #undef B */\n#if defined X\n#define C\n#endif\n#define D 1\n")
    assert compiler._top_level_defines(text) == {"A", "D"}


# ---------------------------------------------------------------- cache key and disk cache


def test_cache_key_changes_with_headers(cuda_src_copy):
    key = cache_key(WRITE_PEER, "sm_90a")
    assert key == cache_key(WRITE_PEER, "sm_90a")
    header = cuda_src_copy / "epcomm" / "ptx.cuh"  # not even the family header: every file counts
    original = header.read_text()
    header.write_text(original + "\n// touched\n")
    compiler.clear_caches()  # the tree hash is computed once per process
    assert cache_key(WRITE_PEER, "sm_90a") != key
    header.write_text(original)
    compiler.clear_caches()
    assert cache_key(WRITE_PEER, "sm_90a") == key
    (cuda_src_copy / "epcomm" / "new_file.cuh").write_text("// new\n")
    compiler.clear_caches()
    assert cache_key(WRITE_PEER, "sm_90a") != key


def test_cache_key_changes_with_options_arch_and_spec(monkeypatch):
    key = cache_key(WRITE_PEER, "sm_90a")
    options = compile_options(WRITE_PEER, "sm_90a")
    assert cache_key(WRITE_PEER, "sm_90a", options + ["-DEXTRA=1"]) != key
    assert cache_key(WRITE_PEER, "sm_80") != key
    monkeypatch.setenv("EPCOMM_JIT_DEBUG", "1")
    assert cache_key(WRITE_PEER, "sm_90a") != key
    monkeypatch.delenv("EPCOMM_JIT_DEBUG")
    other = KernelSpec(family="probe", op="write_peer", template_args=(("kNumThreads", 128),),
                       params=WRITE_PEER.params, num_threads=128)
    assert cache_key(other, "sm_90a") != key


def test_second_compile_is_a_cache_hit(monkeypatch, capsys):
    monkeypatch.setenv("EPCOMM_JIT_QUIET", "0")
    first = compile_to_cubin(WRITE_PEER, "sm_90a")
    assert first.startswith(ELF_MAGIC)
    err = capsys.readouterr().err
    assert re.search(r"epcomm: compiling epcomm_probe_write_peer \(sm_90a\) \.\.\. \d+\.\d s\n", err), err

    def no_nvrtc(*args, **kwargs):
        raise AssertionError("NVRTC called on a cache hit")

    monkeypatch.setattr(compiler, "_nvrtc_compile", no_nvrtc)
    assert compile_to_cubin(WRITE_PEER, "sm_90a") == first
    assert capsys.readouterr().err == ""  # no progress line on a hit
    assert len(_kernel_files(compiler.cache_dir())) == 1


def test_debug_keeps_stub_beside_cubin(monkeypatch):
    monkeypatch.setenv("EPCOMM_JIT_DEBUG", "1")
    compile_to_cubin(WRITE_PEER, "sm_80")
    files = _kernel_files(compiler.cache_dir())
    stubs = [f for f in files if f.endswith(".cu")]
    assert len(stubs) == 1 and [f for f in files if f.endswith(".cubin")]
    with open(os.path.join(compiler.cache_dir(), "kernels", stubs[0])) as f:
        assert f.read() == WRITE_PEER.stub_source()


def _compile_in_child(barrier, queue):
    barrier.wait()  # start both compiles at once
    try:
        cubin = compile_to_cubin(WRITE_PEER, "sm_90a")
        queue.put(("ok", hashlib.sha256(cubin).hexdigest(), cubin.startswith(ELF_MAGIC)))
    except BaseException as exc:  # report, never hang the parent
        queue.put(("error", repr(exc), False))


def test_concurrent_compiles_share_one_cache_file():
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_compile_in_child, args=(barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" and r[2] for r in results), results
    assert results[0][1] == results[1][1]
    files = _kernel_files(compiler.cache_dir())
    assert len(files) == 1 and files[0].endswith(".cubin"), files  # no temp files left behind
    with open(os.path.join(compiler.cache_dir(), "kernels", files[0]), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == results[0][1]


def test_corrupt_cache_file_is_recompiled():
    good = compile_to_cubin(WRITE_PEER, "sm_90a")
    (name,) = _kernel_files(compiler.cache_dir())
    path = os.path.join(compiler.cache_dir(), "kernels", name)
    with open(path, "wb") as f:
        f.write(b"garbage")
    assert compile_to_cubin(WRITE_PEER, "sm_90a") == good


# ---------------------------------------------------------------- compile errors


def test_compile_error_has_log_options_and_numbered_source(cuda_src_copy):
    (cuda_src_copy / "epcomm" / "broken.cuh").write_text(
        '#pragma once\n#include "epcomm/common.cuh"\nnamespace epcomm::broken {\n'
        "template <int kN> __device__ void oops(int* p) { p[0] = kN }\n}\n")
    spec = KernelSpec(family="broken", op="oops", template_args=(("kN", 3),), params=(("int*", "p"),))
    with pytest.raises(CompileError) as info:
        compile_to_cubin(spec, "sm_90a")
    err = info.value
    message = str(err)
    assert "broken.cuh" in message and 'expected a ";"' in message  # NVRTC's own words
    assert "-arch=sm_90a" in message and "-std=c++17" in message
    assert err.log and 'expected a ";"' in err.log
    assert err.source_path and os.path.isfile(err.source_path) and err.source_path in message
    assert os.path.dirname(err.source_path) == os.path.join(compiler.cache_dir(), "failed")
    lines = open(err.source_path).read().splitlines()
    assert lines[0] == "   1  // epcomm stub: family=broken op=oops kN=3"
    assert lines[1] == '   2  #include "epcomm/broken.cuh"'
    assert not _kernel_files(compiler.cache_dir())  # nothing cached


def test_nvshmem_header_refuses_plain_specs(cuda_src_copy):
    (cuda_src_copy / "epcomm" / "sneaky.cuh").write_text(
        '#pragma once\n#include "epcomm/nvshmem.cuh"\nnamespace epcomm::sneaky {\n'
        "__device__ void run() {}\n}\n")
    with pytest.raises(CompileError, match="uses_nvshmem=True"):
        compile_to_cubin(KernelSpec(family="sneaky", op="run"), "sm_90a")


@pytest.mark.slow
def test_nvshmem_collectives_opt_in_and_every_wrapper_compile(cuda_src_copy):
    """The full NVSHMEM headers (device collectives), which a family opts into, still compile with the work-arounds;
    every nvshmem.cuh wrapper is emitted."""
    (cuda_src_copy / "epcomm" / "collcheck.cuh").write_text("""#pragma once
#define EPCOMM_NVSHMEM_COLLECTIVES
#include "epcomm/nvshmem.cuh"
namespace epcomm::collcheck {
__device__ void run(int* sym, uint64_t* sig) {
    using namespace epcomm::nvshmem;
    const int pe = (my_pe() + 1) % n_pes();
    put_nbi_warp(sym, sym + 32, 128, pe);
    put_signal_nbi_warp(sym, sym + 32, 128, sig, 1, SignalOp::kAdd, pe);
    signal_op(sig, 2, SignalOp::kSet, pe);
    fence();
    quiet();
    nvshmem_barrier_all();
    if (peer_ptr(sym, pe) != nullptr) sym[0] = 1;
}
}
""")
    spec = KernelSpec(family="collcheck", op="run", params=(("int*", "sym"), ("uint64_t*", "sig")), num_threads=32,
                      uses_nvshmem=True)
    assert compile_to_cubin(spec, "sm_90a").startswith(ELF_MAGIC)


# Calls every helper of ptx.cuh, common.cuh and comm.cuh: inline PTX is only assembled (checked) where it is emitted.
HELPER_CHECK = """#pragma once
#include "epcomm/comm.cuh"
namespace epcomm::helpercheck {
__device__ void run(uint64_t* u64, uint32_t* u32, int32_t* s32, int64_t* s64, int4* v4, float* f,
                    uint64_t err_record, long long timeout_ns, int rank) {
    const comm::Waiter w(err_record, timeout_ns, rank);
    uint64_t acc = ld_acquire_sys_u64(u64) + ld_acquire_sys_u32(u32) + ld_acquire_sys_s32(s32);
    acc += ld_acquire_gpu_u64(u64) + ld_acquire_gpu_u32(u32) + ld_acquire_gpu_s32(s32);
    acc += ld_relaxed_sys_u64(u64) + ld_relaxed_sys_u32(u32) + ld_relaxed_sys_s32(s32) + ld_relaxed_gpu_s32(s32);
    st_release_sys_u64(u64 + 1, acc); st_release_sys_u32(u32 + 1, 1u); st_release_sys_s32(s32 + 1, 2);
    st_release_gpu_u64(u64 + 2, acc); st_release_gpu_s32(s32 + 2, 3);
    st_relaxed_sys_u64(u64 + 3, acc); st_relaxed_sys_u32(u32 + 3, 4u); st_relaxed_sys_s32(s32 + 3, 5);
    st_relaxed_sys_s64(s64, 6); st_relaxed_gpu_s32(s32 + 11, 7);
    acc += atomic_add_release_sys_u64(u64 + 4, 1) + atomic_add_release_sys_s32(s32 + 4, 1);
    acc += atomic_add_release_gpu_s32(s32 + 5, 1) + atomic_add_relaxed_gpu_s32(s32 + 6, 1);
    acc += atomic_cas_acq_rel_gpu_s32(s32 + 7, 0, 1);
    fence_acq_rel_sys(); fence_acq_rel_gpu(); fence_acq_rel_cta(); fence_sc_sys();
    int4 v = ld_global_v4(v4);
    const int4 nc = ld_global_nc_na_v4(v4 + 1);
    v.x += nc.x;
    st_global_v4(v4 + 2, v); st_global_na_v4(v4 + 3, v);
    acc += globaltimer_ns() + lane_id() + warp_id() + ceil_div(7, 2) + align_up(7, 4);
    f[0] = warp_reduce_sum(f[1]) + warp_reduce_max(f[2]) + warp_reduce_sum(static_cast<int>(acc));
    bool ok = comm::wait_geq(u64 + 5, acc, w, 0, phase::kProbe) && comm::wait_geq(s32 + 8, 1, w, 0, phase::kProbe);
    ok = ok && comm::wait_eq(u64 + 6, 1, w, 1, phase::kBarrier) && comm::wait_eq(s32 + 9, 1, w, 1, phase::kBarrier);
    ok = ok && comm::wait_ne(u64 + 7, 0, w, 1, phase::kNotify) && comm::wait_ne(s32 + 10, 0, w, 1, phase::kNotify);
    if (!comm::block_all_ok(ok) || comm::has_error(w) || comm::block_has_error(w) || comm::block_failed(ok, w)) return;
    if (comm::last_block_out<true>(s32 + 12) && comm::last_block_out<false>(s32 + 13)) s32[14] = 1;
    comm::record_error(w, comm::kErrCapacity, 1, phase::kDispatch, 10, 8);
}
}
"""


def test_every_device_helper_assembles(cuda_src_copy):
    text = "".join(open(os.path.join(cuda_src_dir(), "epcomm", name)).read()
                   for name in ("ptx.cuh", "common.cuh", "comm.cuh"))
    public = set(re.findall(r"EPCOMM_(?:HOST_)?DEVICE_INLINE\s+(?:constexpr\s+)?[\w:]+\*?\s+(\w+)\(", text))
    public -= {"load_acquire", "satisfied", "wait_until"}  # comm::detail
    missing = sorted(name for name in public if not re.search(rf"\b{name}(<[^>]*>)?\(", HELPER_CHECK))
    assert not missing, f"add these helpers to HELPER_CHECK: {missing}"
    (cuda_src_copy / "epcomm" / "helpercheck.cuh").write_text(HELPER_CHECK)
    spec = KernelSpec(family="helpercheck", op="run", num_threads=128, params=(
        ("uint64_t*", "u64"), ("uint32_t*", "u32"), ("int32_t*", "s32"), ("int64_t*", "s64"), ("int4*", "v4"),
        ("float*", "f"), ("uint64_t", "err_record"), ("long long", "timeout_ns"), ("int", "rank")))
    for arch in ("sm_90a", "sm_80"):
        assert compile_to_cubin(spec, arch).startswith(ELF_MAGIC)


def test_every_header_compiles_on_its_own(cuda_src_copy):
    """Each header includes what it uses: compiled first and alone (PTX only, to keep it quick)."""
    options = [("-arch=compute_90" if o.startswith("-arch=") else o) for o in compile_options(WRITE_PEER, "sm_90a")]
    headers = sorted(name for name in os.listdir(cuda_src_copy / "epcomm") if name.endswith(".cuh"))
    assert {"rows.cuh", "scan.cuh", "dealing.cuh", "trace.cuh", "layout.cuh"} <= set(headers)
    for name in headers:
        if name == "nvshmem.cuh":  # refuses plain compiles on purpose (test_nvshmem_header_refuses_plain_specs)
            continue
        source = f'#include "epcomm/{name}"\n__global__ void epcomm_alone() {{}}\n'
        ptx, log = compiler._nvrtc_compile(source, f"alone_{name}.cu", options, ptx=True)
        assert ptx is not None, f"{name} does not compile on its own:\n{log}"


# ---------------------------------------------------------------- registry


def test_registry_skips_missing_family_modules_only(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "KNOWN_FAMILY_MODULES", ("epcomm.probe", "epcomm.no_such_family_yet"))
    entries = [s.entry_name for s in all_example_specs()]
    assert "epcomm_probe_write_peer" in entries and len(entries) == len(set(s for s in all_example_specs()))
    (tmp_path / "epcomm_broken_family.py").write_text("import epcomm_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "KNOWN_FAMILY_MODULES", ("epcomm_broken_family",))
    with pytest.raises(ModuleNotFoundError, match="epcomm_missing_dependency_xyz"):
        all_example_specs()


def test_register_family(monkeypatch):
    monkeypatch.setattr(registry, "_families", {})
    monkeypatch.setattr(registry, "KNOWN_FAMILY_MODULES", ())
    registry.register_family("demo", lambda: [WRITE_PEER, WRITE_PEER])
    assert all_example_specs() == [WRITE_PEER]
    registry.register_family("bad", lambda: ["not a spec"])
    with pytest.raises(TypeError, match="bad"):
        all_example_specs()


# ---------------------------------------------------------------- mirrors of cuda_src (parity)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def test_phase_ids_match_phases_cuh():
    text = open(os.path.join(cuda_src_dir(), "epcomm", "phases.cuh")).read()
    parsed = {int(v): _snake(k) for k, v in re.findall(r"constexpr\s+int\s+k(\w+)\s*=\s*(\d+)\s*;", text)}
    assert len(parsed) == len(re.findall(r"^constexpr", text, re.M))  # every constant parsed, ids unique
    assert parsed == PHASE_NAMES


def test_mark_names_match_trace_cuh():
    text = open(os.path.join(cuda_src_dir(), "epcomm", "trace.cuh")).read()
    body = re.search(r"enum\s+Mark\s*:\s*int\s*\{(.*?)\};", text, re.S).group(1)
    parsed = [(int(v), _snake(k)) for k, v in re.findall(r"^\s*k(\w+)\s*=\s*(\d+)\s*,", body, re.M)]
    assert parsed[-1] == (len(diagnostics.MARK_NAMES), "num_marks")
    assert [i for i, _ in parsed] == list(range(len(parsed)))  # ids in order, each once
    assert tuple(name for _, name in parsed[:-1]) == diagnostics.MARK_NAMES


def _ptx_global_bytes(ptx: str, name: str, size: int) -> bytes:
    m = re.search(rf"\.global\s+\.align\s+\d+\s+\.b8\s+{name}\[(\d+)\]\s*=\s*\{{([^}}]*)\}}", ptx)
    assert m, f"{name} not found in the PTX"
    values = [int(v) for v in m.group(2).split(",")]
    assert int(m.group(1)) == size
    return bytes(values + [0] * (size - len(values)))


def test_error_record_layout_matches_comm_cuh():
    """Compile comm.cuh with every field's offsetof in a __device__ array and read it back from the PTX."""
    fields = ERROR_RECORD_DTYPE.names
    entries = ", ".join(["sizeof(R)"] + [f"offsetof(R, {f})" for f in fields])
    source = ('#include "epcomm/comm.cuh"\n#include <cuda/std/cstddef>\nusing R = epcomm::comm::ErrorRecord;\n'
              f"__device__ const unsigned long long epcomm_layout[] = {{{entries}}};\n")
    options = [("-arch=compute_90" if o.startswith("-arch=") else o) for o in compile_options(WRITE_PEER, "sm_90a")]
    ptx, log = compiler._nvrtc_compile(source, "layout_check.cu", options, ptx=True)
    assert ptx is not None, log
    raw = _ptx_global_bytes(ptx.decode(), "epcomm_layout", 8 * (1 + len(fields)))
    values = np.frombuffer(raw, dtype="<u8").tolist()
    device = {"sizeof": values[0], **dict(zip(fields, values[1:]))}
    host = {"sizeof": ERROR_RECORD_DTYPE.itemsize, **{f: ERROR_RECORD_DTYPE.fields[f][1] for f in fields}}
    assert device == host
    for f in fields:  # same widths too
        assert ERROR_RECORD_DTYPE.fields[f][0].itemsize in (4, 8)


def test_error_codes_match_comm_cuh():
    text = open(os.path.join(cuda_src_dir(), "epcomm", "comm.cuh")).read()
    codes = {_snake(k).upper(): int(v) for k, v in re.findall(r"constexpr\s+int32_t\s+kErr(\w+)\s*=\s*(\d+)", text)}
    assert codes == {"NONE": watchdog.ERR_NONE, "WRITING": watchdog.ERR_WRITING, "TIMEOUT": watchdog.ERR_TIMEOUT,
                     "CAPACITY": watchdog.ERR_CAPACITY}
    cmps = {int(v): k for k, v in re.findall(r"constexpr\s+int32_t\s+kCmp(\w+)\s*=\s*(\d+)", text)}
    assert cmps == {0: "Geq", 1: "Eq", 2: "Ne"} and set(watchdog.CMP_TEXT) == set(cmps)


# ---------------------------------------------------------------- error records and bounded host waits


def _record(**fields) -> np.ndarray:
    rec = np.zeros(1, dtype=ERROR_RECORD_DTYPE)
    for k, v in fields.items():
        rec[k] = v
    return rec


def test_decode_error_timeout_and_capacity():
    assert decode_error(_record()) is None
    err = decode_error(_record(code=watchdog.ERR_TIMEOUT, rank=1, peer=0, phase=1, cmp=0, observed=3, expected=4,
                               waited_ns=20_000_000_000, block_idx=5, thread_idx=2), "intranode dispatch")
    assert isinstance(err, CommTimeoutError)
    text = str(err)
    assert "rank 1 waited for rank 0 during phase 'notify': observed 3, expected >= 4, after 20.0 s" in text
    assert "intranode dispatch" in text and "block 5" in text
    assert (err.rank, err.peer, err.phase, err.observed, err.expected) == (1, 0, "notify", 3, 4)
    cap = decode_error(_record(code=watchdog.ERR_CAPACITY, rank=0, peer=1, phase=2, observed=9000, expected=8192))
    assert isinstance(cap, ConfigError) and "9000" in str(cap) and "8192" in str(cap)


def test_timeout_ns_from_env(monkeypatch):
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "2.5")
    assert timeout_ns() == 2_500_000_000
    monkeypatch.setenv("EPCOMM_TIMEOUT_S", "0")
    with pytest.raises(ConfigError, match="EPCOMM_TIMEOUT_S"):
        timeout_ns()


def test_host_wait_times_out_with_rank_peer_phase():
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as info:
        host_wait(lambda: False, "the receive count", 0.05, rank=1, peer=0, phase="notify")
    assert time.monotonic() - start < 2.0
    text = str(info.value)
    assert "rank 1 waited for rank 0" in text and "'notify'" in text and "the receive count" in text
    assert (info.value.rank, info.value.peer, info.value.phase) == (1, 0, "notify")


def test_host_wait_returns_when_ready():
    deadline = time.monotonic() + 0.02
    host_wait(lambda: time.monotonic() > deadline, "a flag", 5.0)


def test_import_is_light():
    """Importing the runtime loads neither CuPy nor NVRTC bindings (they load on first use)."""
    import subprocess
    code = ("import sys, epcomm.runtime, epcomm.probe; "
            "print(any(m == 'cupy' or m.startswith('cuda.bindings') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr
