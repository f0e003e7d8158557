"""DeepEP callers on epcomm: the four frameworks' call sequences (deepep_callers.py) with torch tensors over a
torch.distributed group, checked against epcomm.reference; DeepEP's API surface; the get_buffer loop and Buffer
create/destroy cycles with flat resource counts.

Launch (CPU backend, gloo):  torchrun --nproc-per-node 2 tests/torchrun/dropin_check.py
                      or:    mpiexec -n 2 python tests/torchrun/dropin_check.py   (torch.distributed is started from
                             the MPI ranks, and the mpi4py communicator is tried as DeepEP's `comm=` too)
GPU (tests/gpu/dropin_check.py imports run() with device "cuda"). Every rank makes ALL ranks' inputs from one seed,
so expected values need no communication. Prints 'N passed, M failed, K skipped' (rank 0); exit 1 if any failed.
--cycles: Buffer create/destroy cycles (default 10000); --steps: get_buffer loop steps (default 10000).
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "gpu"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _harness import Cases  # noqa: E402

import deepep_callers as callers  # noqa: E402
import epcomm  # noqa: E402
from epcomm import reference as ref  # noqa: E402
from epcomm.interop import as_numpy  # noqa: E402
from epcomm.testing import assert_bitwise_equal, calc_diff, make_rank_inputs  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------------
# Launch: torchrun (its env) or mpiexec (MPI ranks -> env for init_process_group)
# ---------------------------------------------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init_torch_distributed():
    """Starts torch.distributed (gloo) under torchrun, or from MPI ranks under mpiexec. Returns (launcher, mpi_comm)."""
    if launched_by_torchrun():
        dist.init_process_group("gloo")
        return "torchrun", None
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(comm.rank),
                      WORLD_SIZE=str(comm.size), LOCAL_RANK=str(comm.rank))
    dist.init_process_group("gloo", rank=comm.rank, world_size=comm.size)
    return "mpiexec", comm


class GroupComm:
    """What _harness.Cases needs (rank, gather, bcast), over an epcomm.Group of any kind."""

    def __init__(self, group):
        self.group, self.rank = group, group.rank

    def gather(self, obj, root=0):
        out = self.group.allgather(obj)
        return out if self.rank == root else None

    def bcast(self, obj, root=0):
        return self.group.bcast(obj, root)


# ---------------------------------------------------------------------------------------------------------------------
# Array helpers
# ---------------------------------------------------------------------------------------------------------------------

class World:
    def __init__(self, device: str, mpi_comm, args):
        self.device = device
        self.mpi_comm = mpi_comm
        self.args = args
        self.R = dist.get_world_size()
        self.rank = dist.get_rank()
        self.world = dist.group.WORLD
        self.cpu_group = dist.new_group(list(range(self.R)), backend="gloo")  # vLLM's EP cpu_group
        self.seed = 1000

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed

    def t(self, a):
        """numpy (bf16 / e4m3 via ml_dtypes) -> a torch tensor on this rank's device."""
        if isinstance(a, tuple):
            return tuple(self.t(x) for x in a)
        a = np.ascontiguousarray(a)
        if a.dtype == ref.bf16:
            out = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
        elif a.dtype == ref.fp8:
            out = torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
        else:
            out = torch.from_numpy(a.copy())
        return out.to(self.device)


