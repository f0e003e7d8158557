"""Cross-rank agreement on the CPU backend (run under mpiexec with 2 or 3 ranks): one rank makes a call that
differs from the others'; every rank must raise the same ConfigError naming the ranks and values, the Buffer must
keep working, and the next matching call must be correct. Prints "N passed, M failed" on rank 0."""
from __future__ import annotations

import os
import sys

import numpy as np

os.environ.setdefault("EPCOMM_TIMEOUT_S", "10")
import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.testing import make_rank_inputs  # noqa: E402

BF16 = ref.bf16


def ll_pair(buf, rank, R, *, hidden=256, k=2, e=None, tmax=8, combine=True):
    """A correct low-latency dispatch + combine (identity experts), checked against the reference."""
    e = e or 2 * R
    xs, idxs, ws = make_rank_inputs(11, [5] * R, hidden, k, e)
    recv, _, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, e, use_fp8=False)
    if not combine:
        return handle
    got, _, _ = buf.low_latency_combine(recv, idxs[rank], ws[rank], handle)
    want = ref.low_latency_combine([r.recv_x for r in ref.low_latency_dispatch(xs, idxs, tmax, e, False)], idxs, ws,
                                   ref.low_latency_dispatch(xs, idxs, tmax, e, False), e)[rank]
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), "combine after the mismatch is wrong"


def odd(rank, R):
    return rank == R - 1


def case_num_experts(buf, rank, R):
    e = 2 * R if not odd(rank, R) else 4 * R
    xs, idxs, _ = make_rank_inputs(3, [4] * R, 256, 2, 2 * R)
    buf.low_latency_dispatch(xs[rank], idxs[rank], 8, e, use_fp8=False)


def case_hidden(buf, rank, R):
    h = 256 if not odd(rank, R) else 512
    xs, idxs, ws = make_rank_inputs(4, [4] * R, h, 2, 2 * R)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(idxs[rank], 2 * R)
    buf.dispatch(xs[rank], topk_idx=idxs[rank], topk_weights=ws[rank], num_tokens_per_rank=per_rank,
                 is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def case_topk(buf, rank, R):
    k = 2 if not odd(rank, R) else 3
    xs, idxs, _ = make_rank_inputs(5, [4] * R, 256, k, 2 * R)
    buf.low_latency_dispatch(xs[rank], idxs[rank], 8, 2 * R, use_fp8=False)


def case_tmax(buf, rank, R):
    tmax = 8 if not odd(rank, R) else 16
    xs, idxs, _ = make_rank_inputs(6, [4] * R, 256, 2, 2 * R)
    buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, 2 * R, use_fp8=False)


def case_skipped_combine(buf, rank, R):
    """Rank 0 skips its combine and dispatches again: ConfigError naming both calls, never a timeout."""
    xs, idxs, ws = make_rank_inputs(7, [4] * R, 256, 2, 2 * R)
    recv, _, handle, _, _ = buf.low_latency_dispatch(xs[rank], idxs[rank], 8, 2 * R, use_fp8=False)
    if rank == 0:
        buf.low_latency_dispatch(xs[rank], idxs[rank], 8, 2 * R, use_fp8=False)
    else:
        buf.low_latency_combine(recv, idxs[rank], ws[rank], handle)


CASES = [("num_experts differs", case_num_experts), ("hidden differs", case_hidden), ("top-k differs", case_topk),
         ("Tmax differs", case_tmax), ("a rank skips a combine, then dispatches", case_skipped_combine)]


def main() -> int:
    buf = epcomm.Buffer(None, backend="cpu")
    rank, R = buf.rank, buf.num_ranks
    outcomes = []
    for name, fn in CASES:
        problem = None
        try:
            fn(buf, rank, R)
            problem = "no error"
        except epcomm.ConfigError as exc:
            msg = str(exc)
            missing = [w for w in want_of(fn, rank, R) if w not in msg]
            if missing or "disagree" not in msg:
                problem = f"message lacks {missing}: {msg}"
        except Exception as exc:  # noqa: BLE001
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            try:
                ll_pair(buf, rank, R)                 # the Buffer still works, results correct
            except Exception as exc:  # noqa: BLE001
                problem = f"after the mismatch: {type(exc).__name__}: {exc}"
        if problem:
            print(f"[rank {rank}] FAIL {name}: {problem}", file=sys.stderr, flush=True)
        outcomes.append(problem)
    everyone = buf.group.allgather(outcomes)
    failed = [i for i in range(len(CASES)) if any(o[i] for o in everyone)]
    if rank == 0:
        for i in failed:
            print(f"FAILED: {CASES[i][0]}")
        print(f"{len(CASES) - len(failed)} passed, {len(failed)} failed", flush=True)
    buf.destroy()
    return 1 if failed else 0


def want_of(fn, rank, R):
    return {case_num_experts: ["num_experts", f"rank {R - 1} {4 * R}"],
            case_hidden: ["hidden", f"rank {R - 1} 512"],
            case_topk: ["num_topk", f"rank {R - 1} 3"],
            case_tmax: ["num_max_dispatch_tokens_per_rank", f"rank {R - 1} 16"],
            case_skipped_combine: ["rank 0 low_latency_dispatch #", "low_latency_combine #"]}[fn]


if __name__ == "__main__":
    sys.exit(main())
