"""The whole epcomm.Buffer API on the CPU backend, checked against epcomm.reference: `mpiexec -n N python THIS`.

Every rank generates ALL ranks' inputs from one seed per case, so the expected values need no communication.
Dispatch is compared bit-exact; combine within 1 bf16 ulp of the reference (same fp32 order: exact in practice);
low-latency dispatch per (local expert, source) block after sorting by src_info; FP8 after dequantisation
(exact or calc_diff < 9e-4). Each rank prints its failures; rank 0 prints "N passed, M failed"; the exit code is
non-zero on every rank when any case failed anywhere. Works with one rank too (no mpiexec needed).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import zlib

import numpy as np

try:
    import epcomm
except ImportError:                                     # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import epcomm
from epcomm import reference as ref
from epcomm.testing import assert_bitwise_equal, calc_diff, make_topk, make_weights, make_x

BF16, FP8 = ref.bf16, ref.fp8
FP8_DIFF = 9e-4

# Token counts per rank (cycled when there are more ranks): different counts, a rank with 0 and one with 1 token.
TOKEN_PATTERNS = {
    "mixed": [40, 0, 1, 23, 7, 31, 12, 5],
    "mixed2": [1, 33, 0, 16, 9, 2, 27, 38],
    "tiny": [0, 1, 1, 0, 2, 0, 1, 3],
}


def token_counts(num_ranks: int, pattern: str) -> list[int]:
    base = TOKEN_PATTERNS[pattern]
    return [base[r % len(base)] for r in range(num_ranks)]


# ---------------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------------

def _bf16_order(a) -> np.ndarray:
    """bf16 bits -> integers ordered like the values (so ulp distance is a difference)."""
    bits = np.ascontiguousarray(a, dtype=BF16).view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, -(bits & 0x7FFF), bits)


def assert_bf16_close(actual, expected, name: str, max_ulps: int = 1) -> None:
    """Same shape and dtype, and every element within max_ulps bf16 ulps of the expected one."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"{name}: expected {list(expected.shape)} {expected.dtype}, "
                             f"got {list(actual.shape)} {actual.dtype}")
    ulps = np.abs(_bf16_order(actual) - _bf16_order(expected))
    nan_mismatch = np.isnan(actual.astype(np.float32)) != np.isnan(expected.astype(np.float32))
    bad = (ulps > max_ulps) | nan_mismatch
    if bad.any():
        coord = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements beyond {max_ulps} ulp; first at "
                             f"{list(coord)}: got {actual[coord]!r}, expected {expected[coord]!r}")


def assert_rows_equal(actual, expected, num_rows: int, name: str) -> None:
    """The first num_rows rows bit-exact (payloads: both halves); used where padding rows are unspecified."""
    if isinstance(expected, tuple):
        if not isinstance(actual, tuple) or len(actual) != 2:
            raise AssertionError(f"{name}: expected an (fp8, scales) pair, got {type(actual).__name__}")
        for i in range(2):
            if actual[i].shape != expected[i].shape:
                raise AssertionError(f"{name}[{i}]: expected shape {list(expected[i].shape)}, "
                                     f"got {list(actual[i].shape)}")
            assert_bitwise_equal(actual[i][:num_rows], expected[i][:num_rows], f"{name}[{i}][:{num_rows}]")
        return
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: expected shape {list(expected.shape)}, got {list(actual.shape)}")
    assert_bitwise_equal(actual[:num_rows], expected[:num_rows], f"{name}[:{num_rows}]")


# Failed comparisons of the running case. Comparisons record instead of raising, so a failing rank still makes
# every later call of the case and the ranks stay in step (a rank that stopped early would strand its peers).
FAILURES: list[str] = []


def check(cond: bool, message: str) -> None:
    if not cond:
        FAILURES.append(message)


@contextlib.contextmanager
def comparing(what: str):
    """Record (not raise) a comparison that crashes, e.g. on an output of the wrong type or shape."""
    try:
        yield
    except Exception as exc:                    # noqa: BLE001
        FAILURES.append(f"{what}: comparison raised {type(exc).__name__}: {exc}")


