"""epcomm.jax across ranks (CPU backend): jax.jit results against the eager Buffer API bit for bit (dispatch, combine,
cached dispatch, the low-latency pair, two independent dispatches in one program), jax.grad of dispatch -> expert ->
combine against a single-process JAX reference of every rank and against finite differences (inputs of small integers
and quarters, so bf16 is exact and a difference of 1 is the gradient exactly), and jit-ed gradients against eager ones.

Launch:  mpiexec -n 2 python tests/mpi/jax_check.py      (needs jax; JAX_PLATFORMS=cpu)
Prints 'N passed, M failed, K skipped' (rank 0); exit 1 if any failed.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import Cases  # noqa: E402
from mpi4py import MPI  # noqa: E402

import epcomm  # noqa: E402
import epcomm.jax as epj  # noqa: E402

H, K = 16, 2


def inputs(seed: int, R: int, E: int, T: int, exact: bool):
    """All ranks' (x [T, H] bf16, topk_idx [T, K] int32, topk_weights [T, K] float32, G [T, H], Gw [T, K]) from one
    seed, as numpy. exact: integers and quarters (bf16 and float32 sums stay exact)."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(R):
        if exact:
            x = g.integers(-4, 5, (T, H)).astype(jnp.bfloat16)
            w = (g.integers(0, 5, (T, K)) / 4).astype(np.float32)
            gx = g.integers(-3, 4, (T, H)).astype(np.float32)
            gw = g.integers(-3, 4, (T, K)).astype(np.float32)
        else:
            x = g.standard_normal((T, H)).astype(jnp.bfloat16)
            w = g.random((T, K), np.float32)
            gx, gw = g.standard_normal((T, H)).astype(np.float32), g.standard_normal((T, K)).astype(np.float32)
        idx = np.stack([g.permutation(E)[:K] for _ in range(T)]).astype(np.int32) if T else np.zeros((0, K), np.int32)
        idx[g.random((T, K)) < 0.2] = -1             # some slots unused, some tokens sent nowhere
        out.append((x, idx, w, gx, gw))
    return out


def expert(recv_x, recv_w):
    """The stand-in expert: depends on the rows and on their weights (so both gradients flow through it)."""
    return (recv_x.astype(jnp.float32) * (1 + recv_w.sum(1, keepdims=True))).astype(jnp.bfloat16)


def loss_of(combined, combined_w, gx, gw):
    return (combined.astype(jnp.float32) * gx).sum() + (combined_w * gw).sum()


def epcomm_loss(buf, E, worst):
    def f(x, idx, w, gx, gw):
        recv_x, _, recv_w, handle, _ = epj.dispatch(buf, x, idx, w, num_experts=E, num_worst_tokens=worst)
        combined, combined_w = epj.combine(buf, expert(recv_x, recv_w), handle, recv_w)
        return loss_of(combined, combined_w, gx, gw)
    return f


