"""Tiny pass/fail harness for the mpirun-launched GPU checks: each rank runs named cases, rank 0 prints
'N passed, M failed' over all ranks (a case fails if it fails on any rank)."""
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

    def finish(self) -> int:
        allres = self.comm.gather(self.results, root=0)
        bad = 0
        if self.comm.rank == 0:
            names = [r[0] for r in allres[0]]
            for i, name in enumerate(names):
                fails = [(rk, rr[i][2]) for rk, rr in enumerate(allres) if i < len(rr) and not rr[i][1]]
                if fails:
                    bad += 1
                    print(f"FAILED {name}: " + "; ".join(f"rank {rk}: {m[:200]}" for rk, m in fails))
            print(f"{len(names) - bad} passed, {bad} failed")
        bad = self.comm.bcast(bad, root=0)
        return 1 if bad else 0


def exit_with(code: int) -> None:
    sys.stdout.flush()
    sys.exit(code)