def expect(compare, *args) -> None:
    """Run one comparison helper (assert_bitwise_equal, ...) and record its AssertionError."""
    try:
        compare(*args)
    except AssertionError as exc:
        FAILURES.append(str(exc))


def to_fp8(x: np.ndarray):
    """The FP8 pair of x with COLUMN-MAJOR scales (a transposed view of a [S, T] array), as DeepGEMM wants them."""
    data, scales = ref.per_token_cast_to_fp8(x)
    return data, np.ascontiguousarray(scales.T).T


# ---------------------------------------------------------------------------------------------------------------------
# Normal mode
# ---------------------------------------------------------------------------------------------------------------------

def ref_dispatch(xs, idxs, ws, num_experts, alignment=1, worst=0, with_topk=True):
    """All ranks' expected dispatch through the reference's send/recv halves (with or without top-k; the layout's
    per-expert counts travel either way, so the per-expert list exists without top-k too, as in DeepEP)."""
    num_ranks = len(xs)
    full = [ref.get_dispatch_layout(i, num_experts, num_ranks) for i in idxs]
    layouts = [f[3] for f in full]
    sent = [ref.dispatch_send(xs[s], idxs[s] if with_topk else None, ws[s] if with_topk else None, layouts[s],
                              full[s][2])
            for s in range(num_ranks)]
    results = [ref.dispatch_recv([sent[s][d] for s in range(num_ranks)], d, num_ranks, num_experts, alignment, worst)
               for d in range(num_ranks)]
    return results, layouts


def normal_inputs(rng, num_ranks, tokens, hidden, num_topk, num_experts, skew=None, drop=0.0, fp8=False):
    xs = [make_x(rng, t, hidden, r) for r, t in enumerate(tokens)]
    idxs = [make_topk(rng, t, num_topk, num_experts, skew=skew, drop=drop) for t in tokens]
    ws = [make_weights(rng, t, num_topk) for t in tokens]
    if fp8:
        xs = [to_fp8(x) for x in xs]
    return xs, idxs, ws


def do_dispatch(buf, xs, idxs, ws, num_experts, *, with_topk=True, alignment=1, worst=0):
    """Layout + dispatch on this rank, compared with the reference; returns (handle, results, layouts)."""
    rank, num_ranks = buf.rank, buf.num_ranks
    per_rank, per_rdma, per_expert, in_rank, event = buf.get_dispatch_layout(idxs[rank], num_experts)
    # Nodes: one per host, or EPCOMM_VIRTUAL_NODE_SIZE consecutive ranks (per_rdma is None on one node).
    want_rank, want_rdma, want_expert, want_in_rank = ref.get_dispatch_layout(idxs[rank], num_experts, num_ranks,
                                                                              buf.group.num_nodes)
    with comparing("layout"):
        expect(assert_bitwise_equal, per_rank, want_rank, "layout.num_tokens_per_rank")
        expect(assert_bitwise_equal, per_expert, want_expert, "layout.num_tokens_per_expert")
        expect(assert_bitwise_equal, in_rank, want_in_rank, "layout.is_token_in_rank")
        expect(assert_bitwise_equal, per_rdma, want_rdma, "layout.num_tokens_per_rdma_rank")
        check(isinstance(event, epcomm.Event), f"layout event: expected an epcomm.Event, got {event!r}")

    kwargs = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  expert_alignment=alignment, num_worst_tokens=worst)
    if with_topk:
        kwargs.update(topk_idx=idxs[rank], topk_weights=ws[rank])
    recv_x, recv_idx, recv_w, per_expert_list, handle, event = buf.dispatch(xs[rank], **kwargs)
    results, layouts = ref_dispatch(xs, idxs, ws, num_experts, alignment, worst, with_topk)
    with comparing("dispatch"):
        want = results[rank]
        n = want.num_recv_tokens
        if worst:
            expect(assert_rows_equal, recv_x, want.recv_x, n, "dispatch.recv_x")
            if with_topk:
                expect(assert_bitwise_equal, recv_idx, want.recv_topk_idx,
                       "dispatch.recv_topk_idx (padding must be -1)")
                expect(assert_rows_equal, recv_w, want.recv_topk_weights, n, "dispatch.recv_topk_weights")
        else:
            expect(assert_bitwise_equal, recv_x, want.recv_x, "dispatch.recv_x")
            expect(assert_bitwise_equal, recv_idx, want.recv_topk_idx, "dispatch.recv_topk_idx")
            expect(assert_bitwise_equal, recv_w, want.recv_topk_weights, "dispatch.recv_topk_weights")
        if not with_topk:
            check(recv_idx is None and recv_w is None, "dispatch without top-k: expected recv_topk_idx/weights None")
        check(list(per_expert_list) == list(want.num_recv_tokens_per_expert_list),
              f"dispatch.num_recv_tokens_per_expert_list: expected {want.num_recv_tokens_per_expert_list}, "
              f"got {per_expert_list}")
        check(isinstance(handle, epcomm.DispatchHandle), f"dispatch handle: got {type(handle).__name__}")
        check(isinstance(event, epcomm.Event), f"dispatch event: expected an epcomm.Event, got {event!r}")
        check(handle.num_recv_tokens == n, f"handle.num_recv_tokens: expected {n}, got {handle.num_recv_tokens}")
        check(handle.num_tokens == idxs[rank].shape[0], f"handle.num_tokens: expected {idxs[rank].shape[0]}")
        expect(assert_bitwise_equal, handle.recv_src_idx, want.recv_src_idx, "handle.recv_src_idx")
        expect(assert_bitwise_equal, handle.num_recv_tokens_per_source, want.num_recv_tokens_per_source,
                             "handle.num_recv_tokens_per_source")
        counts = np.array([res.num_recv_tokens_per_source for res in results], dtype=np.int32)   # [dst, src]
        expect(assert_bitwise_equal, handle.rank_prefix_matrix, counts.T.cumsum(axis=0, dtype=np.int32),
               "handle.rank_prefix_matrix")
    return handle, results, layouts


