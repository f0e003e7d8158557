"""epcomm.torch across ranks: gradients of dispatch -> expert -> combine against a single-process torch reference of
every rank (the reference's semantics written with differentiable torch ops) and against finite differences (inputs
of small integers and quarters, so bf16 is exact and a difference of 1 is the gradient exactly); the custom ops under
torch.compile(fullgraph=True) against eager, forward and backward.

Launch (CPU backend, gloo):  mpiexec -n 2 python tests/torchrun/autograd_check.py   (or torchrun --nproc-per-node 2)
Prints 'N passed, M failed, K skipped' (rank 0); exit 1 if any failed.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))
sys.path.insert(0, HERE)   # this folder's dropin_check, not tests/gpu's

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _harness import Cases  # noqa: E402
from dropin_check import GroupComm, init_torch_distributed  # noqa: E402

import epcomm  # noqa: E402
import epcomm.torch as ept  # noqa: E402

H, K = 16, 2


def inputs(seed: int, R: int, E: int, T: int, exact: bool):
    """All ranks' (x [T, H] bf16, topk_idx [T, K] int64, topk_weights [T, K] float32, G [T, H], Gw [T, K]) from one
    seed. exact: integers and quarters (bf16 and float32 sums stay exact)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(R):
        if exact:
            x = torch.randint(-4, 5, (T, H), generator=g).to(torch.bfloat16)
            w = torch.randint(0, 5, (T, K), generator=g).float() / 4
            gx = torch.randint(-3, 4, (T, H), generator=g).float()
            gw = torch.randint(-3, 4, (T, K), generator=g).float()
        else:
            x = torch.randn(T, H, generator=g).to(torch.bfloat16)
            w = torch.rand(T, K, generator=g)
            gx, gw = torch.randn(T, H, generator=g), torch.randn(T, K, generator=g)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
        idx[torch.rand(T, K, generator=g) < 0.2] = -1           # some slots unused, some tokens sent nowhere
        out.append((x, idx, w, gx, gw))
    return out


def expert(recv_x, recv_w):
    """The stand-in expert: depends on the rows and on their weights (so both gradients flow through it)."""
    return (recv_x.float() * (1 + recv_w.sum(1, keepdim=True))).to(torch.bfloat16)


def loss_of(combined, combined_w, gx, gw):
    return (combined.float() * gx).sum() + (combined_w * gw).sum()


def epcomm_step(buf, x, idx, w, E, num_worst_tokens):
    recv_x, _, recv_w, handle, _ = ept.dispatch(buf, x, idx, w, num_experts=E, num_worst_tokens=num_worst_tokens)
    return ept.combine(buf, expert(recv_x, recv_w), handle, recv_w)


