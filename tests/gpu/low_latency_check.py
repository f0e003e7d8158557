"""Low-latency mode on GPUs against the numpy reference (mpirun -n N; several ranks per GPU allowed).

Every rank makes ALL ranks' inputs from one seed, so expected values need no communication. Outputs come from CuPy's
pool, poisoned before each case so that unwritten rows show. Dispatch: recv_count, layout_range and the unused rows'
src_info bit-exact; rows compared per (expert, source) block after sorting by src_info (order inside a block is
unspecified): bf16 bit-exact, FP8 data and scales bit-exact, or (reported) dequantised calc_diff < 9e-4. Combine:
the "expert" scales each received row by a per-expert factor (rows past the count are NaN-poisoned, so reading one
shows), and the result is compared with reference.low_latency_combine_* at calc_diff < 1e-5 (bit-exactness is reported).
--quick: a few cases; --oversubscribed: small shapes for several ranks per GPU (correctness only)."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import Cases, capture_graph, check_args, exit_with, expect_timeout, poison_pool, replay_graph  # noqa: E402

import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.group import Group  # noqa: E402
from epcomm.testing import assert_bitwise_equal, calc_diff, make_rank_inputs  # noqa: E402

args = check_args()

group = Group()
R, rank = group.size, group.rank
cases = Cases(group.comm)
TMAX = 32 if args.oversubscribed else 128
BIG_T = TMAX                                    # "128 tokens" (32 when oversubscribed)
H_MAX = 2048 if args.oversubscribed else 7168
E_CHOICES = [16, 64] if args.oversubscribed else [16, 64, 256, 288]
E_MAX = max(e for e in E_CHOICES if e % R == 0) if any(e % R == 0 for e in E_CHOICES) else R
log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)


def new_buffer():
    return epcomm.Buffer(group, num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, H_MAX, R, E_MAX),
                         low_latency_mode=True, backend="gpu")


buf = new_buffer()
log(f"low_latency_check: {R} ranks, Tmax {TMAX}, buffer {buf.num_rdma_bytes / 2**30:.2f} GiB/rank")


def tokens_of(kind):
    """Tokens per rank: 'big' = BIG_T everywhere; 'mixed' = 0, 1, BIG_T, BIG_T, ...; 'one' = 1 everywhere."""
    if kind == "big":
        return [BIG_T] * R
    if kind == "mixed":
        return [[0, 1][r] if r < 2 else BIG_T for r in range(R)] if R > 1 else [1]
    if kind == "one":
        return [1] * R
    raise ValueError(kind)


def expert_factor(global_expert):
    return np.float32(1.0 + (global_expert % 7) / 8.0)


def expert_rows(data, scales, fp8, ue8m0, global_expert):
    """The test's expert: float32 rows (dequantised for FP8) times a per-expert factor, rounded to bf16."""
    if fp8:
        f = ref.per_token_cast_back(np.ascontiguousarray(data).view(ref.fp8), np.ascontiguousarray(scales), ue8m0)
    else:
        f = np.asarray(data).astype(np.float32)
    return (f * expert_factor(global_expert)).astype(ref.bf16)


def make_inputs(seed, tokens, h, k, e, skew=None, drop=0.1):
    """epcomm.testing.make_rank_inputs with some top-k entries -1 by default (issue 4's matrix)."""
    return make_rank_inputs(seed, tokens, h, k, e, skew=skew, drop=drop)