def n(t):
    """A torch tensor (or tuple, or None) as numpy, bf16 / e4m3 kept (ml_dtypes)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(n(x) for x in t)
    if isinstance(t, np.ndarray):
        return t
    if type(t).__module__.split(".")[0] == "cupy":   # handle fields are the backend's arrays
        return t.get()
    return np.array(as_numpy(t.detach().cpu().contiguous(), "t"))


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def weighted_rows(recv_x, recv_idx, recv_w):
    """The test's experts on a normal dispatch's rows (numpy): row * sum_k w_k * (local expert + 1) over this rank's
    experts, in float32, rounded to bf16 once."""
    data = ref.per_token_cast_back(*recv_x) if isinstance(recv_x, tuple) else recv_x.astype(np.float32)
    factor = np.where(recv_idx >= 0, recv_w * (recv_idx + 1).astype(np.float32), np.float32(0)).sum(axis=1)
    return (data * factor[:, None].astype(np.float32)).astype(ref.bf16)


def weighted_rows_torch(recv_x, recv_idx, recv_w):
    """The same experts in torch (what a framework computes on its device)."""
    if isinstance(recv_x, tuple):
        data, scales = recv_x
        h = data.size(1)
        data = (data.float().view(data.size(0), h // 128, 128) * scales.float()[:, :, None]).view(data.size(0), h)
    else:
        data = recv_x.float()
    factor = torch.where(recv_idx >= 0, recv_w * (recv_idx + 1).float(), torch.zeros_like(recv_w)).sum(dim=1)
    return (data * factor[:, None]).to(torch.bfloat16)


def expected_combine(xs, idxs, ws, num_experts, fp8=False, alignment=1):
    """All ranks' reference: dispatch (layout counts travel), the numpy experts, combine. Returns (dispatch results,
    combined per rank)."""
    R = len(xs)
    payload = [ref.per_token_cast_to_fp8(x) for x in xs] if fp8 else xs
    results = ref.dispatch(payload, idxs, ws, num_experts, alignment)
    layouts = [ref.get_dispatch_layout(i, num_experts, R)[3] for i in idxs]
    ys = [weighted_rows(r.recv_x, r.recv_topk_idx, r.recv_topk_weights) for r in results]
    combined = ref.combine(ys, results, layouts)
    return payload, results, [c for c, _ in combined]


def close_enough(got, want, tag, bound=1e-5):
    d = calc_diff(got.astype(np.float32), want.astype(np.float32))
    check(d < bound, f"{tag}: calc_diff {d:.3g} >= {bound}")


def check_normal_dispatch(w: World, got, want, tag, with_topk=True):
    recv_x, recv_idx, recv_w, per_expert = got
    assert_bitwise_equal(n(recv_x), want.recv_x, f"{tag}: recv_x")
    if with_topk:
        assert_bitwise_equal(n(recv_idx), want.recv_topk_idx, f"{tag}: recv_topk_idx")
        assert_bitwise_equal(n(recv_w), want.recv_topk_weights, f"{tag}: recv_topk_weights")
    check(list(per_expert) == list(want.num_recv_tokens_per_expert_list),
          f"{tag}: num_recv_tokens_per_expert_list {list(per_expert)} != {want.num_recv_tokens_per_expert_list}")


# ---------------------------------------------------------------------------------------------------------------------
# The four frameworks' sequences
# ---------------------------------------------------------------------------------------------------------------------

def case_vllm_ht(w: World, fp8: bool, async_ops: bool, scales_layout: str = "row"):
    R, rank = w.R, w.rank
    T, H, K, E = 48, 256, 4, 4 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T + 8 * r for r in range(R)], H, K, E, drop=0.1)
    payload, results, combined = expected_combine(xs, idxs, ws, E, fp8)
    mine = w.t(payload[rank])
    if fp8 and scales_layout == "column":  # DeepGEMM's column-major scales: a transposed view, any strides
        mine = (mine[0], mine[1].t().contiguous().t())
    mgr = callers.VllmHighThroughput(w.cpu_group)
    mgr.set_num_sms(20)
    expert_x, expert_num_tokens, topk_ids, topk_w, handle = mgr.prepare(mine, w.t(ws[rank]), w.t(idxs[rank]), E,
                                                                        async_prepare=async_ops)
    want = results[rank]
    check_normal_dispatch(w, (expert_x, topk_ids, topk_w, n(expert_num_tokens).tolist()), want, "vllm_ht dispatch")
    fused = weighted_rows_torch(expert_x, topk_ids, topk_w)
    out = mgr.finalize(fused, handle, async_finalize=async_ops)
    close_enough(n(out), combined[rank], "vllm_ht combine")
    check(mgr.get_handle() is mgr.get_handle(), "vllm_ht: the manager's Buffer is reused")
    mgr.destroy()


def case_fp8_nan_scales(w: World):
    """A dispatch moves the caller's FP8 scale bits unchanged: quiet and signalling NaN payloads, -0.0, denormals."""
    R, rank = w.R, w.rank
    T, H, K, E = 32, 512, 2, 2 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T] * R, H, K, E)
    payload = [ref.per_token_cast_to_fp8(x) for x in xs]
    specials = np.array([0x7FC00000, 0x7FA12345, 0xFFC00001, 0x7F800001, 0x80000000, 0x00000001], np.uint32)
    for data, scales in payload:
        flat = scales.view(np.uint32).reshape(-1)
        flat[:len(specials)] = specials               # the first rows' scales of every rank
        flat[-len(specials):] = specials[::-1]
    results = ref.dispatch(payload, idxs, ws, E)
    mgr = callers.VllmHighThroughput(w.cpu_group)
    expert_x, _, _, _, handle = mgr.prepare(w.t(payload[rank]), w.t(ws[rank]), w.t(idxs[rank]), E)
    got_scales = n(expert_x[1])
    assert_bitwise_equal(got_scales.view(np.uint32), results[rank].recv_x[1].view(np.uint32), "recv scales bits")
    check(np.isin(specials, got_scales.view(np.uint32)).all() or results[rank].num_recv_tokens_per_source.sum() == 0
          or not np.isin(specials, results[rank].recv_x[1].view(np.uint32)).all(),
          "every special pattern that was sent here arrives")
    # The cached dispatch (the backward of a combine) moves them the same way.
    grad, *_ = mgr.get_handle().dispatch(w.t(payload[rank]), handle=handle)
    assert_bitwise_equal(n(grad[1]).view(np.uint32), results[rank].recv_x[1].view(np.uint32), "cached scales bits")
    mgr.destroy()