def reference_loss(all_inputs, E, xs, ws):
    """Every rank's step in one process with jnp ops (epcomm.reference's semantics): the summed loss as a function of
    every rank's x and w (the routing is static)."""
    R = len(all_inputs)
    e_local = E // R
    in_rank = [np.stack([((a[1] >= 0) & (a[1] // e_local == r)).any(1) for r in range(R)], 1) for a in all_inputs]
    acc = [jnp.zeros((a[0].shape[0], H), jnp.float32) for a in all_inputs]
    acc_w = [jnp.zeros((a[0].shape[0], K), jnp.float32) for a in all_inputs]
    for r in range(R):
        rows = [np.nonzero(in_rank[s][:, r])[0] for s in range(R)]
        recv_x = jnp.concatenate([xs[s][rows[s]] for s in range(R)])
        local = np.concatenate([(all_inputs[s][1][rows[s]] >= 0) & (all_inputs[s][1][rows[s]] // e_local == r)
                                for s in range(R)])
        recv_w = jnp.where(local, jnp.concatenate([ws[s][rows[s]] for s in range(R)]), 0.0)
        y = expert(recv_x, recv_w)
        begin = 0
        for s in range(R):
            n = len(rows[s])
            acc[s] = acc[s].at[rows[s]].add(y[begin:begin + n].astype(jnp.float32))
            acc_w[s] = acc_w[s].at[rows[s]].add(recv_w[begin:begin + n])
            begin += n
    return sum(loss_of(acc[s].astype(jnp.bfloat16), acc_w[s], a[3], a[4]) for s, a in enumerate(all_inputs))


def assert_equal(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: jit gives {list(got.shape)} {got.dtype}, eager {list(want.shape)} {want.dtype}")
    bits = {2: np.uint16, 4: np.uint32, 8: np.uint64, 1: np.uint8}[got.dtype.itemsize]
    diff = np.argwhere(got.view(bits) != want.view(bits))
    if len(diff):
        at = tuple(int(i) for i in diff[0])
        raise AssertionError(f"{name}: {len(diff)} elements differ, first at {at}: jit {got[at]}, eager {want[at]}")


def case_jit_vs_eager(buf, rank, R, seed, T, E, worst):
    """dispatch -> combine -> cached dispatch, jit-ed, against the plain Buffer calls on JAX arrays."""
    x, idx, w, _, _ = (jnp.asarray(a) for a in inputs(seed, R, E, T, exact=False)[rank])
    y_scale = jnp.float32(3)

    def step(x, idx, w):
        recv_x, recv_idx, recv_w, handle, per_expert = epj.dispatch(buf, x, idx, w, num_experts=E,
                                                                    num_worst_tokens=worst)
        combined, combined_w = epj.combine(buf, (recv_x * y_scale).astype(jnp.bfloat16), handle, recv_w)
        again = epj.cached_dispatch(buf, combined, handle)
        return recv_x, recv_idx, recv_w, per_expert, handle.num_recv_tokens, combined, combined_w, again

    got = jax.jit(step)(x, idx, w)
    layout = buf.get_dispatch_layout(idx, E)
    recv_x, recv_idx, recv_w, _, handle, _ = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_tokens_per_rank=layout[0], num_tokens_per_rdma_rank=layout[1],
        is_token_in_rank=layout[3], num_tokens_per_expert=layout[2], num_worst_tokens=worst)
    combined, combined_w, _ = buf.combine((recv_x * y_scale).astype(jnp.bfloat16), handle, topk_weights=recv_w)
    again = buf.dispatch(combined, handle=handle)[0]
    per_list = buf.dispatch(x, topk_idx=idx, topk_weights=w, is_token_in_rank=layout[3],
                            num_tokens_per_expert=layout[2])[3]            # the unpadded call's per-expert list
    want = (recv_x, recv_idx.astype(jnp.int32), recv_w, np.array(per_list, np.int32),
            np.array(handle.num_recv_tokens, np.int32), combined, combined_w, again)
    for name, a, b in zip(("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert",
                           "num_recv_tokens", "combined_x", "combined_topk_weights", "cached recv_x"), got, want):
        assert_equal(name, a, b)


def case_two_dispatches_in_order(buf, rank, R, seed, E):
    """Two independent dispatches (and their combines) in one program: XLA must keep them in program order on every
    rank (ordered callbacks), or the ranks would pair one rank's first with another's second."""
    (x1, i1, w1, _, _), (x2, i2, w2, _, _) = (
        tuple(jnp.asarray(a) for a in inputs(seed + j, R, E, 5 + 3 * j, exact=False)[rank]) for j in range(2))

    def step(x1, i1, w1, x2, i2, w2):
        a = epj.dispatch(buf, x1, i1, w1, num_experts=E, num_worst_tokens=5 * R)
        b = epj.dispatch(buf, x2, i2, w2, num_experts=E, num_worst_tokens=8 * R)
        return (a[0], b[0], epj.combine(buf, b[0], b[3])[0], epj.combine(buf, a[0], a[3])[0])

    got = jax.jit(step)(x1, i1, w1, x2, i2, w2)
    want = []
    for x, i, w, worst in ((x1, i1, w1, 5 * R), (x2, i2, w2, 8 * R)):
        lay = buf.get_dispatch_layout(i, E)
        want.append(buf.dispatch(x, topk_idx=i, topk_weights=w, is_token_in_rank=lay[3], num_tokens_per_expert=lay[2],
                                 num_worst_tokens=worst))
    cb = buf.combine(want[1][0], want[1][4])[0]
    ca = buf.combine(want[0][0], want[0][4])[0]
    for name, a, b in zip(("first recv_x", "second recv_x", "second combined", "first combined"), got,
                          (want[0][0], want[1][0], cb, ca)):
        assert_equal(name, a, b)


def case_low_latency_jit_vs_eager(buf, rank, R, seed, E):
    x, idx, w, _, _ = (jnp.asarray(a) for a in inputs(seed, R, E, 6, exact=False)[rank])

    def step(x, idx, w):
        recv_x, count, hid = epj.low_latency_dispatch(buf, x, idx, 8, E)
        return recv_x, count, epj.low_latency_combine(buf, (recv_x * 2).astype(jnp.bfloat16), idx, w, hid)

    got = jax.jit(step)(x, idx, w)
    recv_x, count, handle, _, _ = buf.low_latency_dispatch(x, idx, 8, E, use_fp8=False)
    recv_x = jnp.asarray(np.array(recv_x))     # a view of the buffer: copy before the combine reuses it
    combined = buf.low_latency_combine((recv_x * 2).astype(jnp.bfloat16), idx, w, handle)[0]
    # Rows past each (expert, source) block's count are not written by the eager call's buffer: compare counts and
    # the combine (which reads only written rows), and the written rows of recv_x.
    assert_equal("recv_count", got[1], count)
    assert_equal("combined_x", got[2], combined)
    src = np.asarray(handle.layout_range)
    for e in range(src.shape[0]):
        for s in range(src.shape[1]):
            begin, n = int(src[e, s]) >> 32, int(src[e, s]) & 0xFFFFFFFF
            assert_equal(f"recv_x[{e}] from rank {s}", np.asarray(got[0])[e, begin:begin + n],
                         np.asarray(recv_x)[e, begin:begin + n])


def case_grad_vs_reference(buf, rank, R, seed, T, E, worst):
    data = inputs(seed, R, E, T, exact=False)
    x, idx, w, gx, gw = (jnp.asarray(a) for a in data[rank])
    gx_, gw_ = jax.jit(jax.grad(epcomm_loss(buf, E, worst), argnums=(0, 2)))(x, idx, w, gx, gw)
    xs, ws = [jnp.asarray(a[0]) for a in data], [jnp.asarray(a[2]) for a in data]
    rx, rw = jax.grad(lambda xs, ws: reference_loss(data, E, xs, ws), argnums=(0, 1))(xs, ws)
    np.testing.assert_allclose(np.asarray(gx_, np.float32), np.asarray(rx[rank], np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(gw_), np.asarray(rw[rank]), rtol=1e-4, atol=1e-4)


def case_grad_jit_vs_eager(buf, rank, R, seed, T, E, worst):
    """jax.grad of dispatch -> combine -> cached dispatch, jit-ed and not, bit for bit (every backward rule runs)."""
    x, idx, w, gx, gw = (jnp.asarray(a) for a in inputs(seed, R, E, T, exact=False)[rank])

    def f(x, w):
        recv_x, _, recv_w, handle, _ = epj.dispatch(buf, x, idx, w, num_experts=E, num_worst_tokens=worst)
        combined, combined_w = epj.combine(buf, expert(recv_x, recv_w), handle, recv_w)
        again = epj.cached_dispatch(buf, combined, handle)
        return loss_of(combined, combined_w, gx, gw) + again.astype(jnp.float32).sum()

    got = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
    want = jax.grad(f, argnums=(0, 1))(x, w)
    assert_equal("grad x", got[0], want[0])
    assert_equal("grad topk_weights", got[1], want[1])


def case_finite_differences(buf, comm, rank, R, seed, T, E, worst, probes=4):
    """d(sum of every rank's loss)/d(one input element), by a difference of 1 in x or 1/4 in w (exact here)."""
    x, idx, w, gx, gw = inputs(seed, R, E, T, exact=True)[rank]
    loss = jax.jit(epcomm_loss(buf, E, worst))
    gxa, gwa = (np.asarray(a, np.float64) for a in jax.jit(jax.grad(epcomm_loss(buf, E, worst), argnums=(0, 2)))(
        x, idx, w, gx, gw))

    def total(x, w):
        return comm.allreduce(float(loss(x, idx, w, gx, gw)))

    base = total(x, w)
    g = np.random.default_rng(seed + 7)
    wrong = []
    for src in range(R):
        for _ in range(probes):
            t, h, k = (int(g.integers(0, n)) for n in (T, H, K))
            xp = x.copy()
            if rank == src:
                xp[t, h] += 1
            fd = total(xp, w) - base
            if rank == src and fd != gxa[t, h]:
                wrong.append(f"d loss / d x[{t}, {h}] of rank {src}: jax.grad {gxa[t, h]}, finite difference {fd}")
            wp = w.copy()
            if rank == src:
                wp[t, k] += 0.25
            fd = (total(x, wp) - base) * 4
            if rank == src and fd != gwa[t, k]:
                wrong.append(f"d loss / d w[{t}, {k}] of rank {src}: jax.grad {gwa[t, k]}, finite difference {fd}")
    if wrong:   # raised after every probe, so that no rank leaves the others waiting in a collective
        raise AssertionError("; ".join(wrong[:4]))


LL_TMAX = 8


def ll_inputs(seed, R, E, T, exact, repeats):
    """inputs() for the low-latency pair; repeats: some tokens send two of their k's to one expert."""
    data = inputs(seed, R, E, T, exact)
    if repeats:
        for a in data:
            a[1][::3, 1] = a[1][::3, 0]
    return data


def ll_scale(E):
    """The stand-in low-latency expert: global expert e multiplies its rows by 1 + e % 3 (exact in bf16)."""
    return 1 + jnp.arange(E, dtype=jnp.float32) % 3


def ll_loss(buf, E, R):
    e_local = E // R

    def f(x, idx, w, gx):
        recv_x, _, hid = epj.low_latency_dispatch(buf, x, idx, LL_TMAX, E)
        c = ll_scale(E)[buf.rank * e_local:(buf.rank + 1) * e_local]
        y = (recv_x.astype(jnp.float32) * c[:, None, None]).astype(jnp.bfloat16)
        return (epj.low_latency_combine(buf, y, idx, w, hid).astype(jnp.float32) * gx).sum()
    return f


def ll_reference_loss(data, E, xs, ws):
    """Every rank's low-latency step densely: out[t] = bf16(sum over k of w[t, k] * bf16(x[t] * c[topk_idx[t, k]]))."""
    c = ll_scale(E)
    total = 0.0
    for a, x, w in zip(data, xs, ws):
        idx, gx = jnp.asarray(a[1]), jnp.asarray(a[3])
        acc = jnp.zeros(x.shape, jnp.float32)
        for k in range(idx.shape[1]):
            y = (x.astype(jnp.float32) * c[jnp.maximum(idx[:, k], 0)][:, None]).astype(jnp.bfloat16)
            acc = acc + jnp.where(idx[:, k:k + 1] >= 0, w[:, k:k + 1] * y.astype(jnp.float32), 0.0)
        total = total + (acc.astype(jnp.bfloat16).astype(jnp.float32) * gx).sum()
    return total


def case_ll_grad_vs_reference(buf, rank, R, seed, T, E, repeats):
    data = ll_inputs(seed, R, E, T, False, repeats)
    x, idx, w, gx, _ = (jnp.asarray(a) for a in data[rank])
    gx_, gw_ = jax.jit(jax.grad(ll_loss(buf, E, R), argnums=(0, 2)))(x, idx, w, gx)
    xs, ws = [jnp.asarray(a[0]) for a in data], [jnp.asarray(a[2]) for a in data]
    rx, rw = jax.grad(lambda xs, ws: ll_reference_loss(data, E, xs, ws), argnums=(0, 1))(xs, ws)
    np.testing.assert_allclose(np.asarray(gx_, np.float32), np.asarray(rx[rank], np.float32), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(gw_), np.asarray(rw[rank]), rtol=1e-4, atol=1e-4)


def case_ll_grad_jit_vs_eager(buf, rank, R, seed, T, E, repeats):
    x, idx, w, gx, _ = (jnp.asarray(a) for a in ll_inputs(seed, R, E, T, False, repeats)[rank])
    f = jax.grad(ll_loss(buf, E, R), argnums=(0, 2))
    got, want = jax.jit(f)(x, idx, w, gx), f(x, idx, w, gx)
    assert_equal("grad x", got[0], want[0])
    assert_equal("grad topk_weights", got[1], want[1])


def case_ll_finite_differences(buf, comm, rank, R, seed, T, E, repeats, probes=4):
    """As case_finite_differences, through low_latency_dispatch -> expert -> low_latency_combine."""
    x, idx, w, gx, _ = ll_inputs(seed, R, E, T, True, repeats)[rank]
    loss = jax.jit(ll_loss(buf, E, R))
    gxa, gwa = (np.asarray(a, np.float64) for a in jax.jit(jax.grad(ll_loss(buf, E, R), argnums=(0, 2)))(
        x, idx, w, gx))

    def total(x, w):
        return comm.allreduce(float(loss(x, idx, w, gx)))

    base = total(x, w)
    g = np.random.default_rng(seed + 7)
    wrong = []
    for src in range(R):
        for _ in range(probes):
            t, h, k = (int(g.integers(0, n)) for n in (T, H, K))
            xp, wp = x.copy(), w.copy()
            if rank == src:
                xp[t, h] += 1
                wp[t, k] += 0.25
            fd = total(xp, w) - base
            if rank == src and fd != gxa[t, h]:
                wrong.append(f"d loss / d x[{t}, {h}] of rank {src}: jax.grad {gxa[t, h]}, finite difference {fd}")
            fd = (total(x, wp) - base) * 4
            if rank == src and fd != gwa[t, k]:
                wrong.append(f"d loss / d w[{t}, {k}] of rank {src}: jax.grad {gwa[t, k]}, finite difference {fd}")
    if wrong:
        raise AssertionError("; ".join(wrong[:4]))


def main() -> int:
    comm = MPI.COMM_WORLD
    rank, R = comm.rank, comm.size
    cases = Cases(comm)
    buf = epcomm.Buffer(comm, backend="cpu")
    E = 4 * R
    for T in (8, 1, 0, 17):
        cases.run(f"jit vs eager dispatch/combine/cached T={T}", case_jit_vs_eager, buf, rank, R, 10 + T, T, E,
                  max(T, 1) * R)
    cases.run("two dispatches in one jit keep program order", case_two_dispatches_in_order, buf, rank, R, 50, E)
    cases.run("jit vs eager low-latency pair", case_low_latency_jit_vs_eager, buf, rank, R, 40, E)
    for T in (8, 1, 0):
        cases.run(f"grad vs JAX reference T={T}", case_grad_vs_reference, buf, rank, R, 20 + T, T, E, max(T, 1) * R)
    cases.run("grad jit vs eager (dispatch/combine/cached)", case_grad_jit_vs_eager, buf, rank, R, 30, 8, E, 8 * R)
    cases.run("grad vs finite differences T=6", case_finite_differences, buf, comm, rank, R, 60, 6, E, 6 * R)
    for T, repeats in ((6, False), (8, True), (1, False), (0, False)):
        cases.run(f"low-latency grad vs JAX reference T={T} repeats={repeats}", case_ll_grad_vs_reference, buf,
                  rank, R, 70 + T, T, E, repeats)
    cases.run("low-latency grad jit vs eager", case_ll_grad_jit_vs_eager, buf, rank, R, 80, 8, E, True)
    for T, repeats in ((6, False), (6, True)):
        cases.run(f"low-latency grad vs finite differences T={T} repeats={repeats}", case_ll_finite_differences,
                  buf, comm, rank, R, 90 + T, T, E, repeats)
    code = cases.finish()
    buf.destroy()
    return code


if __name__ == "__main__":
    sys.exit(main())