def check_dispatch(recv_x, recv_count, handle, want, fp8, ue8m0, tmax, tag):
    """Compares one rank's dispatch outputs with the reference; returns the host (data, scales) in GPU row order."""
    e_local = want.recv_count.shape[0]
    rows = R * tmax
    assert_bitwise_equal(recv_count.get(), want.recv_count, f"{tag}: recv_count")
    lr = handle.layout_range.get()
    assert_bitwise_equal(lr, want.layout_range, f"{tag}: layout_range")
    src = handle.src_info.get()
    if fp8:
        data, scales_dev = recv_x
        cols = scales_dev.shape[2]
        assert scales_dev.shape == (e_local, rows, cols) and scales_dev.strides == (cols * rows * 4, 4, rows * 4), \
            f"{tag}: scales must be a column-major view, got shape {scales_dev.shape} strides {scales_dev.strides}"
        data, scales = data.get(), scales_dev.get()
        wdata, wscales = want.recv_x[0].view(np.uint8), np.ascontiguousarray(want.recv_x[1])
    else:
        data, scales = recv_x.view(cp.uint16).get().view(ref.bf16), None  # bf16 crosses as its bits
        wdata, wscales = want.recv_x, None
    assert data.shape == (e_local, rows, wdata.shape[2]), f"{tag}: recv_x shape {data.shape}"
    inexact = 0
    for j in range(e_local):
        n = int(want.recv_count[j])
        assert (src[j, n:] == -1).all(), f"{tag}: expert {j}: src_info past the count must be -1"
        counts = (lr[j] & 0xFFFFFFFF).astype(np.int64)
        source = np.repeat(np.arange(R), counts)
        perm = np.lexsort((src[j, :n], source))  # canonical order: (source rank, source token)
        assert_bitwise_equal(src[j, :n][perm], want.src_info[j, :n], f"{tag}: expert {j}: src_info")
        got = data[j, :n][perm]
        if not fp8:
            assert_bitwise_equal(got, wdata[j, :n], f"{tag}: expert {j}: recv_x rows")
            continue
        gs = scales[j, :n][perm]
        if np.array_equal(got, wdata[j, :n]) and np.array_equal(gs.view(np.uint32), wscales[j, :n].view(np.uint32)):
            continue
        inexact += int((got != wdata[j, :n]).sum())
        deq_g = ref.per_token_cast_back(got.view(ref.fp8), gs, ue8m0)
        deq_w = ref.per_token_cast_back(wdata[j, :n].view(ref.fp8), wscales[j, :n], ue8m0)
        diff = calc_diff(deq_g, deq_w)
        assert diff < 9e-4, f"{tag}: expert {j}: FP8 rows differ beyond tolerance (dequantised calc_diff {diff:.2e})"
    if inexact:
        print(f"rank {rank}: {tag}: FP8 not bit-exact ({inexact} bytes differ) but within calc_diff < 9e-4",
              flush=True)
    return data, scales


def combine_input(data, scales, recv_count, fp8, ue8m0, h):
    """Device [E_local, R*Tmax, H] bf16: the expert's rows for the valid rows, NaN past each expert's count."""
    e_local, rows = data.shape[0], data.shape[1]
    y = cp.full((e_local, rows, h), 0x7FC0, dtype=cp.uint16)  # bf16 quiet NaN
    for j in range(e_local):
        n = int(recv_count[j])
        if n:
            rows_j = expert_rows(data[j, :n], None if scales is None else scales[j, :n], fp8, ue8m0,
                                 rank * e_local + j)
            y[j, :n] = cp.asarray(rows_j.view(np.uint16))
    return y.view(ref.bf16)


def reference_combine(want_all, idxs, ws, fp8, ue8m0, e):
    """reference.low_latency_combine for this rank, built one expert rank at a time (bounded host memory)."""
    msgs = []
    for r, res in enumerate(want_all):
        e_local = res.recv_count.shape[0]
        y = np.zeros(res.recv_x[0].shape if fp8 else res.recv_x.shape, dtype=ref.bf16)
        for j in range(e_local):
            n = int(res.recv_count[j])
            if n:
                d = res.recv_x[0][j, :n].view(np.uint8) if fp8 else res.recv_x[j, :n]
                s = res.recv_x[1][j, :n] if fp8 else None
                y[j, :n] = expert_rows(d, s, fp8, ue8m0, r * e_local + j)
        msgs.append(ref.low_latency_combine_send(y, res.src_info, res.layout_range)[rank])
        del y
    return ref.low_latency_combine_recv(msgs, idxs[rank], ws[rank], rank, R, e)