def reference_step(all_inputs, E):
    """Every rank's step in one process with torch ops (epcomm.reference's semantics): returns the summed loss."""
    R = len(all_inputs)
    e_local = E // R
    xs = [a[0] for a in all_inputs]
    ws = [a[2] for a in all_inputs]
    in_rank = [torch.stack([((a[1] >= 0) & (a[1] // e_local == r)).any(1) for r in range(R)], 1) for a in all_inputs]
    acc = [torch.zeros(a[0].shape[0], H) for a in all_inputs]
    acc_w = [torch.zeros(a[0].shape[0], K) for a in all_inputs]
    for r in range(R):
        rows = [torch.nonzero(in_rank[s][:, r]).flatten() for s in range(R)]
        recv_x = torch.cat([xs[s][rows[s]] for s in range(R)])
        local = torch.cat([(all_inputs[s][1][rows[s]] >= 0) & (all_inputs[s][1][rows[s]] // e_local == r)
                           for s in range(R)])
        recv_w = torch.where(local, torch.cat([ws[s][rows[s]] for s in range(R)]), 0.0)
        y = expert(recv_x, recv_w)
        begin = 0
        for s in range(R):
            n = len(rows[s])
            acc[s] = acc[s].index_add(0, rows[s], y[begin:begin + n].float())
            acc_w[s] = acc_w[s].index_add(0, rows[s], recv_w[begin:begin + n])
            begin += n
    return sum(loss_of(acc[s].to(torch.bfloat16), acc_w[s], a[3], a[4]) for s, a in enumerate(all_inputs))


def leaf(a):
    return a.clone().requires_grad_()


def case_vs_torch_reference(buf, rank, R, seed, T, E, num_worst_tokens):
    data = inputs(seed, R, E, T, exact=False)
    x, idx, w, gx, gw = data[rank]
    x, w = leaf(x), leaf(w)
    combined, combined_w = epcomm_step(buf, x, idx, w, E, num_worst_tokens)
    loss_of(combined, combined_w, gx, gw).backward()
    ref = [(leaf(a[0]), a[1], leaf(a[2]), a[3], a[4]) for a in data]
    reference_step(ref, E).backward()
    torch.testing.assert_close(x.grad.float(), ref[rank][0].grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad, ref[rank][2].grad, rtol=1e-4, atol=1e-4)


def total_loss(buf, x, idx, w, gx, gw, E, num_worst_tokens):
    with torch.no_grad():
        combined, combined_w = epcomm_step(buf, x, idx, w, E, num_worst_tokens)
        loss = loss_of(combined, combined_w, gx, gw).double().reshape(1)
    dist.all_reduce(loss)
    return float(loss)


def case_finite_differences(buf, rank, R, seed, T, E, num_worst_tokens, probes=4):
    """d(sum of every rank's loss)/d(one input element), by a difference of 1 in x or 1/4 in w (exact here)."""
    x, idx, w, gx, gw = inputs(seed, R, E, T, exact=True)[rank]
    xl, wl = leaf(x), leaf(w)
    combined, combined_w = epcomm_step(buf, xl, idx, wl, E, num_worst_tokens)
    loss_of(combined, combined_w, gx, gw).backward()
    base = total_loss(buf, x, idx, w, gx, gw, E, num_worst_tokens)
    g = torch.Generator().manual_seed(seed + 7)
    wrong = []
    for src in range(R):
        for _ in range(probes):
            t, h, k = (int(torch.randint(0, n, (1,), generator=g)) for n in (T, H, K))
            xp = x.clone()
            if rank == src:
                xp[t, h] += 1
            fd = total_loss(buf, xp, idx, w, gx, gw, E, num_worst_tokens) - base
            if rank == src and fd != float(xl.grad[t, h]):
                wrong.append(f"d loss / d x[{t}, {h}] of rank {src}: autograd {float(xl.grad[t, h])}, "
                             f"finite difference {fd}")
            wp = w.clone()
            if rank == src:
                wp[t, k] += 0.25
            fd = (total_loss(buf, x, idx, wp, gx, gw, E, num_worst_tokens) - base) * 4
            if rank == src and fd != float(wl.grad[t, k]):
                wrong.append(f"d loss / d w[{t}, {k}] of rank {src}: autograd {float(wl.grad[t, k])}, "
                             f"finite difference {fd}")
    if wrong:   # raised after every probe, so that no rank leaves the others waiting in a collective
        raise AssertionError("; ".join(wrong[:4]))


def case_compile(buf, rank, R, seed, T, E, num_worst_tokens):
    """torch.compile(fullgraph=True) of dispatch -> expert -> combine -> cached dispatch (the custom ops), forward and
    backward bit for bit against eager, and no graph break in torch._dynamo.explain."""
    x, idx, w, gx, gw = inputs(seed, R, E, T, exact=False)[rank]

    def step(x, idx, w):
        recv_x, _, recv_w, handle, _ = ept.dispatch(buf, x, idx, w, num_experts=E, num_worst_tokens=num_worst_tokens)
        combined, combined_w = ept.combine(buf, expert(recv_x, recv_w), handle, recv_w)
        again = ept.cached_dispatch(buf, combined, handle)
        return combined, combined_w, again

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x, idx, w)
    if explained.graph_count != 1 or explained.graph_break_count != 0:
        raise AssertionError(f"expected one graph, no break: {explained.graph_count} graphs, "
                             f"{explained.graph_break_count} breaks {explained.break_reasons}")
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        xl, wl = leaf(x), leaf(w)
        combined, combined_w, again = fn(xl, idx, wl)
        (loss_of(combined, combined_w, gx, gw) + again.float().sum()).backward()
        results.append((combined, combined_w, again, xl.grad, wl.grad))
    for name, a, b in zip(("combined", "combined_w", "cached", "x.grad", "w.grad"), *results):
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: compiled differs from eager")


def case_low_latency_compile(buf, rank, R, seed, E):
    x, idx, w, _, _ = inputs(seed, R, E, 6, exact=False)[rank]

    def step(x, idx, w):
        recv_x, count, handle = ept.low_latency_dispatch(buf, x, idx, 8, E)
        return ept.low_latency_combine(buf, recv_x * 2, idx, w, handle), count

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x, idx, w)
    if explained.graph_count != 1 or explained.graph_break_count != 0:
        raise AssertionError(f"{explained.graph_count} graphs, {explained.graph_break_count} breaks")
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x, idx, w)
    want = step(x, idx, w)
    if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
        raise AssertionError("compiled low-latency pair differs from eager")


LL_TMAX = 8


def ll_inputs(seed, R, E, T, exact, repeats):
    """inputs() for the low-latency pair; repeats: some tokens send two of their k's to one expert."""
    data = inputs(seed, R, E, T, exact)
    if repeats:
        for x, idx, w, gx, gw in data:
            idx[::3, 1] = idx[::3, 0]
    return data


def ll_scale(E):
    """The stand-in low-latency expert: global expert e multiplies its rows by 1 + e % 3 (exact in bf16)."""
    return 1 + torch.arange(E).float() % 3


def ll_expert(recv_x, rank, E, R):
    e_local = E // R
    c = ll_scale(E)[rank * e_local:(rank + 1) * e_local]
    return (recv_x.float() * c[:, None, None]).to(torch.bfloat16)


def ll_step(buf, x, idx, w, E, R):
    recv_x, _, handle = ept.low_latency_dispatch(buf, x, idx, LL_TMAX, E)
    return ept.low_latency_combine(buf, ll_expert(recv_x, buf.rank, E, R), idx, w, handle)


def ll_reference_out(x, idx, w, E):
    """One rank's low-latency dispatch -> expert -> combine, densely (epcomm.reference's semantics): out[t] =
    bf16(sum over k in order of w[t, k] * bf16(x[t] * c[topk_idx[t, k]])), float32 sums."""
    c = ll_scale(E)
    acc = torch.zeros(x.shape[0], x.shape[1])
    for k in range(idx.shape[1]):
        valid = idx[:, k] >= 0
        y = (x.float() * c[idx[:, k].clamp(min=0)][:, None]).to(torch.bfloat16).float()
        acc = acc + torch.where(valid[:, None], w[:, k:k + 1] * y, 0.0)
    return acc.to(torch.bfloat16)


def case_ll_vs_torch_reference(buf, rank, R, seed, T, E, repeats):
    data = ll_inputs(seed, R, E, T, False, repeats)
    x, idx, w, gx, _ = data[rank]
    xl, wl = leaf(x), leaf(w)
    (ll_step(buf, xl, idx, wl, E, R).float() * gx).sum().backward()
    ref = [(leaf(a[0]), a[1], leaf(a[2]), a[3]) for a in data]
    sum((ll_reference_out(a[0], a[1], a[2], E).float() * a[3]).sum() for a in ref).backward()
    torch.testing.assert_close(xl.grad.float(), ref[rank][0].grad.float(), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(wl.grad, ref[rank][2].grad, rtol=1e-4, atol=1e-4)


def ll_total_loss(buf, x, idx, w, gx, E, R):
    with torch.no_grad():
        loss = (ll_step(buf, x, idx, w, E, R).float() * gx).sum().double().reshape(1)
    dist.all_reduce(loss)
    return float(loss)


def case_ll_finite_differences(buf, rank, R, seed, T, E, repeats, probes=4):
    """As case_finite_differences, through low_latency_dispatch -> expert -> low_latency_combine."""
    x, idx, w, gx, _ = ll_inputs(seed, R, E, T, True, repeats)[rank]
    xl, wl = leaf(x), leaf(w)
    (ll_step(buf, xl, idx, wl, E, R).float() * gx).sum().backward()
    base = ll_total_loss(buf, x, idx, w, gx, E, R)
    g = torch.Generator().manual_seed(seed + 7)
    wrong = []
    for src in range(R):
        for _ in range(probes):
            t, h, k = (int(torch.randint(0, n, (1,), generator=g)) for n in (T, H, K))
            xp, wp = x.clone(), w.clone()
            if rank == src:
                xp[t, h] += 1
                wp[t, k] += 0.25
            fd = ll_total_loss(buf, xp, idx, w, gx, E, R) - base
            if rank == src and fd != float(xl.grad[t, h]):
                wrong.append(f"d loss / d x[{t}, {h}] of rank {src}: autograd {float(xl.grad[t, h])}, fd {fd}")
            fd = (ll_total_loss(buf, x, idx, wp, gx, E, R) - base) * 4
            if rank == src and fd != float(wl.grad[t, k]):
                wrong.append(f"d loss / d w[{t}, {k}] of rank {src}: autograd {float(wl.grad[t, k])}, fd {fd}")
    if wrong:
        raise AssertionError("; ".join(wrong[:4]))


def case_ll_compile_backward(buf, rank, R, seed, E):
    """torch.compile(fullgraph=True) of the low-latency pair, forward and backward bit for bit against eager."""
    x, idx, w, gx, _ = inputs(seed, R, E, 6, exact=False)[rank]

    def step(x, idx, w):
        return ll_step(buf, x, idx, w, E, R)

    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        xl, wl = leaf(x), leaf(w)
        out = fn(xl, idx, wl)
        (out.float() * gx).sum().backward()
        results.append((out, xl.grad, wl.grad))
    for name, a, b in zip(("combined", "x.grad", "w.grad"), *results):
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: compiled differs from eager")


def case_plain_api_refuses_grad(buf, E):
    x = torch.zeros(4, H, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.zeros(4, K, dtype=torch.int64)
    layout = buf.get_dispatch_layout(idx, E)
    try:
        buf.dispatch(x, is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])
    except epcomm.ConfigError as exc:
        if "epcomm.torch" not in str(exc):
            raise
    else:
        raise AssertionError("a requires-grad x was accepted by Buffer.dispatch")
    buf.dispatch(x.detach(), is_token_in_rank=layout[3], num_tokens_per_expert=layout[2])  # explicit: fine


def main() -> int:
    _, mpi_comm = init_torch_distributed()
    rank, R = dist.get_rank(), dist.get_world_size()
    group = epcomm.Group(dist.group.WORLD, use_gpu=False)
    cases = Cases(GroupComm(group))
    buf = epcomm.Buffer(dist.group.WORLD, backend="cpu")
    E = 4 * R
    for T, worst in ((8, 0), (8, 8 * R), (1, 0), (0, 4), (16, 0)):
        cases.run(f"grad vs torch reference T={T} worst={worst}", case_vs_torch_reference, buf, rank, R, 10 + T,
                  T, E, worst)
    for T, worst in ((6, 0), (6, 6 * R)):
        cases.run(f"grad vs finite differences T={T} worst={worst}", case_finite_differences, buf, rank, R, 20 + T,
                  T, E, worst)
    cases.run("torch.compile fullgraph dispatch/combine/cached", case_compile, buf, rank, R, 30, 8, E, 8 * R)
    cases.run("torch.compile fullgraph low-latency pair", case_low_latency_compile, buf, rank, R, 40, E)
    for T, repeats in ((6, False), (8, True), (1, False), (0, False)):
        cases.run(f"low-latency grad vs torch reference T={T} repeats={repeats}", case_ll_vs_torch_reference, buf,
                  rank, R, 50 + T, T, E, repeats)
    for T, repeats in ((6, False), (6, True)):
        cases.run(f"low-latency grad vs finite differences T={T} repeats={repeats}", case_ll_finite_differences,
                  buf, rank, R, 60 + T, T, E, repeats)
    cases.run("torch.compile fullgraph low-latency backward", case_ll_compile_backward, buf, rank, R, 70, E)
    cases.run("plain API refuses requires-grad inputs", case_plain_api_refuses_grad, buf, E)
    code = cases.finish()
    buf.destroy()
    group.close()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