def ll_canonical(recv, handle_src, layout_range, count):
    """Rows of each (local expert, source) block sorted by src_info (their order inside a block is unspecified)."""
    out = [a.copy() for a in recv]
    e_local, R = layout_range.shape
    for j in range(e_local):
        for r in range(R):
            b, c = int(layout_range[j, r] >> 32), int(layout_range[j, r] & 0xFFFFFFFF)
            perm = b + np.argsort(handle_src[j, b:b + c], kind="stable")
            for a, o in zip(recv, out):
                o[j, b:b + c] = a[j, perm]
    return out


def case_vllm_ll(w: World, fp8: bool, specials: bool = False):
    R, rank = w.R, w.rank
    TMAX, H, K, E = 32, 256, 4, 4 * R
    tokens = [TMAX - 3 * r for r in range(R)]
    xs, idxs, ws = make_rank_inputs(w.next_seed(), tokens, H, K, E, drop=0.1)
    if specials:  # DeepEP's cast: amax ignores NaN, a NaN casts to 0x7F; an inf block's scale is inf
        for x in xs:
            x[0, 5] = np.nan
            x[1, 130] = np.inf
            x[2, 7] = -np.inf
    results = ref.low_latency_dispatch(xs, idxs, TMAX, E, use_fp8=fp8)  # (NaN rows: the reference's cast)
    mgr = callers.VllmLowLatency(w.cpu_group, TMAX, H, E)
    expert_x, expert_num_tokens, handle = mgr.prepare(w.t(xs[rank]), w.t(idxs[rank]), use_fp8=fp8)
    want = results[rank]
    assert_bitwise_equal(n(expert_num_tokens), want.recv_count, "vllm_ll recv_count")
    src, lr = n(handle.src_info), n(handle.layout_range)
    assert_bitwise_equal(lr, want.layout_range, "vllm_ll layout_range")
    got = ll_canonical([n(a) for a in (expert_x if fp8 else (expert_x,))] + [src], src, lr, want.recv_count)
    exp = ll_canonical(list(want.recv_x if fp8 else (want.recv_x,)) + [want.src_info], want.src_info, lr,
                       want.recv_count)
    for j in range(lr.shape[0]):
        c = int(want.recv_count[j])
        assert_bitwise_equal(got[-1][j, :c], exp[-1][j, :c], f"vllm_ll src_info expert {j}")
        for i, name in enumerate(["data", "scales"][:len(got) - 1]):
            assert_bitwise_equal(got[i][j, :c], exp[i][j, :c], f"vllm_ll {name} expert {j}")
    if specials:  # the cast is the point; NaN rows would make every sum they reach NaN
        mgr.destroy()
        return
    # The experts: dequantised rows times (global expert % 5 + 1); the combine weighs and sums them per token.
    e_local = E // R
    factors = torch.tensor([(rank * e_local + j) % 5 + 1 for j in range(e_local)], dtype=torch.float32,
                           device=w.device)
    if fp8:
        data, scales = expert_x
        deq = data.float() * scales.float().repeat_interleave(128, dim=2)
    else:
        deq = expert_x.float()
    y = (deq * factors[:, None, None]).to(torch.bfloat16)
    out = torch.empty(tokens[rank], H, dtype=torch.bfloat16, device=w.device)
    mgr.finalize(y, w.t(ws[rank]), w.t(idxs[rank]), handle, out)
    ys = []
    for r, res in enumerate(results):
        if fp8:
            d = res.recv_x[0].astype(np.float32) * np.repeat(res.recv_x[1], 128, axis=2)
        else:
            d = res.recv_x.astype(np.float32)
        f = np.array([(r * e_local + j) % 5 + 1 for j in range(e_local)], np.float32)
        ys.append((d * f[:, None, None]).astype(ref.bf16))
    want_out = ref.low_latency_combine(ys, idxs, ws, results, E)[rank]
    close_enough(n(out), want_out, "vllm_ll combine")
    mgr.destroy()