def do_combine(buf, rng, handle, results, layouts, hidden, *, bias_kind=None, with_weights=False):
    """combine() of fresh random expert outputs, compared with the reference (1 bf16 ulp)."""
    rank, num_ranks = buf.rank, buf.num_ranks
    ys = [rng.standard_normal((len(res.recv_src_idx), hidden), dtype=np.float32).astype(BF16) for res in results]
    biases = None
    if bias_kind == "one":
        biases = [rng.standard_normal((lay.shape[0], hidden), dtype=np.float32).astype(BF16) for lay in layouts]
    elif bias_kind == "pair":
        biases = [tuple(rng.standard_normal((lay.shape[0], hidden), dtype=np.float32).astype(BF16) for _ in range(2))
                  for lay in layouts]
    weights = [res.recv_topk_weights for res in results] if with_weights else None
    combined, combined_w, event = buf.combine(ys[rank], handle, topk_weights=None if weights is None else weights[rank],
                                              bias=None if biases is None else biases[rank])
    want_x, want_w = ref.combine(ys, results, layouts, weights, biases)[rank]
    expect(assert_bf16_close, combined, want_x, f"combine.combined_x (bias={bias_kind})")
    check(isinstance(event, epcomm.Event), f"combine event: expected an epcomm.Event, got {event!r}")
    if with_weights:
        expect(assert_bitwise_equal, combined_w, want_w, "combine.combined_topk_weights")
    else:
        check(combined_w is None, "combine.combined_topk_weights: expected None without topk_weights")
    return combined_w


def do_cached(buf, rng, handle, results, layouts, hidden, fp8=False):
    """dispatch(x, handle=h) of fresh rows, compared bit-exact with the reference's cached dispatch."""
    rank = buf.rank
    xs = [make_x(rng, lay.shape[0], hidden, s) for s, lay in enumerate(layouts)]
    if fp8:
        xs = [to_fp8(x) for x in xs]
    recv_x, recv_idx, recv_w, per_expert_list, same, event = buf.dispatch(xs[rank], handle=handle)
    want = ref.cached_dispatch(xs, results, layouts)[rank]
    expect(assert_rows_equal, recv_x, want, results[rank].num_recv_tokens, "cached_dispatch.recv_x")
    check(recv_idx is None and recv_w is None and per_expert_list is None,
          "cached_dispatch: expected only recv_x (top-k outputs None)")
    check(same is handle, "cached_dispatch: expected the same handle back")
    check(isinstance(event, epcomm.Event), "cached_dispatch event: expected an epcomm.Event")


