"""LowLatencyGpu: the low-latency family's launcher (decoding): expert-major dispatch / combine over one NVSHMEM
symmetric buffer of two alternating halves (cuda_src/epcomm/low_latency.cuh; plan: epcomm/low_latency.py)."""
from __future__ import annotations

import dataclasses
import os

from .. import low_latency as plan
from ..errors import ConfigError
from ..handles import LowLatencyHandle
from ..interop import BF16
from ..runtime import diagnostics, get_kernel


class LowLatencyGpu:
    """ctx: the GpuContext. num_rdma_bytes: bytes of the symmetric buffer (Buffer.get_low_latency_rdma_size_hint);
    0 sizes it on the first call for that call's shapes (a collective allocation: every rank makes the same first
    call).

    Ordering rules (what makes a half safe to rewrite without acknowledgements):
    - Dispatch calls alternate halves, combine calls alternate halves (host counters; a CUDA graph bakes the half of
      each captured call in). A half is rewritten by the call after next of the same kind; by then every rank has run
      the receive of the earlier call, provided that (a) each dispatch's receive (the hook) runs before the dispatch
      after next is issued, likewise for combines, and (b) with two dispatches in flight at once (send, send, hook,
      hook), a combine follows them before the next dispatch (the usual MoE layer). A CUDA graph must capture
      dispatch/combine pairs, or an even number of calls of each kind.
    - A change of (Tmax, hidden, num_experts) re-lays the buffer: outside CUDA-graph capture every rank cleans it
      (collective: barrier, memset of the signals, barrier), as clean_low_latency_buffer does.
    """

    def __init__(self, ctx, num_rdma_bytes: int):
        self.ctx = ctx
        self.group = ctx.group
        self.rank, self.num_ranks = ctx.rank, ctx.num_ranks
        if self.num_ranks > plan.MAX_RANKS:
            raise ConfigError(f"low_latency_mode: expected at most {plan.MAX_RANKS} ranks, got {self.num_ranks}")
        self.tuning = plan.default_tuning()
        self.defines = diagnostics.defines("low_latency")  # compile-time diagnostics (EPCOMM_DEBUG_*), () normally
        self.nbytes = int(num_rdma_bytes)
        self.sym = None            # uint8 CuPy array over the symmetric buffer (nvshmem.core.array)
        self.layout: plan.LowLatencyLayout | None = None
        self.dispatch_calls = 0    # host call counters: the half of the next call is the parity
        self.combine_calls = 0
        cp = ctx.cp
        # [dispatch half 0, dispatch half 1, combine half 0, combine half 1]: calls made on each (device-owned).
        self.epochs = ctx.zeros(4, cp.uint64)
        self.block_counters = ctx.zeros(2, cp.int32)   # [dispatch_send, combine_send] last-block-out
        self.expert_counters = ctx.zeros(1024, cp.int32)
        self._retired: list = []   # arrays replaced while kernels may still use them (kept alive)
        if not self.group.nvshmem_started:
            # The symmetric heap must hold the buffer (NVSHMEM's default is 1 GiB); same value on every rank.
            want = max(self.nbytes + (256 << 20), 1 << 30)
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(want))
        self.group.init_nvshmem()
        if self.nbytes:
            self._allocate(self.nbytes)

    def set_tuning(self, **changes) -> plan.LowLatencyTuning:
        old, self.tuning = self.tuning, dataclasses.replace(self.tuning, **changes)
        return old

    # -- memory --------------------------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> None:
        """Collective: every rank allocates the same size, zeroed, then a barrier (no peer writes before that)."""
        import nvshmem.core as nvshmem
        sizes = self.group.allgather(int(nbytes))
        if len(set(sizes)) != 1:
            raise ConfigError(f"num_rdma_bytes: every rank must pass the same size, got {sizes}")
        self.sym = nvshmem.array((int(nbytes),), dtype="uint8")
        self.nbytes = int(nbytes)
        self.sym.fill(0)
        self.ctx.cp.cuda.Device().synchronize()
        self.group.barrier()

    @property
    def base_ptr(self) -> int:
        return int(self.sym.data.ptr)

    def _ensure_expert_counters(self, num_experts: int) -> None:
        if self.expert_counters.size < num_experts:
            self._retired.append(self.expert_counters)
            self.expert_counters = self.ctx.zeros(num_experts, self.ctx.cp.int32)

    def _prepare(self, tmax: int, hidden: int, num_experts: int, call) -> plan.LowLatencyLayout:
        """The layout for these shapes: allocates on first use (num_rdma_bytes=0), cleans on a change of shapes."""
        lay = plan.LowLatencyLayout.plan(tmax, hidden, self.num_ranks, num_experts)
        if self.layout is not None and self.layout.key == lay.key:
            return self.layout
        capturing = call is not None and call.stream is not None and call.stream.is_capturing()
        if self.sym is None:
            if capturing:
                raise ConfigError("low_latency_dispatch: the first low-latency call allocates the buffer; make one "
                                  "outside CUDA-graph capture (or pass num_rdma_bytes)")
            self._allocate(lay.total_bytes)
        if lay.total_bytes > self.nbytes:
            need = plan.rdma_size_hint(tmax, hidden, self.num_ranks, num_experts)
            raise ConfigError(f"num_rdma_bytes: Tmax={tmax}, hidden={hidden}, num_experts={num_experts} on "
                              f"{self.num_ranks} ranks need {need} bytes (get_low_latency_rdma_size_hint); this "
                              f"Buffer has {self.nbytes}")
        if self.layout is not None:
            if capturing:
                raise ConfigError("low-latency shapes changed during CUDA-graph capture: make one call with the new "
                                  "shapes (Tmax, hidden, num_experts) before capturing")
            self._clean(lay)
        self.layout = lay
        self._ensure_expert_counters(num_experts)
        return lay

    def _clean(self, lay: plan.LowLatencyLayout) -> None:
        """Collective reset: wait for every rank's low-latency work, zero both halves' signals, the epochs and the
        counters, and let no rank send before every rank has zeroed."""
        cp = self.ctx.cp
        self.ctx.stream.synchronize()
        cp.cuda.Device().synchronize()
        self.group.bounded_barrier("ll_clean")  # a rank that never comes is a CommTimeoutError, not a hang
        for half in (0, 1):
            start = lay.half_offset(half)
            self.sym[start:start + lay.signal_bytes].fill(0)
        self.epochs.fill(0)
        self.block_counters.fill(0)
        self.expert_counters.fill(0)
        cp.cuda.Device().synchronize()
        self.group.bounded_barrier("ll_clean")
        self.dispatch_calls = self.combine_calls = 0

    def clean(self, tmax: int, hidden: int, num_experts: int) -> None:
        """clean_low_latency_buffer: collective; afterwards the buffer is laid out for these shapes."""
        lay = plan.LowLatencyLayout.plan(tmax, hidden, self.num_ranks, num_experts)
        if self.sym is None:
            self._allocate(lay.total_bytes)
        if lay.total_bytes > self.nbytes:
            raise ConfigError(f"num_rdma_bytes: these shapes need {lay.total_bytes} bytes, this Buffer has "
                              f"{self.nbytes}")
        self._ensure_expert_counters(num_experts)
        self._clean(lay)
        self.layout = lay

    def _epoch_ptr(self, kind: int, half: int) -> int:
        return int(self.epochs.data.ptr) + 8 * (kind + half)

    def _counter_ptr(self, i: int) -> int:
        return int(self.block_counters.data.ptr) + 4 * i

    def _combine_send_view(self, lay: plan.LowLatencyLayout, half: int):
        start = lay.half_offset(half) + lay.off_combine_send
        rows = self.num_ranks * lay.num_max_dispatch_tokens_per_rank
        nbytes = lay.num_local_experts * rows * lay.hidden * 2
        return self.sym[start:start + nbytes].view(BF16).reshape(lay.num_local_experts, rows, lay.hidden)

    def _split(self, call, keep, lay: plan.LowLatencyLayout, receive, return_recv_hook: bool, what: str):
        """The end of a call whose send kernel is launched: (None, event of send and receive) with receive() launched
        now, or (hook, event of the send) with return_recv_hook. hook() launches receive() after the caller's stream
        as it is then and returns the receive's Event. keep: arrays the kernels use (kept alive by the events)."""
        ctx = self.ctx
        if not return_recv_hook:
            receive()
            return None, ctx.finish(call, keep)

        def hook():
            if self.layout is None or self.layout.key != lay.key:
                raise ConfigError(f"hook: the low-latency buffer was re-laid out (new shapes or a clean) since this "
                                  f"{what}; its data is gone")
            ctx.begin(call)
            receive()
            return ctx.finish(call, keep)

        return hook, ctx.finish(call, keep)

    # -- dispatch ------------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook,
                 cumulative_stats, wait_stats, call):
        """Returns (recv_x, recv_count, handle, hook or None, event); shapes as Buffer.low_latency_dispatch, hook as
        _split."""
        ctx, cp, tuning = self.ctx, self.ctx.cp, self.tuning
        t, h = x.shape
        k = topk_idx.shape[1]
        r = self.num_ranks
        if k > plan.MAX_TOPK:
            raise ConfigError(f"topk_idx: expected at most {plan.MAX_TOPK} columns on the GPU, got [{t}, {k}]")
        lay = self._prepare(tmax, h, num_experts, call)
        e_local = lay.num_local_experts
        half = self.dispatch_calls & 1
        self.dispatch_calls += 1
        base = self.base_ptr
        half_off = lay.half_offset(half)
        rows = r * tmax
        num_scales = h // plan.FP8_BLOCK
        ctx.begin(call)
        with ctx.alloc_stream(call):
            if use_fp8:
                data = cp.empty((e_local, rows, h), cp.uint8)  # e4m3 bits (CuPy has no float8 dtype)
                if use_ue8m0:
                    scales = cp.empty((e_local, (num_scales + 3) // 4, rows), cp.int32)
                else:
                    scales = cp.empty((e_local, num_scales, rows), cp.float32)
                recv_x = (data, scales.transpose(0, 2, 1))
            else:
                data = cp.empty((e_local, rows, h), BF16)
                scales = None
                recv_x = data
            src_info = cp.empty((e_local, rows), cp.int32)
            layout_range = cp.empty((e_local, r), cp.int64)
            recv_count = cp.empty(e_local, cp.int32)
            expert_rows = cp.empty((r, tmax, k), cp.int32)  # (source, token, k) -> row, for combine
        comm = ctx.comm_args()
        get_kernel(plan.dispatch_send_spec(use_fp8, round_scale)).launch(
            max(1, min(t, 2 * ctx.num_sms)),
            dict(x=x, topk_idx=topk_idx, num_tokens=t, num_topk=k, hidden=h, num_experts=num_experts, num_ranks=r,
                 tmax=tmax, sym_base=base, off_signals=half_off + lay.off_dispatch_signals,
                 off_recv=half_off + lay.off_dispatch_recv, off_staging=half_off + lay.off_dispatch_send,
                 off_tokens=half_off + lay.off_dispatch_tokens, msg_stride=lay.msg_stride,
                 msg_bytes=plan.message_bytes(h, use_fp8), expert_counters=self.expert_counters,
                 block_counter=self._counter_ptr(0), epoch_counter=self._epoch_ptr(plan.EPOCH_DISPATCH, half),
                 force_nvshmem=int(tuning.force_nvshmem), once_per_rank=int(tuning.once_per_rank),
                 num_bad_indices=ctx.bad_index.device_ptr, expert_rows=expert_rows,
                 expert_rows_len=expert_rows.size, **comm),
            stream=ctx.stream)
        handle = LowLatencyHandle(src_info, layout_range, tmax, h, num_experts, t, half,
                                  state=plan.LowLatencyHandleState(layout_key=lay.key, expert_rows=expert_rows))
        bpe = plan.blocks_per_expert(e_local, ctx.num_sms)

        def receive():
            get_kernel(plan.dispatch_recv_spec(use_fp8, use_ue8m0)).launch(
                e_local * bpe,
                dict(local_base=base, off_signals=half_off + lay.off_dispatch_signals,
                     off_recv=half_off + lay.off_dispatch_recv, off_tokens=half_off + lay.off_dispatch_tokens,
                     msg_stride=lay.msg_stride, hidden=h, num_ranks=r, num_local_experts=e_local, tmax=tmax,
                     blocks_per_expert=bpe, num_topk=k, epoch_counter=self._epoch_ptr(plan.EPOCH_DISPATCH, half),
                     out_x=data, out_scales=scales, out_src_info=src_info, out_layout_range=layout_range,
                     out_count=recv_count, cumulative_stats=cumulative_stats, wait_stats=wait_stats,
                     out_expert_rows=expert_rows, **ctx.comm_args()),
                stream=ctx.stream)

        hook, ev = self._split(call, (x, topk_idx, cumulative_stats, wait_stats), lay, receive, return_recv_hook,
                               "dispatch")
        return recv_x, recv_count, handle, hook, ev

    # -- combine -------------------------------------------------------------------------------------------
    def next_combine_buffer(self, handle):
        """The [E_local, R*Tmax, H] bf16 view of symmetric memory the next zero-copy combine reads."""
        lay = self._prepare(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts, None)
        return self._combine_send_view(lay, self.combine_calls & 1)

    def combine(self, x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, call):
        """Returns (combined [T, H] bf16, hook or None, event); semantics as Buffer.low_latency_combine, hook as
        _split."""
        ctx, cp, tuning = self.ctx, self.ctx.cp, self.tuning
        t, k = topk_idx.shape
        if k > plan.MAX_TOPK:
            raise ConfigError(f"topk_idx: expected at most {plan.MAX_TOPK} columns on the GPU, got [{t}, {k}]")
        if not isinstance(handle.state, plan.LowLatencyHandleState):
            raise ConfigError("handle: expected the handle of a low-latency dispatch made by this Buffer on the GPU")
        tmax, h, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        lay = self._prepare(tmax, h, e, call)
        e_local, r = lay.num_local_experts, self.num_ranks
        half = self.combine_calls & 1
        self.combine_calls += 1
        if zero_copy:
            x = self._combine_send_view(lay, half)
        base = self.base_ptr
        half_off = lay.half_offset(half)
        ctx.begin(call)
        with ctx.alloc_stream(call):
            result = out if out is not None else cp.empty((t, h), BF16)
        expert_rows = handle.state.expert_rows  # [R, Tmax, K of the dispatch]
        once = tuning.combine_sums_once(k, r)
        if once and expert_rows.shape[2] != k:
            raise ConfigError(f"topk_idx: the combine got {k} columns, the dispatch of this handle "
                              f"{expert_rows.shape[2]}; pass the dispatch's topk_idx")
        # Once per rank, most of the work is dealt over the whole grid: one wave (a block per SM) where E_local allows.
        bpe = tuning.combine_send_blocks_per_expert or (max(1, ctx.num_sms // e_local) if once else
                                                        plan.blocks_per_expert(e_local, ctx.num_sms))
        get_kernel(plan.combine_send_spec(self.defines)).launch(
            e_local * bpe,
            dict(x=x, hidden=h, src_info=handle.src_info, layout_range=handle.layout_range, num_ranks=r,
                 num_local_experts=e_local, tmax=tmax, blocks_per_expert=bpe, sym_base=base,
                 off_signals=half_off + lay.off_combine_signals, off_recv=half_off + lay.off_combine_recv,
                 off_staging=half_off + lay.off_combine_send, zero_copy=int(bool(zero_copy)),
                 block_counter=self._counter_ptr(1), epoch_counter=self._epoch_ptr(plan.EPOCH_COMBINE, half),
                 force_nvshmem=int(tuning.force_nvshmem), once_per_rank=int(once), topk_idx=topk_idx,
                 topk_weights=topk_weights, num_tokens=t, num_topk=k, expert_rows=expert_rows if once else None,
                 off_weight_signals=half_off + lay.off_weight_signals, off_weights=half_off + lay.off_combine_weights,
                 off_partial=half_off + lay.off_combine_partial, **ctx.comm_args()),
            stream=ctx.stream)

        def receive():
            get_kernel(plan.combine_recv_spec()).launch(
                max(1, min(t, 2 * ctx.num_sms)),
                dict(local_base=base, off_signals=half_off + lay.off_combine_signals,
                     off_recv=half_off + lay.off_combine_recv, off_partial=half_off + lay.off_combine_partial,
                     hidden=h, num_experts=e, num_ranks=r, tmax=tmax, topk_idx=topk_idx, topk_weights=topk_weights,
                     num_tokens=t, num_topk=k, epoch_counter=self._epoch_ptr(plan.EPOCH_COMBINE, half), out=result,
                     **ctx.comm_args()),
                stream=ctx.stream)

        hook, ev = self._split(call, (x, topk_idx, topk_weights, handle.src_info, handle.layout_range, expert_rows,
                                      result), lay, receive, return_recv_hook, "combine")
        return result, hook, ev

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Collective: frees the symmetric buffer once every rank's kernels are done."""
        if self.sym is None:
            return
        import nvshmem.core as nvshmem
        try:
            self.ctx.stream.synchronize()
            self.ctx.cp.cuda.Device().synchronize()
        finally:
            self.group.barrier()  # no peer still writes into this rank's copy
            nvshmem.free_array(self.sym)
            self.sym = None