def case_sglang(w: World):
    R, rank = w.R, w.rank
    T, H, K, E, TMAX = 40, 256, 4, 4 * R, 24
    sg = callers.SglangDeepEP(w.world, H, E, TMAX, async_finish=True, expert_alignment=128)
    check(sg.normal_dispatch_config.num_max_nvl_chunked_send_tokens == 16, "Config(**json) reads DeepEP's names")
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T] * R, H, K, E)
    _, results, combined = expected_combine(xs, idxs, ws, E, alignment=128)
    got = sg.dispatch_normal(w.t(xs[rank]), w.t(idxs[rank]), w.t(ws[rank]))
    check_normal_dispatch(w, got, results[rank], "sglang normal dispatch")
    check(all(c % 128 == 0 for c in got[3]), f"sglang: counts aligned to 128: {got[3]}")
    out = sg.combine_normal(weighted_rows_torch(got[0], got[1], got[2]))
    close_enough(n(out), combined[rank], "sglang normal combine")
    # Decode: low-latency mode on the same Buffer, after clean_low_latency_buffer; hooks and async events.
    sg.switch_to_low_latency()
    for hook in (True, False):
        xs2, idxs2, ws2 = make_rank_inputs(w.next_seed(), [TMAX - r for r in range(R)], H, K, E)
        res = ref.low_latency_dispatch(xs2, idxs2, TMAX, E, use_fp8=False)
        recv, masked_m = sg.dispatch_low_latency(w.t(xs2[rank]), w.t(idxs2[rank]), use_fp8=False,
                                                 return_recv_hook=hook)
        assert_bitwise_equal(n(masked_m), res[rank].recv_count, "sglang ll masked_m")
        out = sg.combine_low_latency(recv, w.t(idxs2[rank]), w.t(ws2[rank]), return_recv_hook=hook)
        want = ref.low_latency_combine([r.recv_x for r in res], idxs2, ws2, res, E)[rank]
        close_enough(n(out), want, f"sglang ll combine (hook={hook})")
    sg.buffer.destroy()


def case_megatron(w: World, async_finish: bool):
    R, rank = w.R, w.rank
    T, H, K, E = 40, 256, 4, 4 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T + r for r in range(R)], H, K, E, drop=0.1)
    epcomm.Buffer.set_num_sms(24)
    x = w.t(xs[rank]).requires_grad_(True)
    probs = w.t(ws[rank]).requires_grad_(True)
    recv_x, recv_idx, recv_probs, tokens_per_expert, handle = callers.megatron_fused_dispatch(
        x, w.t(idxs[rank]), probs, E, w.world, async_finish=async_finish, allocate_on_comm_stream=async_finish)
    results = ref.dispatch(xs, idxs, ws, E)
    want = results[rank]
    check_normal_dispatch(w, (recv_x, recv_idx, recv_probs, tokens_per_expert.tolist()), want, "megatron dispatch")
    expert_out = recv_x * 2
    combined, _ = callers.megatron_fused_combine(expert_out, w.world, handle, async_finish=async_finish,
                                                 allocate_on_comm_stream=async_finish)
    layouts = [ref.get_dispatch_layout(i, E, R)[3] for i in idxs]
    want_c = ref.combine([(r.recv_x.astype(np.float32) * 2).astype(ref.bf16) for r in results], results, layouts)
    assert_bitwise_equal(n(combined), want_c[rank][0], "megatron combine (2x, exact)")
    loss = combined.float().sum() + (recv_probs * (recv_idx >= 0)).sum()
    loss.backward()
    copies = layouts[rank].sum(axis=1, keepdims=True).astype(np.float32)
    assert_bitwise_equal(n(x.grad), np.broadcast_to(2 * copies, xs[rank].shape).astype(ref.bf16), "megatron x.grad")
    assert_bitwise_equal(n(probs.grad), (idxs[rank] >= 0).astype(np.float32), "megatron probs.grad")