def normal_case(buf, rng, *, tokens="mixed", hidden=512, num_topk=4, experts_per_rank=8, skew=None, drop=0.0,
                fp8=False, with_topk=True, alignment=1, worst=0, combines=((None, False),), cached=True):
    num_ranks = buf.num_ranks
    num_experts = experts_per_rank * num_ranks
    counts = token_counts(num_ranks, tokens)
    if isinstance(skew, str) and skew.startswith("avoid_rank"):
        # The last rank receives nothing (with one rank: every entry -1).
        skew, drop = (f"avoid_rank:{num_ranks}:{num_ranks - 1}", drop) if num_ranks > 1 else (None, 1.0)
    xs, idxs, ws = normal_inputs(rng, num_ranks, counts, hidden, num_topk, num_experts, skew, drop, fp8)
    if worst == "auto":
        worst = sum(counts) + 3      # the most any rank can receive, plus slack
    handle, results, layouts = do_dispatch(buf, xs, idxs, ws, num_experts, with_topk=with_topk,
                                           alignment=alignment, worst=worst)
    if skew == "one_expert":
        n = results[buf.rank].num_recv_tokens
        check(buf.rank == 0 or n == 0, f"skew one_expert: rank {buf.rank} expected 0 rows, got {n}")
    if isinstance(skew, str) and skew.startswith("avoid_rank") and buf.rank == num_ranks - 1:
        check(results[buf.rank].num_recv_tokens == 0, "avoided rank: expected 0 rows")
    for bias_kind, with_weights in combines:
        combined_w = do_combine(buf, rng, handle, results, layouts, hidden, bias_kind=bias_kind,
                                with_weights=with_weights and with_topk)
        if combined_w is not None:
            with comparing("combined_topk_weights vs the original weights"):
                # Combining the received weights gives back the weight of every routed (token, k) pair.
                routed = idxs[buf.rank] >= 0
                expect(assert_bitwise_equal, combined_w[routed], ws[buf.rank][routed],
                       "combined_topk_weights vs the original topk_weights")
    if cached:
        do_cached(buf, rng, handle, results, layouts, hidden, fp8=fp8)


# ---------------------------------------------------------------------------------------------------------------------
# Low-latency mode
# ---------------------------------------------------------------------------------------------------------------------

def _blocks(layout_range: np.ndarray, j: int, s: int):
    packed = int(layout_range[j, s])
    return packed >> 32, packed & 0xFFFFFFFF


def ll_block_rows(src_info, layout_range, j, s):
    """Row indices of the (local expert j, source s) block, sorted (stably) by src_info."""
    begin, count = _blocks(layout_range, j, s)
    rows = np.arange(begin, begin + count)
    return rows[np.argsort(src_info[j, rows], kind="stable")]


def dequant(data, scales, use_ue8m0):
    return ref.per_token_cast_back(np.ascontiguousarray(data), np.ascontiguousarray(scales), use_ue8m0)


def check_ll_dispatch(*args):
    with comparing("ll dispatch"):
        _check_ll_dispatch(*args)


