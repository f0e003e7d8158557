"""Tiny pass/fail harness for the mpirun-launched GPU checks: each rank runs named cases, rank 0 prints
'N passed, M failed, K skipped' over all ranks (a case fails if it fails on any rank; a skipped case, one that cannot
run at this rank count, is named with its reason and never counted as passed)."""
from __future__ import annotations

import sys
import time
import traceback


class Cases:
    def __init__(self, comm):
        self.comm = comm
        self.results: list[tuple[str, bool, str, float]] = []

    def run(self, name, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            fn(*args, **kwargs)
            ok, msg = True, ""
        except Exception as exc:  # a failed case is reported, the others still run
            ok, msg = False, f"{type(exc).__name__}: {exc}"
            traceback.print_exc(limit=4)
        self.results.append((name, ok, msg, time.perf_counter() - t0))
        print(f"rank {self.comm.rank}: {'ok  ' if ok else 'FAIL'} {name} ({time.perf_counter() - t0:.2f} s) {msg[:300]}",
              flush=True)
        return ok

    def skip(self, name, why):
        """A case that cannot run here (e.g. it needs a second rank): reported as skipped, with the reason."""
        self.results.append((name, None, why, 0.0))
        print(f"rank {self.comm.rank}: skip {name}: {why}", flush=True)

    def finish(self) -> int:
        allres = self.comm.gather(self.results, root=0)
        bad = skipped = 0
        if self.comm.rank == 0:
            names = [r[0] for r in allres[0]]
            for i, name in enumerate(names):
                if allres[0][i][1] is None:
                    skipped += 1
                    print(f"SKIPPED {name}: {allres[0][i][2]}")
                    continue
                fails = [(rk, rr[i][2]) for rk, rr in enumerate(allres) if i < len(rr) and not rr[i][1]]
                if fails:
                    bad += 1
                    print(f"FAILED {name}: " + "; ".join(f"rank {rk}: {m[:200]}" for rk, m in fails))
            print(f"{len(names) - bad - skipped} passed, {bad} failed, {skipped} skipped")
        bad = self.comm.bcast(bad, root=0)
        return 1 if bad else 0


def check_args():
    """The GPU checks' options: --quick (a few cases), --oversubscribed (small shapes for several ranks per GPU)."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--oversubscribed", action="store_true")
    return ap.parse_args()


def poison_pool(nbytes: int = 256 << 20) -> None:
    """Fill CuPy's pool with 0xA5 bytes (then free them), so that output rows a kernel leaves unwritten show."""
    import cupy as cp
    a = cp.empty(nbytes, cp.uint8)
    a.fill(0xA5)
    del a


def capture_graph(step, group):
    """step() once eagerly (kernels loaded, pool filled), then captured into a CUDA graph on a non-blocking stream;
    returns (stream, graph). Every rank captures (collective: a barrier before the capture)."""
    import cupy as cp
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        step()
        s.synchronize()
        group.barrier()
        s.begin_capture()
        step()
        graph = s.end_capture()
    return s, graph


def replay_graph(s, graph, group, inputs) -> None:
    """Copy new values into the captured input arrays (pairs (array, host values)), then replay once and wait. The
    copies run on CuPy's current stream, which the non-blocking replay stream does not wait for: synchronise first."""
    import cupy as cp
    for arr, values in inputs:
        arr[...] = cp.asarray(values)
    cp.cuda.Device().synchronize()
    group.barrier()
    graph.launch(s)
    s.synchronize()


def exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.exit(code)


def expect_timeout(call, group, phase: str, what: str, sleep_s: float = 6, bound_s: float = 10) -> None:
    """The last rank sleeps past the wait bound instead of calling; every other rank's call() (which must include a
    synchronisation) must raise CommTimeoutError naming `phase` and the sleeping rank, within bound_s (the caller sets
    EPCOMM_TIMEOUT_S well below it). Every rank synchronises its GPU and meets the others at a barrier first."""
    import cupy as cp
    import epcomm
    rank, last = group.rank, group.size - 1
    cp.cuda.Device().synchronize()
    group.barrier()
    t0 = time.time()
    if rank == last:
        time.sleep(sleep_s)
        return
    try:
        call()
    except epcomm.CommTimeoutError as exc:
        dt = time.time() - t0
        assert phase in str(exc), str(exc)
        assert exc.peer == last, f"the error names peer {exc.peer}, the skipping rank is {last}: {exc}"
        assert dt < bound_s, f"took {dt:.1f} s"
        print(f"rank {rank}: CommTimeoutError after {dt:.1f} s: {str(exc)[:160]}", flush=True)
        return
    raise AssertionError(f"{what} did not time out although a rank skipped it")
