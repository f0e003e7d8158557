"""The CPU backend: tests/mpi/cpu_api_check.py under mpiexec at 2, 3 and 4 ranks, the demo, and the same API
checks in this process (COMM_WORLD of size 1, no mpiexec) for quick failures."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import epcomm
from epcomm import reference as ref
from epcomm.testing import make_topk, make_weights, make_x

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "tests" / "mpi" / "cpu_api_check.py"
TIMEOUT_S = 120


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _env(**extra) -> dict:
    """A clean environment for mpiexec: this checkout first on PYTHONPATH, the CPU backend, and none of this
    process's own MPI/PMI variables (it may have started MPI as a singleton)."""
    env = {k: v for k, v in os.environ.items() if not re.match(r"(PMI|PMIX|MPI|HYDRA|OMPI)_", k)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["EPCOMM_BACKEND"] = "cpu"
    env.setdefault("EPCOMM_TIMEOUT_S", "20")
    env.update(extra)
    return env


def _run(num_ranks: int, args: list[str], **env) -> subprocess.CompletedProcess:
    mpiexec = _mpiexec()
    if mpiexec is None:
        pytest.skip("mpiexec not found next to the interpreter or on PATH")
    cmd = [mpiexec, "-n", str(num_ranks), sys.executable, *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT_S} s (a hang?)\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


# ---------------------------------------------------------------------------------------------------------------------
# Under mpiexec
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks,env", [
    (2, {}), (3, {}), (4, {}),
    (4, {"EPCOMM_VIRTUAL_NODE_SIZE": "2"}),    # two virtual nodes: num_tokens_per_rdma_rank is not None
], ids=["n2", "n3", "n4", "n4-2nodes"])
def test_cpu_api_check_under_mpiexec(num_ranks, env):
    proc = _run(num_ranks, [str(CHECK)], **env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out}"
    m = re.search(r"^(\d+) passed, (\d+) failed$", proc.stdout, re.M)
    assert m is not None, f"no summary line\n{out}"
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0, out