def _check_ll_dispatch(buf, recv_x, recv_count, handle, want, xs, tmax, hidden, num_experts, use_fp8, use_ue8m0):
    num_ranks = buf.num_ranks
    e_local = num_experts // num_ranks
    slots = num_ranks * tmax
    if use_fp8:
        check(isinstance(recv_x, tuple) and len(recv_x) == 2, "ll recv_x: expected an (fp8, scales) pair")
        data, scales = recv_x
        num_cols = (hidden // 128 + 3) // 4 if use_ue8m0 else hidden // 128
        scale_dtype = np.int32 if use_ue8m0 else np.float32
        check(scales.shape == (e_local, slots, num_cols) and scales.dtype == scale_dtype,
              f"ll scales: expected [{e_local}, {slots}, {num_cols}] {np.dtype(scale_dtype)}, got "
              f"{list(scales.shape)} {scales.dtype}")
        check(scales.transpose(0, 2, 1).flags.c_contiguous, "ll scales: expected column-major in the last two dims")
    else:
        data, scales = recv_x, None
    check(data.shape == (e_local, slots, hidden) and data.dtype == (FP8 if use_fp8 else BF16),
          f"ll recv_x: expected [{e_local}, {slots}, {hidden}], got {list(data.shape)} {data.dtype}")
    expect(assert_bitwise_equal, recv_count, want.recv_count, "ll recv_count")
    check(isinstance(handle, epcomm.LowLatencyHandle), f"ll handle: got {type(handle).__name__}")
    want_data = want.recv_x[0] if use_fp8 else want.recv_x
    for j in range(e_local):
        covered = np.zeros(int(recv_count[j]), dtype=np.int32)
        for s in range(num_ranks):
            begin, count = _blocks(handle.layout_range, j, s)
            _, want_count = _blocks(want.layout_range, j, s)
            where = f"ll block (local expert {j}, source {s})"
            check(count == want_count, f"{where}: expected {want_count} rows, got {count}")
            check(begin + count <= recv_count[j], f"{where}: rows [{begin}, {begin + count}) past recv_count")
            covered[begin:begin + count] += 1
            rows = ll_block_rows(handle.src_info, handle.layout_range, j, s)
            want_rows = ll_block_rows(want.src_info, want.layout_range, j, s)
            expect(assert_bitwise_equal, handle.src_info[j, rows], want.src_info[j, want_rows], f"{where} src_info")
            if use_fp8:
                got = dequant(data[j, rows], scales[j, rows], use_ue8m0)
                exp = dequant(want_data[j, want_rows], want.recv_x[1][j, want_rows], use_ue8m0)
                diff = calc_diff(got, exp)
                check(np.array_equal(got, exp) or diff < FP8_DIFF, f"{where}: dequantised rows differ, calc_diff {diff}")
                orig = xs[s][want.src_info[j, want_rows]].astype(np.float32)
                diff = calc_diff(got, orig)
                check(diff < FP8_DIFF, f"{where}: dequantised rows vs the source's bf16 rows: calc_diff {diff}")
            else:
                expect(assert_bitwise_equal, data[j, rows], want_data[j, want_rows], f"{where} rows")
        check(bool((covered == 1).all()), f"ll local expert {j}: blocks do not tile [0, recv_count)")


def ll_layout_y(buf, handle, want, y_ref, num_experts):
    """The reference's expert outputs y_ref moved into this dispatch's own row order; unused rows are NaN."""
    e_local = num_experts // buf.num_ranks
    y = np.full(y_ref.shape, np.nan, dtype=np.float32).astype(BF16)
    with comparing("ll combine input in the dispatch's row order"):
        for j in range(e_local):
            for s in range(buf.num_ranks):
                rows = ll_block_rows(handle.src_info, handle.layout_range, j, s)
                want_rows = ll_block_rows(want.src_info, want.layout_range, j, s)
                y[j, rows] = y_ref[j, want_rows]
    return y


def check_ll_event(event, what: str) -> None:
    """A low-latency call's event, or what its hook returned: a complete epcomm.Event for the caller's numpy."""
    if not isinstance(event, epcomm.Event):
        FAILURES.append(f"{what}: expected an epcomm.Event, got {type(event).__name__}")
        return
    check(event.query(), f"{what}: a CPU event must be complete")
    check(event.framework == "numpy", f"{what}: framework {event.framework!r}, expected the caller's 'numpy'")


def ll_case(buf, rng, *, tokens="mixed", hidden=512, num_topk=4, experts_per_rank=4, tmax=None, skew=None, drop=0.2,
            use_fp8=False, round_scale=False, use_ue8m0=False, hook=False, stats=False,
            combine_modes=("plain", "zero_copy", "out", "hook"), use_logfmt=False, y_scale=1.0):
    rank, num_ranks = buf.rank, buf.num_ranks
    num_experts = experts_per_rank * num_ranks
    e_local = experts_per_rank
    counts = token_counts(num_ranks, tokens)
    tmax = tmax or max(max(counts), 1) + 2
    if isinstance(skew, str) and skew.startswith("avoid_rank"):
        # The last rank receives nothing (with one rank: every entry -1).
        skew, drop = (f"avoid_rank:{num_ranks}:{num_ranks - 1}", drop) if num_ranks > 1 else (None, 1.0)
    xs, idxs, ws = normal_inputs(rng, num_ranks, counts, hidden, num_topk, num_experts, skew, drop)
    stats_arr = np.arange(e_local, dtype=np.int32) * 3 if stats else None
    stats_before = None if stats_arr is None else stats_arr.copy()
    wait_arr = np.zeros(num_ranks, dtype=np.int64) if stats else None
    recv_x, recv_count, handle, event, recv_hook = buf.low_latency_dispatch(
        xs[rank], idxs[rank], tmax, num_experts, cumulative_local_expert_recv_stats=stats_arr,
        dispatch_wait_recv_cost_stats=wait_arr, use_fp8=use_fp8, round_scale=round_scale, use_ue8m0=use_ue8m0,
        return_recv_hook=hook)
    check_ll_event(event, "ll dispatch event")
    if hook:
        check(callable(recv_hook), "ll dispatch: expected a callable hook with return_recv_hook=True")
        check_ll_event(recv_hook(), "ll dispatch hook()")
    else:
        check(recv_hook is None, "ll dispatch: expected hook None without return_recv_hook")
    wants = ref.low_latency_dispatch(xs, idxs, tmax, num_experts, use_fp8, round_scale, use_ue8m0)
    want = wants[rank]
    check_ll_dispatch(buf, recv_x, recv_count, handle, want, xs, tmax, hidden, num_experts, use_fp8, use_ue8m0)
    if stats:
        expect(assert_bitwise_equal, stats_arr, stats_before + want.recv_count, "cumulative_local_expert_recv_stats")
        check(wait_arr.dtype == np.int64 and bool((wait_arr >= 0).all()), "dispatch_wait_recv_cost_stats: negative")
    if skew == "one_expert":
        check(rank == 0 or int(recv_count.sum()) == 0, f"ll skew one_expert: rank {rank} received rows")
    if isinstance(skew, str) and skew.startswith("avoid_rank") and rank == num_ranks - 1:
        check(int(recv_count.sum()) == 0, "ll avoided rank: expected no rows")

    for mode in combine_modes:
        ys = [(rng.standard_normal((e_local, num_ranks * tmax, hidden), dtype=np.float32) * np.float32(y_scale))
              .astype(BF16) for _ in range(num_ranks)]
        want_c = ref.low_latency_combine(ys, idxs, ws, wants, num_experts, use_logfmt)[rank]
        lf = {"use_logfmt": True} if use_logfmt else {}
        y = ll_layout_y(buf, handle, want, ys[rank], num_experts)
        name = f"ll combine ({mode})"
        if mode == "plain":
            got, event, h = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, **lf)
            check(h is None, f"{name}: expected hook None")
        elif mode == "zero_copy":
            target = buf.get_next_low_latency_combine_buffer(handle)
            check(target.shape == y.shape and target.dtype == BF16,
                  f"{name}: combine buffer {list(target.shape)} {target.dtype}, expected {list(y.shape)} bf16")
            target[...] = y
            poison = np.full_like(y, np.nan)       # zero_copy must read the buffer, not x
            got, event, h = buf.low_latency_combine(poison, idxs[rank], ws[rank], handle, zero_copy=True, **lf)
        elif mode == "out":
            out = np.full((counts[rank], hidden), np.nan, dtype=np.float32).astype(BF16)   # poisoned
            got, event, h = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, out=out, **lf)
            check(got is out, f"{name}: expected the out array back")
        elif mode == "hook":
            got, event, h = buf.low_latency_combine(y, idxs[rank], ws[rank], handle, return_recv_hook=True, **lf)
            check(callable(h), f"{name}: expected a callable hook")
            check_ll_event(h(), f"{name}: hook()")
        else:
            raise ValueError(mode)
        check_ll_event(event, f"{name}: event")
        expect(assert_bf16_close, got, want_c, name)