def check_combine(got, expected, tag):
    g = got.view(cp.uint16).get().view(ref.bf16)
    assert g.shape == expected.shape, f"{tag}: combined shape {g.shape} vs {expected.shape}"
    gf, ef = g.astype(np.float32), expected.astype(np.float32)
    assert np.isfinite(gf).all(), f"{tag}: combined has non-finite values (a poisoned row was read?)"
    diff = calc_diff(gf, ef)
    assert diff < 1e-5, f"{tag}: combined calc_diff {diff:.2e}"
    if not np.array_equal(g.view(np.uint16), expected.view(np.uint16)):
        print(f"rank {rank}: {tag}: combine within tolerance but not bit-exact "
              f"({int((g.view(np.uint16) != expected.view(np.uint16)).sum())} values)", flush=True)


def busy_matmul():
    a = cp.random.random((8192, 8192), dtype=cp.float32)
    for _ in range(4):
        a = a @ a
        a /= cp.float32(8192)
    return a


def receive_event(hk, async_finish, tag):
    """Runs a hook: it must return the receive's epcomm.Event; with async_finish the caller waits on that event."""
    ev = hk()
    assert isinstance(ev, epcomm.Event), f"{tag}: hook() must return an epcomm.Event, got {type(ev).__name__}"
    assert ev.framework == "cupy", f"{tag}: hook()'s event is for {ev.framework!r}, expected the caller's 'cupy'"
    if async_finish:
        ev.synchronize()
        assert ev.query(), f"{tag}: the hook's event is not complete after synchronize()"


def ll_case(h, k, e, tokens="big", fp8=False, round_scale=False, ue8m0=False, hook=False, zero_copy=False,
            drop=0.1, skew=None, seed=0, b=None, overlap=False, tmax=TMAX, async_finish=False, per_expert=False,
            combine_per_expert=False):
    """per_expert: dispatch sends the whole message per (token, expert), as DeepEP does (once_per_rank off).
    combine_per_expert: combine sends every (token, expert) row back, as DeepEP does (combine_once_per_rank off)."""
    b = b or buf
    before = b.set_tuning("low_latency", once_per_rank=not per_expert, combine_once_per_rank=not combine_per_expert)
    try:
        _ll_case(b, h, k, e, tokens, fp8, round_scale, ue8m0, hook, zero_copy, drop, skew, seed, overlap, tmax,
                 async_finish)
    finally:
        b.set_tuning("low_latency", **vars(before))


def _ll_case(b, h, k, e, tokens, fp8, round_scale, ue8m0, hook, zero_copy, drop, skew, seed, overlap, tmax,
             async_finish):
    if e % R:
        print(f"rank {rank}: skipped (num_experts {e} not a multiple of {R} ranks)", flush=True)
        return
    tag = f"h{h} k{k} e{e}"
    poison_pool()
    toks = tokens_of(tokens)
    xs, idxs, ws = make_inputs(seed, toks, h, k, e, skew=skew, drop=drop)
    want_all = ref.low_latency_dispatch(xs, idxs, tmax, e, fp8, round_scale, ue8m0)
    want = want_all[rank]
    e_local = e // R
    x_dev, idx_dev, w_dev = cp.asarray(xs[rank]), cp.asarray(idxs[rank]), cp.asarray(ws[rank])
    cum = cp.full(e_local, 5, cp.int32)
    wait = cp.zeros(R, cp.int64)
    recv_x, recv_count, handle, ev, hk = b.low_latency_dispatch(
        x_dev, idx_dev, tmax, e, cumulative_local_expert_recv_stats=cum, dispatch_wait_recv_cost_stats=wait,
        use_fp8=fp8, round_scale=round_scale, use_ue8m0=ue8m0, async_finish=async_finish, return_recv_hook=hook)
    if hook:
        assert hk is not None, "return_recv_hook=True must return a hook"
        if overlap:
            busy_matmul()
        receive_event(hk, async_finish, f"{tag}: dispatch")
    else:
        assert hk is None, "return_recv_hook=False must return no hook"
        if async_finish:
            ev.synchronize()
    data, scales = check_dispatch(recv_x, recv_count, handle, want, fp8, ue8m0, tmax, tag)
    assert_bitwise_equal(cum.get(), want.recv_count + 5, f"{tag}: cumulative_local_expert_recv_stats")
    assert (wait.get() >= 0).all(), f"{tag}: dispatch_wait_recv_cost_stats negative"

    y = combine_input(data, scales, want.recv_count, fp8, ue8m0, h)
    if zero_copy:
        zb = b.get_next_low_latency_combine_buffer(handle)
        assert zb.shape == y.shape and zb.dtype == y.dtype, f"{tag}: zero-copy buffer {zb.shape} {zb.dtype}"
        zb.view(cp.uint16)[...] = y.view(cp.uint16)
        combined, ev, hk = b.low_latency_combine(None, idx_dev, w_dev, handle, zero_copy=True,
                                                 async_finish=async_finish, return_recv_hook=hook)
    else:
        combined, ev, hk = b.low_latency_combine(y, idx_dev, w_dev, handle, async_finish=async_finish,
                                                 return_recv_hook=hook)
    if hook:
        if overlap:
            busy_matmul()
        receive_event(hk, async_finish, f"{tag}: combine")
    elif async_finish:
        ev.synchronize()
    check_combine(combined, reference_combine(want_all, idxs, ws, fp8, ue8m0, e), tag)