def case_torchtitan(w: World):
    R, rank = w.R, w.rank
    T, H, K, E = 36, 256, 4, 8 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T] * R, H, K, E)
    tt = callers.TorchtitanDeepEP(w.world, E)
    permuted, group_sizes, counts, state, hid = tt.dispatch(w.t(xs[rank]), w.t(idxs[rank]), w.t(ws[rank]))
    check(n(group_sizes).tolist() == list(counts), f"torchtitan: group sizes {n(group_sizes).tolist()} != the "
                                                    f"per-expert list {counts}")
    experts = torch.repeat_interleave(torch.arange(len(counts), device=w.device), group_sizes.to(w.device))
    expert_out = (permuted.float() * (experts + 1)[:, None].float()).to(torch.bfloat16)
    out = tt.combine(expert_out, state, hid)
    _, _, combined = expected_combine(xs, idxs, ws, E)
    close_enough(n(out), combined[rank], "torchtitan combine", bound=1e-4)


def case_no_topk_per_expert_list(w: World):
    """DeepEP derives num_recv_tokens_per_expert_list from the layout's counts, so a dispatch without top-k has it."""
    R, rank = w.R, w.rank
    T, H, K, E = 30, 128, 3, 4 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T] * R, H, K, E)
    buf = callers.get_buffer(w.world, H * 2)
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(w.t(idxs[rank]), E)
    _, _, _, lst, _, _ = buf.dispatch(w.t(xs[rank]), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                      num_tokens_per_expert=per_expert, expert_alignment=4)
    want = ref.dispatch(xs, idxs, ws, E, expert_alignment=4)[rank].num_recv_tokens_per_expert_list
    check(lst == want and len(lst) == E // R, f"per-expert list without top-k: {lst} != {want}")


# ---------------------------------------------------------------------------------------------------------------------
# DeepEP's API surface
# ---------------------------------------------------------------------------------------------------------------------

def case_surface(w: World):
    R, rank = w.R, w.rank
    buf = callers.get_buffer(w.world, 512)
    check(buf.group is w.world and buf.group_size == R and buf.rank == rank, "group / group_size / rank")
    check(epcomm.topk_idx_t is torch.int64 and epcomm.Buffer.is_sm90_compiled(), "topk_idx_t / is_sm90_compiled")
    # Events: capture() and EventOverlap(EventHandle()) as previous_event; .event, .extra_tensors, the with form.
    ev = epcomm.Buffer.capture()
    check(isinstance(ev, epcomm.EventOverlap) and ev.extra_tensors is None, "capture() is an EventOverlap")
    keep = torch.zeros(3)
    ov = epcomm.EventOverlap(epcomm.EventHandle(), (keep,))
    check(ov.extra_tensors[0] is keep, "extra_tensors kept")
    check((ov.event is None) == (w.device == "cpu"), "event: an EventHandle on the GPU, None without one")
    idx = w.t(make_rank_inputs(w.next_seed(), [8] * R, 8, 2, 2 * R)[1][rank])
    with buf.get_dispatch_layout(idx, 2 * R, previous_event=ov, async_finish=True,
                                 allocate_on_comm_stream=True)[-1] as done:
        check(isinstance(done, epcomm.EventOverlap), "with-form yields the event")
    # Local buffer as a torch tensor (bytes from `offset`, a shape), and the comm stream. The bytes written are the
    # last of the buffer's data area, which only a full buffer reaches (the start holds the kernels' flags).
    offset = buf.num_nvl_bytes - 1024
    loc = buf.get_local_buffer_tensor(torch.bfloat16, torch.Size([4, 8]), offset=offset)
    check(loc.dtype == torch.bfloat16 and tuple(loc.shape) == (4, 8) and loc.device.type == w.device,
          f"get_local_buffer_tensor: {loc.dtype} {tuple(loc.shape)} {loc.device}")
    loc.fill_(1.5)
    again = buf.get_local_buffer_tensor(torch.bfloat16, offset=offset)
    check(again.numel() == 512 and bool((again[:32] == 1.5).all()), "get_local_buffer_tensor views the same memory")
    stream = buf.get_comm_stream()
    check((stream is None) == (w.device == "cpu"), f"get_comm_stream: {stream!r}")
    # Config: DeepEP's fields positionally, its table per rank count, the even num_sms check.
    cfg = epcomm.Config(24, 8, 256, 6, 128)
    check((cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens)
          == (24, 8, 256), "Config(24, 8, 256, 6, 128)")
    old = epcomm.Buffer.num_sms
    try:
        epcomm.Buffer.set_num_sms(24)
        check(epcomm.Buffer.get_dispatch_config(8).num_sms == 24, "configs follow set_num_sms")
        check(epcomm.Buffer.get_combine_config(2).num_max_nvl_chunked_send_tokens == 10, "DeepEP's combine table")
        try:
            epcomm.Buffer.set_num_sms(23)
            raise AssertionError("set_num_sms(23) must raise")
        except epcomm.ConfigError:
            pass
    finally:
        epcomm.Buffer.set_num_sms(old)


def case_ll_zero_copy_torch(w: World):
    """get_next_low_latency_combine_buffer returns a torch tensor a torch caller writes its expert outputs into."""
    R, rank = w.R, w.rank
    TMAX, H, K, E = 16, 128, 2, 2 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [TMAX] * R, H, K, E)
    buf = epcomm.Buffer(w.world, 0, epcomm.Buffer.get_low_latency_rdma_size_hint(TMAX, H, R, E),
                        low_latency_mode=True, num_qps_per_rank=E // R)
    recv, count, handle, _, _ = buf.low_latency_dispatch(w.t(xs[rank]), w.t(idxs[rank]), TMAX, E, use_fp8=False)
    plain, _, _ = buf.low_latency_combine(recv, w.t(idxs[rank]), w.t(ws[rank]), handle)
    target = buf.get_next_low_latency_combine_buffer(handle)
    check(isinstance(target, torch.Tensor) and target.dtype == torch.bfloat16, f"combine buffer: {type(target)}")
    target.copy_(recv)
    # DeepEP's positional order: use_logfmt is the 5th argument, zero_copy the 6th.
    zc, _, _ = buf.low_latency_combine(None, w.t(idxs[rank]), w.t(ws[rank]), handle, False, True)
    assert_bitwise_equal(n(zc), n(plain), "zero-copy combine == copying combine")
    try:  # refused: this hidden is not a multiple of 512 (DeepEP's LogFMT chunks); the GPU has no LogFMT kernel yet
        buf.low_latency_combine(recv, w.t(idxs[rank]), w.t(ws[rank]), handle, True)
        raise AssertionError("use_logfmt=True must raise ConfigError")
    except epcomm.ConfigError as exc:
        check("use_logfmt" in str(exc), str(exc))
    buf.destroy()


def case_size_error(w: World):
    """A dispatch larger than the Buffer was sized for: a ConfigError naming the num_nvl_bytes to ask for, and a
    Buffer of exactly that size takes it."""
    R, rank = w.R, w.rank
    T, H, K, E = 96, 256, 2, 2 * R
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [T] * R, H, K, E)
    small = epcomm.Config(num_max_tokens=16).get_nvl_buffer_size_hint(H * 2, R)

    def dispatch(nbytes):
        buf = epcomm.Buffer(w.world, nbytes)
        try:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(w.t(idxs[rank]), E)
            buf.dispatch(w.t(xs[rank]), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                         num_tokens_per_expert=per_expert, topk_idx=w.t(idxs[rank]), topk_weights=w.t(ws[rank]))
        finally:
            buf.destroy()

    try:
        dispatch(small)
        raise AssertionError("a dispatch past the buffer's size must raise")
    except epcomm.ConfigError as exc:
        msg = str(exc)
    import re
    m = re.search(r"num_nvl_bytes >= (\d+)", msg)
    check(m is not None, f"the error names the size to ask for: {msg}")
    dispatch(int(m.group(1)))