def ll_two_in_flight(buf, rng, hidden=256, num_topk=2, experts_per_rank=2):
    """Two dispatches (hooks) issued before either combine: the two combine buffers must not alias."""
    rank, num_ranks = buf.rank, buf.num_ranks
    num_experts = experts_per_rank * num_ranks
    counts = token_counts(num_ranks, "mixed2")
    tmax = max(counts) + 1
    runs = []
    for _ in range(2):
        xs, idxs, ws = normal_inputs(rng, num_ranks, counts, hidden, num_topk, num_experts, drop=0.1)
        out = buf.low_latency_dispatch(xs[rank], idxs[rank], tmax, num_experts, use_fp8=False, return_recv_hook=True)
        runs.append((xs, idxs, ws, out))
    for xs, idxs, ws, (recv_x, recv_count, handle, _, hook) in runs:
        check_ll_event(hook(), "ll in-flight dispatch hook()")
    targets = []
    for i, (xs, idxs, ws, (recv_x, recv_count, handle, _, _)) in enumerate(runs):
        wants = ref.low_latency_dispatch(xs, idxs, tmax, num_experts, use_fp8=False)
        check_ll_dispatch(buf, recv_x, recv_count, handle, wants[rank], xs, tmax, hidden, num_experts, False, False)
        ys = [rng.standard_normal(recv_x.shape, dtype=np.float32).astype(BF16) for _ in range(num_ranks)]
        target = buf.get_next_low_latency_combine_buffer(handle)
        target[...] = ll_layout_y(buf, handle, wants[rank], ys[rank], num_experts)
        targets.append((target, idxs, ws, handle, ref.low_latency_combine(ys, idxs, ws, wants, num_experts)[rank]))
    check(not np.shares_memory(targets[0][0], targets[1][0]),
          "get_next_low_latency_combine_buffer: two in-flight dispatches got the same buffer")
    for i, (target, idxs, ws, handle, want_c) in enumerate(targets):
        got, _, _ = buf.low_latency_combine(None, idxs[rank], ws[rank], handle, zero_copy=True)
        expect(assert_bf16_close, got, want_c, f"ll combine of in-flight dispatch {i}")