def two_in_flight():
    """Two dispatches sent before either hook (both halves in use), then two combines likewise."""
    h, k, e = 2048, 8, 64 if 64 % R == 0 else R
    poison_pool()
    sets = [make_inputs(300 + i, tokens_of("big"), h, k, e) for i in range(2)]
    wants = [ref.low_latency_dispatch(xs, idxs, TMAX, e, True) for xs, idxs, _ in sets]
    devs = [(cp.asarray(xs[rank]), cp.asarray(idxs[rank]), cp.asarray(ws[rank])) for xs, idxs, ws in sets]
    outs = [buf.low_latency_dispatch(x, i, TMAX, e, use_fp8=True, return_recv_hook=True) for x, i, _ in devs]
    for o in outs:
        o[4]()
    ys = []
    for i, (o, w) in enumerate(zip(outs, wants)):
        data, scales = check_dispatch(o[0], o[1], o[2], w[rank], True, False, TMAX, f"in-flight {i}")
        ys.append(combine_input(data, scales, w[rank].recv_count, True, False, h))
    combs = [buf.low_latency_combine(y, d[1], d[2], o[2], return_recv_hook=True) for y, d, o in zip(ys, devs, outs)]
    for c in combs:
        c[2]()
    for i, (c, (xs, idxs, ws), w) in enumerate(zip(combs, sets, wants)):
        check_combine(c[0], reference_combine(w, idxs, ws, True, False, e), f"in-flight combine {i}")


def soak(iters):
    """Many dispatch/combine pairs with fresh inputs and the same shapes: both halves reused many times."""
    h, k, e = 2048, 8, 64 if 64 % R == 0 else R
    for it in range(iters):
        xs, idxs, ws = make_inputs(1000 + it, tokens_of("big" if it % 3 else "mixed"), h, k, e)
        want_all = ref.low_latency_dispatch(xs, idxs, TMAX, e, False)
        x, idx, w = cp.asarray(xs[rank]), cp.asarray(idxs[rank]), cp.asarray(ws[rank])
        recv_x, recv_count, handle, _, _ = buf.low_latency_dispatch(x, idx, TMAX, e, use_fp8=False)
        assert_bitwise_equal(recv_count.get(), want_all[rank].recv_count, f"soak {it}: recv_count")
        combined, _, _ = buf.low_latency_combine(recv_x, idx, w, handle)
        ys = [res.recv_x for res in want_all]
        want_c = ref.low_latency_combine(ys, idxs, ws, want_all, e)[rank]
        diff = calc_diff(combined.view(cp.uint16).get().view(ref.bf16).astype(np.float32),
                         want_c.astype(np.float32))
        assert diff < 1e-5, f"soak {it}: combined calc_diff {diff:.2e}"