def case_mpi_comm(w: World):
    """DeepEP's comm= keyword (an mpi4py communicator in place of a group), and the communicator as group."""
    from mpi4py import MPI
    R, rank = w.R, w.rank
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [12] * R, 128, 2, 2 * R)
    for buf in (epcomm.Buffer(None, 1 << 22, 0, comm=MPI.COMM_WORLD), epcomm.Buffer(MPI.COMM_WORLD, 1 << 22)):
        check(buf.group is MPI.COMM_WORLD and buf.group_size == R, "group is the communicator")
        per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(w.t(idxs[rank]), 2 * R)
        recv, *_ = buf.dispatch(w.t(xs[rank]), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                num_tokens_per_expert=per_expert, topk_idx=w.t(idxs[rank]), topk_weights=w.t(ws[rank]))
        assert_bitwise_equal(n(recv), ref.dispatch(xs, idxs, ws, 2 * R)[rank].recv_x, "recv_x over MPI")
        buf.destroy()


# ---------------------------------------------------------------------------------------------------------------------
# Lifetime: the get_buffer loop and create/destroy cycles with flat resource counts
# ---------------------------------------------------------------------------------------------------------------------

def resource_counts(w: World) -> dict:
    """Live Buffers and Groups, open file descriptors, c10d store keys (and GPU memory in use), measured between two
    barriers, so that no rank is in the middle of an exchange whose keys are not consumed yet."""
    gc.collect()
    if w.device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    kinds = [type(o) for o in gc.get_objects()]
    counts = dict(buffers=kinds.count(epcomm.Buffer), groups=kinds.count(epcomm.Group),
                  fds=len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0,
                  store_keys=dist.distributed_c10d._get_default_store().num_keys())
    if w.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        counts["gpu_used_mib"] = (total - free) >> 20
    dist.barrier()
    return counts