# ---------------------------------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------------------------------

ALL_COMBINES = ((None, False), ("one", False), ("pair", True), (None, True))

CASES = [
    ("dispatch bf16 top-k + combines + cached", lambda b, g: normal_case(b, g, combines=ALL_COMBINES)),
    ("dispatch bf16 top-k, tokens mixed2, H=256 K=2", lambda b, g: normal_case(
        b, g, tokens="mixed2", hidden=256, num_topk=2, experts_per_rank=4, drop=0.25, combines=(("pair", True),))),
    ("dispatch bf16 no top-k", lambda b, g: normal_case(b, g, with_topk=False, combines=((None, False), ("one", False)))),
    ("dispatch fp8 top-k (column-major scales)", lambda b, g: normal_case(
        b, g, fp8=True, combines=(("pair", True),))),
    ("dispatch fp8 no top-k", lambda b, g: normal_case(b, g, tokens="mixed2", hidden=256, fp8=True, with_topk=False)),
    ("dispatch expert_alignment=4", lambda b, g: normal_case(b, g, alignment=4, drop=0.1, combines=())),
    ("dispatch num_worst_tokens bf16", lambda b, g: normal_case(
        b, g, worst="auto", combines=((None, True), ("one", False)))),
    ("dispatch num_worst_tokens fp8 no top-k", lambda b, g: normal_case(
        b, g, tokens="mixed2", worst="auto", fp8=True, with_topk=False)),
    ("dispatch tiny token counts", lambda b, g: normal_case(b, g, tokens="tiny", hidden=256, combines=ALL_COMBINES)),
    ("skew: all tokens to expert 0", lambda b, g: normal_case(
        b, g, skew="one_expert", combines=(("pair", True),), hidden=256)),
    ("skew: last rank receives nothing", lambda b, g: normal_case(
        b, g, tokens="mixed2", skew="avoid_rank", num_topk=2, drop=0.3, combines=(("one", True),), hidden=256)),
    ("ll bf16", lambda b, g: ll_case(b, g)),
    ("ll bf16 + recv hook + stats", lambda b, g: ll_case(b, g, tokens="mixed2", hidden=256, hook=True, stats=True,
                                                         combine_modes=("hook", "plain"))),
    ("ll fp8", lambda b, g: ll_case(b, g, use_fp8=True, stats=True, combine_modes=("plain", "zero_copy"))),
    ("ll fp8 + recv hook", lambda b, g: ll_case(b, g, tokens="mixed2", use_fp8=True, hook=True,
                                                combine_modes=("out",))),
    ("ll fp8 round_scale", lambda b, g: ll_case(b, g, use_fp8=True, round_scale=True, combine_modes=("hook",))),
    ("ll fp8 round_scale ue8m0 H=512", lambda b, g: ll_case(
        b, g, use_fp8=True, round_scale=True, use_ue8m0=True, hook=True, stats=True, combine_modes=("zero_copy",))),
    ("ll fp8 round_scale ue8m0 H=384", lambda b, g: ll_case(
        b, g, tokens="mixed2", hidden=384, use_fp8=True, round_scale=True, use_ue8m0=True, combine_modes=("plain",))),
    ("ll skew: all tokens to expert 0", lambda b, g: ll_case(b, g, hidden=256, skew="one_expert", drop=0.0,
                                                             combine_modes=("plain",))),
    ("ll skew: last rank receives nothing", lambda b, g: ll_case(
        b, g, tokens="mixed2", hidden=256, num_topk=2, skew="avoid_rank", use_fp8=True, combine_modes=("out",))),
    ("ll tiny token counts, Tmax=3", lambda b, g: ll_case(b, g, tokens="tiny", hidden=256, tmax=3, num_topk=2,
                                                          combine_modes=("plain", "hook"))),
    ("ll two dispatches in flight", lambda b, g: ll_two_in_flight(b, g)),
    # LogFMT: y * 0.2 casts most chunks (amax < 1), y * 1 leaves most raw; hidden 1536 has 512-channel chunks.
    ("ll logfmt H=1536", lambda b, g: ll_case(b, g, hidden=1536, use_logfmt=True, y_scale=0.2)),
    ("ll logfmt fp8 H=1024 mixed casts", lambda b, g: ll_case(b, g, tokens="mixed2", hidden=1024, use_fp8=True,
                                                              use_logfmt=True, y_scale=0.3,
                                                              combine_modes=("zero_copy", "hook"))),
]


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    only = args[0] if args else ""               # optional: run only the cases whose name contains this
    # A rank that fails inside a call strands its peers; a short bound turns that into CommTimeoutError quickly.
    os.environ.setdefault("EPCOMM_TIMEOUT_S", "10")
    t_start = time.perf_counter()
    buf = epcomm.Buffer(None, backend="cpu")
    rank, num_ranks = buf.rank, buf.num_ranks
    cases = [(name, fn) for name, fn in CASES if only in name]
    outcomes = []                                  # per case: None (passed) or what failed on this rank
    for name, fn in cases:
        rng = np.random.default_rng(zlib.crc32(name.encode()) + 7919 * num_ranks)   # the same on every rank
        FAILURES.clear()
        try:
            fn(buf, rng)
        except Exception as exc:                    # noqa: BLE001 - an API call raised: report it by name
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            FAILURES.append(detail + "\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:]))
        if FAILURES:
            more = f"\n  ... and {len(FAILURES) - 5} more" if len(FAILURES) > 5 else ""
            detail = "\n  ".join(FAILURES[:5]) + more
            print(f"[rank {rank}/{num_ranks}] FAIL {name}:\n  {detail}", file=sys.stderr, flush=True)
            outcomes.append(detail)
        else:
            outcomes.append(None)
    everyone = buf.group.allgather(outcomes)       # an MPI collective: works even after an exchange() failed
    failed = [i for i in range(len(cases)) if any(o[i] is not None for o in everyone)]
    if rank == 0:
        for i in failed:
            print(f"FAILED: {cases[i][0]} (ranks {[r for r, o in enumerate(everyone) if o[i] is not None]})")
        print(f"cpu_api_check: {num_ranks} ranks, {len(cases)} cases, {time.perf_counter() - t_start:.1f} s")
        print(f"{len(cases) - len(failed)} passed, {len(failed)} failed", flush=True)
    buf.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