@pytest.mark.mpi
def test_demo_cpu_four_ranks():
    proc = _run(4, ["-m", "epcomm.demo", "--backend", "cpu"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "all results match the reference" in proc.stdout, out
    assert "MISMATCH" not in proc.stdout, out


TIMEOUT_SCRIPT = """
import numpy as np, epcomm
from epcomm.testing import make_topk, make_x
buf = epcomm.Buffer(None, backend="cpu")
rng = np.random.default_rng(0)
x, idx = make_x(rng, 4, 256, buf.rank), make_topk(rng, 4, 2, 4)
per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
ok = True
if buf.rank == 0:                       # rank 1 never joins this dispatch
    try:
        buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        ok = False
    except epcomm.CommTimeoutError as exc:
        ok = (exc.rank, exc.peer, exc.phase) == (0, 1, "dispatch") and "rank 1" in str(exc)
        print("raised:", exc, flush=True)
    try:                                # and the buffer stays unusable afterwards
        buf.dispatch(x, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        ok = False
    except epcomm.CommTimeoutError as exc:
        ok = ok and "unusable" in str(exc)
ok = all(buf.group.allgather(ok))
buf.destroy()
print("timeout check", "ok" if ok else "FAILED", flush=True)
raise SystemExit(0 if ok else 1)
"""


@pytest.mark.mpi
def test_peer_that_never_arrives_raises_comm_timeout():
    """Section 7: a peer that never arrives is a CommTimeoutError naming rank, peer and phase, not a hang."""
    proc = _run(2, ["-c", TIMEOUT_SCRIPT], EPCOMM_TIMEOUT_S="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "timeout check ok" in proc.stdout, out


# ---------------------------------------------------------------------------------------------------------------------
# In this process: a group of one rank
# ---------------------------------------------------------------------------------------------------------------------

def _load_check():
    spec = importlib.util.spec_from_file_location("cpu_api_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = _load_check()


@pytest.fixture(scope="module")
def buf():
    b = epcomm.Buffer(None, backend="cpu")
    yield b
    b.destroy()


@pytest.mark.parametrize("name", [name for name, _ in check.CASES])
def test_api_case_single_rank(buf, name):
    fn = dict(check.CASES)[name]
    check.FAILURES.clear()
    fn(buf, np.random.default_rng(7))
    assert not check.FAILURES, "\n".join(check.FAILURES)


def test_buffer_basics(buf):
    assert buf.backend == "cpu" and buf.rank == 0 and buf.num_ranks == 1
    assert isinstance(buf.group, epcomm.Group) and buf.group.num_nodes == 1
    assert isinstance(epcomm.Buffer.get_dispatch_config(1), epcomm.Config)
    assert isinstance(epcomm.Buffer.get_combine_config(1), epcomm.Config)
    assert epcomm.Buffer.get_low_latency_rdma_size_hint(8, 256, 1, 4) > 0
    buf.clean_low_latency_buffer(8, 256, 4)                 # a no-op on the CPU backend


def test_set_num_sms_reaches_default_config():
    before = epcomm.Buffer.num_sms
    try:
        epcomm.Buffer.set_num_sms(12)
        assert epcomm.Buffer.get_dispatch_config(2).num_sms == 12
    finally:
        epcomm.Buffer.set_num_sms(before)


def test_dispatch_combine_round_trip_single_rank(buf):
    rng = np.random.default_rng(1)
    x, idx, w = make_x(rng, 9, 256, 0), make_topk(rng, 9, 2, 4), make_weights(rng, 9, 2)
    idx[3] = -1                                             # a token that goes nowhere
    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(idx, 4)
    assert per_rdma is None and event.query()
    event.synchronize()
    event.current_stream_wait()                             # CPU events are complete: all no-ops
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w)
    assert handle.num_recv_tokens == 8 and counts == [int(c) for c in np.bincount(idx[idx >= 0], minlength=4)]
    combined, combined_w, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    # One rank: every routed token comes back once, unchanged; the unrouted one is zero.
    routed = np.ones(9, bool)
    routed[3] = False
    np.testing.assert_array_equal(combined[routed].view(np.uint16), x[routed].view(np.uint16))
    assert not combined[3].astype(np.float32).any()
    np.testing.assert_array_equal(combined_w[idx >= 0], w[idx >= 0])


def _routed_round(buf, rng, zero_copy):
    x, idx, w = make_x(rng, 12, 256, 0), make_topk(rng, 12, 2, 4), make_weights(rng, 12, 2)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idx, 4)
    return x, idx, w, buf.dispatch(x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                                   zero_copy=zero_copy)


def test_zero_copy_dispatch_and_combine_match_the_copying_calls(buf):
    x, idx, w, (rx, ri, rw, counts, handle, _) = _routed_round(buf, np.random.default_rng(3), False)
    want, want_w, _ = buf.combine(rx, handle, topk_weights=rw)
    x, idx, w, (zx, zi, zw, zcounts, zhandle, _) = _routed_round(buf, np.random.default_rng(3), True)
    np.testing.assert_array_equal(zx.view(np.uint16), rx.view(np.uint16))
    np.testing.assert_array_equal(zi, ri)
    assert zcounts == counts
    cb = buf.get_combine_buffer(zhandle)
    assert cb.shape == (zhandle.num_recv_tokens, 256) and cb.dtype == rx.dtype
    cb[...] = zx                                            # the "expert": identity, written in place
    got, got_w, _ = buf.combine(None, zhandle, topk_weights=zw, zero_copy=True)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(got_w, want_w)
    # The cached dispatch takes zero_copy too.
    again = buf.dispatch(x, handle=zhandle, zero_copy=True)[0]
    np.testing.assert_array_equal(again.view(np.uint16), zx.view(np.uint16))


def test_get_combine_buffer_needs_a_dispatch_since_the_last_combine(buf):
    from epcomm.errors import ConfigError
    *_, (rx, _, rw, _, handle, _) = _routed_round(buf, np.random.default_rng(4), True)
    cb = buf.get_combine_buffer(handle)
    cb[...] = rx
    buf.combine(cb, handle, topk_weights=rw, zero_copy=True)
    with pytest.raises(ConfigError, match="a combine ran on this Buffer since the last dispatch"):
        buf.get_combine_buffer(handle)
    with pytest.raises(ConfigError, match="get_combine_buffer"):
        buf.combine(rx.copy(), handle, zero_copy=True)      # another array than the combine buffer
    with pytest.raises(ConfigError, match="handle"):
        buf.get_combine_buffer("h")
    *_, (_, _, _, _, handle2, _) = _routed_round(buf, np.random.default_rng(5), False)
    assert buf.get_combine_buffer(handle2).shape[0] == handle2.num_recv_tokens


def test_low_latency_round_trip_single_rank(buf):
    rng = np.random.default_rng(2)
    x, idx, w = make_x(rng, 5, 256, 0), make_topk(rng, 5, 2, 4), make_weights(rng, 5, 2)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(x, idx, 8, 4, use_fp8=False)
    assert hook is None and isinstance(handle, epcomm.LowLatencyHandle)
    assert isinstance(event, epcomm.Event) and event.framework == "numpy" and event.query()
    np.testing.assert_array_equal(recv_count, np.bincount(idx.ravel(), minlength=4))
    out = np.zeros((5, 256), dtype=ref.bf16)
    got, _, _ = buf.low_latency_combine(recv_x, idx, w, handle, out=out)
    assert got is out
    want = (w.sum(axis=1)[:, None] * x.astype(np.float32)).astype(ref.bf16)   # every expert returns x itself
    np.testing.assert_allclose(out.astype(np.float32), want.astype(np.float32), rtol=2 ** -7)


def test_low_latency_hooks_return_events_single_rank(buf):
    """hook() returns the Event of the receive, told the caller's framework like the call's own event."""
    rng = np.random.default_rng(3)
    x, idx, w = make_x(rng, 5, 256, 0), make_topk(rng, 5, 2, 4), make_weights(rng, 5, 2)
    recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(x, idx, 8, 4, use_fp8=False,
                                                                       async_finish=True, return_recv_hook=True)
    assert isinstance(event, epcomm.Event) and event.framework == "numpy"
    assert not recv_count.any()                             # only sent: hook() receives
    recv_event = hook()
    assert isinstance(recv_event, epcomm.Event) and recv_event is not event
    assert recv_event.framework == "numpy" and recv_event.query()
    recv_event.synchronize()
    np.testing.assert_array_equal(recv_count, np.bincount(idx.ravel(), minlength=4))
    combined, event, hook = buf.low_latency_combine(recv_x, idx, w, handle, async_finish=True,
                                                    return_recv_hook=True)
    assert isinstance(event, epcomm.Event) and event.framework == "numpy"
    recv_event = hook()
    assert isinstance(recv_event, epcomm.Event) and recv_event.framework == "numpy" and recv_event.query()
    want = (w.sum(axis=1)[:, None] * x.astype(np.float32)).astype(ref.bf16)
    np.testing.assert_allclose(combined.astype(np.float32), want.astype(np.float32), rtol=2 ** -7)


class _RecordingEvent(epcomm.Event):
    def __init__(self):
        super().__init__()
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


@pytest.mark.parametrize("framework,sync_host", [("torch", False), ("jax", True)])
def test_hook_wrapper_sets_framework_and_syncs_jax(buf, framework, sync_host):
    """Buffer._hook: a backend hook's Event gets the caller's framework; a JAX caller's is synchronised before
    hook() returns (the GPU path, exercised here with a stand-in backend hook)."""
    from epcomm.buffer import CallContext
    backend_event = _RecordingEvent()
    hook = buf._hook(lambda: backend_event, CallContext(framework=framework, sync_host=sync_host))
    got = hook()
    assert got is backend_event and got.framework == framework
    assert got.synchronized == int(sync_host)
    assert buf._hook(None, CallContext()) is None
    # A backend hook that returns nothing (its receive already complete) still gives the caller an Event.
    done = buf._hook(lambda: None, CallContext(framework=framework))()
    assert isinstance(done, epcomm.Event) and done.framework == framework and done.query()


def test_hooks_refused_for_jax_callers():
    """A JAX caller asking for a receive hook gets a ConfigError (its immutable arrays could not be filled later);
    other frameworks, and JAX without a hook, pass the check."""
    with pytest.raises(epcomm.ConfigError, match="JAX"):
        epcomm.Buffer._check_hook_framework(True, "jax")
    for framework, hook in (("jax", False), ("torch", True), ("cupy", True), ("numpy", True)):
        assert epcomm.Buffer._check_hook_framework(hook, framework) is None


def test_destroyed_buffer_refuses_calls():
    b = epcomm.Buffer(None, backend="cpu")
    with b:
        pass
    b.destroy()                                             # twice is fine
    with pytest.raises(epcomm.EpcommError, match="destroyed"):
        b.get_dispatch_layout(np.zeros((1, 1), np.int64), 1)


def test_exchange_single_rank(monkeypatch):
    g = epcomm.Group(None, use_gpu=False)
    try:
        out = g.exchange(["only me"], "self test", timeout_s=1.0)
        assert out == ["only me"]
        monkeypatch.setenv("EPCOMM_TIMEOUT_S", "not-a-number")
        with pytest.raises(epcomm.ConfigError, match="EPCOMM_TIMEOUT_S"):
            g.exchange(["x"], "bad env")
        with pytest.raises(epcomm.ConfigError, match="objs"):
            g.exchange([], "wrong length", timeout_s=1.0)
    finally:
        g.close()


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_cross_rank_agreement_under_mpiexec(num_ranks):
    """One rank passes another num_experts / hidden / top-k / Tmax, or skips a combine: ConfigError on every rank
    naming ranks and values (tests/mpi/agreement_check.py), and the Buffer keeps working."""
    proc = _run(num_ranks, [str(ROOT / "tests" / "mpi" / "agreement_check.py")])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out}"
    assert re.search(r"^5 passed, 0 failed$", proc.stdout, re.M), out


@pytest.mark.mpi
def test_shrink_mode_under_mpiexec():
    """DeepEP's --shrink-test scenario on 6 ranks (tests/mpi/shrink_check.py): ranks 1, 3 and 5 stop at their first
    dispatch, combine and clean; the others mask them on timeout and later results skip them."""
    proc = _run(6, [str(ROOT / "tests" / "mpi" / "shrink_check.py"), "shrink"], EPCOMM_TIMEOUT_S="3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out}"
    assert re.search(r"^6 passed, 0 failed$", proc.stdout, re.M), out


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_reset_after_timeout_under_mpiexec(num_ranks):
    """One rank skips a call, the others time out, all reset(), the next calls are correct."""
    proc = _run(num_ranks, [str(ROOT / "tests" / "mpi" / "shrink_check.py"), "reset"], EPCOMM_TIMEOUT_S="3")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{out}"
    assert re.search(rf"^{num_ranks} passed, 0 failed$", proc.stdout, re.M), out