def check_flat(before: dict, after: dict, tag: str, slack_mib: int = 64):
    for k in before:
        if k == "gpu_used_mib":   # other ranks share the GPU: allow their transient allocations
            check(after[k] <= before[k] + slack_mib, f"{tag}: GPU memory in use grew {before[k]} -> {after[k]} MiB")
        else:
            check(after[k] <= before[k], f"{tag}: {k} grew {before[k]} -> {after[k]}")


def case_get_buffer_loop(w: World, steps: int):
    """DeepEP's README pattern: get_buffer() every step returns the same Buffer (group is the caller's object, the
    byte counts are what was asked for); a dispatch / combine every steps // 10 steps."""
    R, rank = w.R, w.rank
    H = 128
    xs, idxs, ws = make_rank_inputs(w.next_seed(), [8] * R, H, 2, 2 * R)
    first = callers.get_buffer(w.world, H * 2)
    before = resource_counts(w)
    t0 = time.perf_counter()
    for step in range(steps):
        buf = callers.get_buffer(w.world, H * 2)
        if buf is not first:
            raise AssertionError(f"step {step}: get_buffer made a new Buffer")
        if step % max(1, steps // 10) == 0:
            per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(w.t(idxs[rank]), 2 * R)
            recv, _, _, _, handle, _ = buf.dispatch(w.t(xs[rank]), num_tokens_per_rank=per_rank,
                                                    is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
            buf.combine(recv, handle)
    seconds = time.perf_counter() - t0
    after = resource_counts(w)
    check_flat(before, after, "get_buffer loop")
    if rank == 0:
        print(f"get_buffer loop: {steps} steps in {seconds:.1f} s, counts before {before} after {after}", flush=True)


def case_create_destroy(w: World, cycles: int, explicit: bool):
    """Buffers made and dropped `cycles` times (get_buffer with two alternating groups of the same ranks recreates
    it on every call, the issue's leak; explicit: DeepEP's explicitly_destroy=True with destroy()). Counts stay flat:
    live Buffers and Groups, file descriptors, store keys (and GPU memory on a GPU)."""
    R = w.R
    groups = [w.world, dist.new_group(list(range(R)), backend="gloo")]
    callers.drop_buffer()
    gc.collect()
    before = resource_counts(w)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)   # a leaked explicitly_destroy Buffer would warn
        for i in range(cycles):
            if explicit:
                buf = epcomm.Buffer(groups[i % 2], 1 << 20, explicitly_destroy=True)
                buf.destroy()
            else:
                buf = callers.get_buffer(groups[i % 2], 256)
                check(buf.group is groups[i % 2], "get_buffer: a new Buffer for the other group")
            del buf
    callers.drop_buffer()
    seconds = time.perf_counter() - t0
    after = resource_counts(w)
    check_flat(before, after, f"create/destroy x{cycles}")
    if w.rank == 0:
        print(f"create/destroy ({'destroy()' if explicit else 'garbage collection'}): {cycles} cycles in "
              f"{seconds:.1f} s, counts before {before} after {after}", flush=True)


def case_create_destroy_mpi(w: World, cycles: int):
    """Buffers over an mpi4py communicator made and dropped `cycles` times: each makes two communicators (its
    Group's node-local split and exchange duplicate), freed when it is garbage-collected; MPICH has 2048 context ids,
    so a leak fails long before 10^4 cycles."""
    from mpi4py import MPI
    from epcomm.group import _MpiTransport
    before = resource_counts(w)
    t0 = time.perf_counter()
    for i in range(cycles):
        buf = epcomm.Buffer(MPI.COMM_WORLD, 1 << 20) if i % 2 else epcomm.Buffer(None, 1 << 20, comm=MPI.COMM_WORLD)
        check(buf.ep_group.kind == "mpi", "an MPI group")
        del buf
    seconds = time.perf_counter() - t0
    after = resource_counts(w)
    check_flat(before, after, f"MPI create/destroy x{cycles}")
    live = sum(type(o) is _MpiTransport for o in gc.get_objects())
    check(live == 0, f"{live} MPI transports (communicator pairs) still alive")
    if w.rank == 0:
        print(f"MPI create/destroy: {cycles} cycles in {seconds:.1f} s, counts before {before} after {after}",
              flush=True)


# ---------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args(argv)


def run(args, extra_cases=None) -> int:
    launcher, mpi_comm = init_torch_distributed()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local % torch.cuda.device_count())
    os.environ.setdefault("EPCOMM_BACKEND", "gpu" if args.device == "cuda" else "cpu")
    w = World(args.device, mpi_comm, args)
    harness_group = epcomm.Group(w.world, use_gpu=False)
    cases = Cases(GroupComm(harness_group))
    if w.rank == 0:
        print(f"dropin_check: {w.R} ranks under {launcher}, device {args.device}, backend "
              f"{os.environ['EPCOMM_BACKEND']}", flush=True)
    cases.run("vllm_ht bf16", case_vllm_ht, w, False, False)
    cases.run("vllm_ht fp8 async", case_vllm_ht, w, True, True)
    cases.run("vllm_ht fp8 column-major scales", case_vllm_ht, w, True, False, "column")
    cases.run("fp8 NaN scale bits pass through", case_fp8_nan_scales, w)
    cases.run("vllm_ll bf16", case_vllm_ll, w, False)
    cases.run("vllm_ll fp8", case_vllm_ll, w, True)
    cases.run("vllm_ll fp8 NaN/inf inputs", case_vllm_ll, w, True, True)
    cases.run("sglang normal + low-latency", case_sglang, w)
    cases.run("megatron fused_a2a", case_megatron, w, False)
    cases.run("megatron fused_a2a async", case_megatron, w, True)
    cases.run("torchtitan permute/unpermute", case_torchtitan, w)
    cases.run("per-expert list without top-k", case_no_topk_per_expert_list, w)
    cases.run("DeepEP API surface", case_surface, w)
    cases.run("low-latency zero-copy with torch", case_ll_zero_copy_torch, w)
    cases.run("size error names the size", case_size_error, w)
    if mpi_comm is not None:
        cases.run("mpi4py comm=", case_mpi_comm, w)
    else:
        cases.skip("mpi4py comm=", "needs mpiexec")
    for extra in extra_cases or ():
        extra(cases, w)
    steps = min(args.steps, 200) if args.quick else args.steps
    cycles = min(args.cycles, 100) if args.quick else args.cycles
    cases.run(f"get_buffer loop x{steps}", case_get_buffer_loop, w, steps)
    cases.run(f"create/destroy x{cycles} (garbage collected)", case_create_destroy, w, cycles, False)
    cases.run(f"create/destroy x{max(1, cycles // 10)} (explicitly_destroy)", case_create_destroy, w,
              max(1, cycles // 10), True)
    if mpi_comm is not None:
        cases.run(f"MPI create/destroy x{cycles}", case_create_destroy_mpi, w, cycles)
    else:
        cases.skip("MPI create/destroy", "needs mpiexec")
    callers.drop_buffer()
    code = cases.finish()
    harness_group.close()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(run(parse_args()))