def cuda_graph():
    """Capture dispatch + combine once, replay 3 times with new inputs copied into the captured input arrays."""
    h, k, e = 2048, 8, 64 if 64 % R == 0 else R
    tokens = [TMAX - 7] * R
    xs, idxs, ws = make_inputs(5, tokens, h, k, e)
    x, idx, w = cp.asarray(xs[rank]), cp.asarray(idxs[rank]), cp.asarray(ws[rank])
    out = {}

    def step():
        rx, cnt, hd, _, _ = buf.low_latency_dispatch(x, idx, TMAX, e, use_fp8=False)
        c, _, _ = buf.low_latency_combine(rx, idx, w, hd)
        out.update(recv_x=rx, count=cnt, handle=hd, combined=c)

    s, graph = capture_graph(step, group)  # the eager warm-up also fixes the buffer's layout
    for rep in range(3):
        xs, idxs, ws = make_inputs(50 + rep, tokens, h, k, e)
        replay_graph(s, graph, group, [(x, xs[rank]), (idx, idxs[rank]), (w, ws[rank])])
        buf._backend.ctx.check(f"graph replay {rep}")
        want_all = ref.low_latency_dispatch(xs, idxs, TMAX, e, False)
        check_dispatch(out["recv_x"], out["count"], out["handle"], want_all[rank], False, False, TMAX,
                       f"graph replay {rep}")
        want_c = ref.low_latency_combine([res.recv_x for res in want_all], idxs, ws, want_all, e)[rank]
        check_combine(out["combined"], want_c, f"graph replay {rep} combine")


def clean_then_case():
    buf.clean_low_latency_buffer(TMAX, 2048, 16 if 16 % R == 0 else R)
    ll_case(2048, 4, 16 if 16 % R == 0 else R, fp8=True, seed=77)


def timeout_case(b):
    """One rank skips a dispatch: the others raise CommTimeoutError naming the phase, within the bound."""
    os.environ["EPCOMM_TIMEOUT_S"] = "2"
    h, k, e = 2048, 4, 16 if 16 % R == 0 else R
    xs, idxs, _ = make_inputs(9, [8] * R, h, k, e)
    # Lay the buffer out for these shapes on every rank first: a change of shapes cleans the buffer, which is
    # collective, and the rank that skips must skip the dispatch itself, not that clean.
    b.clean_low_latency_buffer(TMAX, h, e)

    def call():
        _, _, _, ev, _ = b.low_latency_dispatch(cp.asarray(xs[rank]), cp.asarray(idxs[rank]), TMAX, e)
        ev.synchronize()
        b._backend.sync()

    expect_timeout(call, group, "ll_dispatch_recv", "low_latency_dispatch")


def combine_timeout_case(b):
    """One rank skips a combine: the others' combine_send waits (bounded) for its top-k weights (once-per-rank
    combine) and raises CommTimeoutError naming phase ll_combine_send and the skipping rank, within the bound."""
    os.environ["EPCOMM_TIMEOUT_S"] = "2"
    b.set_tuning("low_latency", combine_once_per_rank=True)  # the default picks it only where K > 2R
    h, k, e = 2048, 4, 16 if 16 % R == 0 else R
    xs, idxs, ws = make_inputs(11, [8] * R, h, k, e)
    b.clean_low_latency_buffer(TMAX, h, e)
    idx_dev, w_dev = cp.asarray(idxs[rank]), cp.asarray(ws[rank])
    recv_x, _, handle, _, _ = b.low_latency_dispatch(cp.asarray(xs[rank]), idx_dev, TMAX, e, use_fp8=False)

    def call():
        _, ev, _ = b.low_latency_combine(recv_x, idx_dev, w_dev, handle)
        ev.synchronize()
        b._backend.sync()

    expect_timeout(call, group, "ll_combine_send", "low_latency_combine")


def fits(e):
    return e % R == 0


