"""Shrink mode and reset on the CPU backend (run under mpiexec; the shrink scenario needs 6 ranks).

shrink: DeepEP's test_low_latency --shrink-test scenario: rank 1 stops at its first low-latency dispatch, rank 3 at
its first combine, rank 5 at its first clean_low_latency_buffer; the live ranks time out on them, mask them, and
every later call's results skip them (dispatch: no rows from a masked source; combine: top-k entries whose expert
lives on a masked rank add nothing). reset: one rank skips a call, the others time out, all call reset(), the next
calls (normal and low latency) are correct. Prints "N passed, M failed" on rank 0."""
from __future__ import annotations

import os
import sys

import numpy as np

os.environ.setdefault("EPCOMM_TIMEOUT_S", "3")
import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.testing import make_rank_inputs  # noqa: E402

FAILED_AT = {"dispatch": 1, "combine": 3, "clean": 5}     # DeepEP's simulate_failure_and_skip


def fails(rank, api, expected):
    """DeepEP's simulate_failure_and_skip: True when this rank has failed (it makes no more calls)."""
    if rank in expected:
        return True
    expected.add(FAILED_AT[api])
    return FAILED_AT[api] == rank


def shrink_scenario(rank, R):
    buf = epcomm.Buffer(None, backend="cpu", enable_shrink=True, low_latency_mode=True)
    hidden, k, e, tmax = 256, 3, 2 * R, 8
    e_local = e // R
    expected: set[int] = set()
    status = np.zeros(R, np.int32)
    for it in range(3):
        xs, idxs, ws = make_rank_inputs(20 + it, [6] * R, hidden, k, e)
        for r in range(R):                                 # some -1 entries, as DeepEP's test
            idxs[r][r % 6, 1] = -1
        if fails(rank, "dispatch", expected):
            break
        recv, count, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, e, use_fp8=False)
        buf.low_latency_query_mask_buffer(status)
        assert set(np.nonzero(status)[0].tolist()) == expected, (status, expected)
        live = [r for r in range(R) if not status[r]]
        # What was received: exactly the rows of the unmasked sources (DeepEP: a masked source counts 0).
        want = ref.low_latency_dispatch([xs[r] if r in live else xs[r][:0] for r in range(R)],
                                        [idxs[r] if r in live else idxs[r][:0] for r in range(R)], tmax, e, False)[rank]
        assert np.array_equal(count, want.recv_count), (count, want.recv_count)
        for j in range(e_local):
            n = int(count[j])
            assert n == sum(int((idxs[r] == rank * e_local + j).sum()) for r in live)
            assert np.array_equal(recv[j, :n].view(np.uint16), want.recv_x[j, :n].view(np.uint16))
        if fails(rank, "combine", expected):
            break
        y = recv                                            # identity experts
        got, _, _ = buf.low_latency_combine(y, idxs[rank], ws[rank], handle)
        buf.low_latency_query_mask_buffer(status)
        assert set(np.nonzero(status)[0].tolist()) == expected, (status, expected)
        # DeepEP's check: x * sum of the weights of the entries whose expert's rank is unmasked.
        owner_masked = status[np.maximum(idxs[rank], 0) // e_local].astype(bool) | (idxs[rank] < 0)
        w = np.where(owner_masked, 0, ws[rank]).sum(axis=1, dtype=np.float32)
        want_x = (xs[rank].astype(np.float32) * w[:, None]).astype(ref.bf16)
        diff = epcomm.testing.calc_diff(got.astype(np.float32), want_x.astype(np.float32))
        assert diff < 1e-5, diff
        if fails(rank, "clean", expected):
            break
        buf.clean_low_latency_buffer(tmax, hidden, e)
        buf.low_latency_query_mask_buffer(status)
        assert set(np.nonzero(status)[0].tolist()) == expected, (status, expected)
    return buf, expected


def reset_scenario(rank, R):
    """Rank R-1 skips a low-latency dispatch; the others time out; all reset; the next calls are correct."""
    buf = epcomm.Buffer(None, backend="cpu")
    hidden, k, e, tmax = 256, 2, 2 * R, 8
    xs, idxs, ws = make_rank_inputs(31, [5] * R, hidden, k, e)
    if rank != R - 1:
        try:
            buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, e, use_fp8=False)
            raise AssertionError("no CommTimeoutError")
        except epcomm.CommTimeoutError:
            pass
        try:                                               # poisoned until reset()
            buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, e, use_fp8=False)
            raise AssertionError("no CommTimeoutError before reset")
        except epcomm.CommTimeoutError as exc:
            assert "reset()" in str(exc), exc
    buf.reset()
    ll = ref.low_latency_dispatch(xs, idxs, tmax, e, False)
    want_c = ref.low_latency_combine([r.recv_x for r in ll], idxs, ws, ll, e)[rank]
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], e)
    want_n = ref.dispatch(xs, idxs, ws, e)[rank]
    for i in range(20):
        recv, count, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, e, use_fp8=False)
        assert np.array_equal(count, ll[rank].recv_count)
        got, _, _ = buf.low_latency_combine(recv, idxs[rank], ws[rank], handle)
        assert np.array_equal(got.view(np.uint16), want_c.view(np.uint16)), f"low-latency call {i} after reset"
        rx, _, rw, _, h, _ = buf.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank],
                                          num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                          num_tokens_per_expert=per_expert)
        assert np.array_equal(rx.view(np.uint16), want_n.recv_x.view(np.uint16)), f"dispatch {i} after reset"
        cx, _, _ = buf.combine(rx, h)
        assert cx.shape == xs[rank].shape
    buf.destroy()


def main() -> int:
    which = sys.argv[1]
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, R = comm.Get_rank(), comm.Get_size()
    problem = None
    buf = None
    try:
        if which == "shrink":
            buf, _ = shrink_scenario(rank, R)
        else:
            reset_scenario(rank, R)
    except Exception as exc:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        print(f"[rank {rank}] FAIL {which}: {problem}", file=sys.stderr, flush=True)
    everyone = comm.allgather(problem)                    # the failed ranks of the scenario arrive here too
    if buf is not None:
        buf.destroy()
    failed = sum(1 for p in everyone if p)
    if rank == 0:
        print(f"{R - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