if args.oversubscribed:
    plan = [
        ("bf16_h2048_k8_e64_big", dict(h=2048, k=8, e=64)),
        ("fp8_h2048_k8_e16_mixed_hook", dict(h=2048, k=8, e=16, tokens="mixed", fp8=True, hook=True)),
        ("fp8_round_ue8m0_h2048_k4_e64_zero_copy", dict(h=2048, k=4, e=64, fp8=True, round_scale=True, ue8m0=True,
                                                        zero_copy=True)),
        ("bf16_h2048_k1_e16_one_hook_zero_copy", dict(h=2048, k=1, e=16, tokens="one", hook=True, zero_copy=True)),
        ("fp8_h2048_k8_e64_hook_async", dict(h=2048, k=8, e=64, fp8=True, hook=True, async_finish=True)),
        ("fp8_h2048_k8_e64_per_expert", dict(h=2048, k=8, e=64, fp8=True, per_expert=True)),
        ("bf16_h2048_k8_e64_mixed_hook_combine_per_expert", dict(h=2048, k=8, e=64, tokens="mixed", hook=True,
                                                                 combine_per_expert=True)),
    ]
else:
    plan = [
        ("fp8_h7168_k8_e256_big", dict(h=7168, k=8, e=256, fp8=True)),
        ("fp8_round_h7168_k8_e256_big", dict(h=7168, k=8, e=256, fp8=True, round_scale=True)),
        ("fp8_round_ue8m0_h4096_k8_e288_big", dict(h=4096, k=8, e=288, fp8=True, round_scale=True, ue8m0=True)),
        ("bf16_h7168_k8_e256_big", dict(h=7168, k=8, e=256)),
        ("bf16_h4096_k1_e16_mixed", dict(h=4096, k=1, e=16, tokens="mixed")),
        ("fp8_h2048_k1_e64_mixed_hook", dict(h=2048, k=1, e=64, tokens="mixed", fp8=True, hook=True)),
        ("fp8_h4096_k8_e64_hook_zero_copy", dict(h=4096, k=8, e=64, fp8=True, hook=True, zero_copy=True)),
        ("bf16_h2048_k8_e288_zero_copy", dict(h=2048, k=8, e=288, zero_copy=True)),
        ("fp8_round_h4096_k8_e16_hook", dict(h=4096, k=8, e=16, fp8=True, round_scale=True, hook=True)),
        ("bf16_h7168_k8_e64_hook_zero_copy", dict(h=7168, k=8, e=64, hook=True, zero_copy=True)),
        ("fp8_ue8m0_h2048_k8_e256_mixed", dict(h=2048, k=8, e=256, tokens="mixed", fp8=True, round_scale=True,
                                               ue8m0=True)),
        ("fp8_h2048_k16_e256_one", dict(h=2048, k=16, e=256, tokens="one", fp8=True)),
        ("bf16_h2048_k8_e64_nodrop", dict(h=2048, k=8, e=64, drop=0.0)),
        ("fp8_h2048_k4_e16_skew_one_expert", dict(h=2048, k=4, e=16, fp8=True, skew="one_expert")),
        ("fp8_round_ue8m0_h7168_k8_e64_hook_zero_copy", dict(h=7168, k=8, e=64, fp8=True, round_scale=True,
                                                             ue8m0=True, hook=True, zero_copy=True)),
        ("bf16_h4096_k8_e256_overlap_hook", dict(h=4096, k=8, e=256, hook=True, overlap=True)),
        ("fp8_h7168_k8_e256_overlap_hook_zero_copy", dict(h=7168, k=8, e=256, fp8=True, hook=True, overlap=True,
                                                          zero_copy=True)),
        ("fp8_h4096_k8_e64_hook_async", dict(h=4096, k=8, e=64, fp8=True, hook=True, async_finish=True)),
        ("bf16_h2048_k8_e64_zero_copy_hook_async", dict(h=2048, k=8, e=64, hook=True, zero_copy=True,
                                                        async_finish=True)),
        ("fp8_h7168_k8_e256_big_per_expert", dict(h=7168, k=8, e=256, fp8=True, per_expert=True,
                                                  combine_per_expert=True)),
        ("bf16_h4096_k8_e64_mixed_hook_per_expert", dict(h=4096, k=8, e=64, tokens="mixed", hook=True,
                                                         per_expert=True, combine_per_expert=True)),
        ("bf16_h7168_k8_e256_big_combine_per_expert", dict(h=7168, k=8, e=256, combine_per_expert=True)),
        ("fp8_h2048_k16_e288_mixed_zero_copy_combine_per_expert", dict(h=2048, k=16, e=288, tokens="mixed",
                                                                       fp8=True, zero_copy=True,
                                                                       combine_per_expert=True)),
    ]
    if args.quick:
        plan = plan[:4]
for i, (name, kw) in enumerate(plan):
    if fits(kw["e"]):
        cases.run(name, ll_case, seed=i, **kw)
cases.run("two_in_flight_hooks", two_in_flight)
cases.run("soak_x20" if (args.quick or args.oversubscribed) else "soak_x100", soak,
          20 if (args.quick or args.oversubscribed) else 100)
cases.run("cuda_graph_replay_x3", cuda_graph)
cases.run("clean_low_latency_buffer", clean_then_case)

# The NVSHMEM path for every peer: a second Buffer made with EPCOMM_FORCE_NVSHMEM=1 (the first freed first).
state = {}


def force_nvshmem_buffer():
    buf.destroy()
    os.environ["EPCOMM_FORCE_NVSHMEM"] = "1"
    state["b"] = new_buffer()
    assert state["b"].tuning("low_latency").force_nvshmem, "EPCOMM_FORCE_NVSHMEM=1 was not picked up"


cases.run("force_nvshmem_buffer", force_nvshmem_buffer)
if "b" in state:
    force_plan = [
        ("force_nvshmem_fp8_h2048_k8_e64_hook_zero_copy", dict(h=2048, k=8, e=64, fp8=True, hook=True,
                                                               zero_copy=True)),
        ("force_nvshmem_bf16_h4096_k8_e16_mixed", dict(h=4096, k=8, e=16, tokens="mixed")),
        ("force_nvshmem_fp8_round_ue8m0_h2048_k1_e64", dict(h=2048, k=1, e=64, fp8=True, round_scale=True,
                                                            ue8m0=True)),
    ]
    if not args.oversubscribed:
        force_plan.append(("force_nvshmem_fp8_h7168_k8_e256_big", dict(h=7168, k=8, e=256, fp8=True)))
    for i, (name, kw) in enumerate(force_plan):
        if fits(kw["e"]):
            cases.run(name, ll_case, seed=500 + i, b=state["b"], **kw)
    if R > 1:
        cases.run("timeout_names_phase", timeout_case, state["b"])
    else:
        cases.skip("timeout_names_phase", "a timeout needs a second rank that skips the call")


def combine_timeout_buffer():
    """A fresh Buffer on direct NVLink stores (the once-per-rank combine's weight wait lives only there)."""
    old = state.pop("b")
    try:
        old.destroy()
    except Exception as exc:  # poisoned by the timeout case; teardown must still work
        print(f"rank {rank}: destroy raised {exc}", flush=True)
    os.environ.pop("EPCOMM_FORCE_NVSHMEM", None)
    state["b"] = epcomm.Buffer(group, num_rdma_bytes=epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, 2048, R, 16),
                               low_latency_mode=True, backend="gpu")
    assert not state["b"].tuning("low_latency").force_nvshmem


if R > 1 and "b" in state:
    cases.run("combine_timeout_buffer", combine_timeout_buffer)
    if "b" in state:
        cases.run("combine_timeout_names_phase", combine_timeout_case, state["b"])
elif R == 1:
    cases.skip("combine_timeout_names_phase", "a timeout needs a second rank that skips the call")
code = cases.finish()
try:
    if "b" in state:
        state["b"].destroy()
    else:
        buf.destroy()
except Exception as exc:  # after the timeout case the buffer is poisoned; teardown must still work
    print(f"rank {rank}: destroy raised {exc}", flush=True)
group.close()
exit_with(code)
