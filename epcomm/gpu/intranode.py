"""IntranodeGpu: the intranode family's launcher (ranks that reach each other through NVLink peer pointers): notify,
dispatch, cached dispatch and combine over one IPC-mapped NVLink buffer per rank (cuda_src/epcomm/intranode.cuh;
plan: epcomm/intranode.py).

Epochs: each notify / combine call bumps a device counter that every rank bumps identically; flags hold the epoch
of their last signal, so no flag is ever reset.
"""
from __future__ import annotations

import dataclasses

from .. import intranode as plan
from .. import sizing
from ..errors import ConfigError
from ..handles import DispatchHandle
from ..interop import BF16
from ..memory import HostMapped, PeerBuffer
from ..runtime import diagnostics, get_kernel
from ..runtime.watchdog import ERR_CAPACITY, host_wait


class IntranodeGpu:
    """ctx: the GpuContext. num_nvl_bytes: bytes of this rank's NVLink buffer (> the meta area; every rank the same).
    Needs every rank P2P-reachable (Topology.all_p2p): GpuBackend builds it only then."""

    def __init__(self, ctx, num_nvl_bytes: int):
        self.ctx = ctx
        cp, r = ctx.cp, ctx.num_ranks
        self.meta_bytes = plan.meta_bytes(r)
        if num_nvl_bytes <= self.meta_bytes:
            raise ConfigError(f"num_nvl_bytes: expected more than {self.meta_bytes} bytes (the meta area), "
                              f"got {num_nvl_bytes}")
        self.tuning = plan.default_tuning(r)
        self.defines = diagnostics.defines("intranode")  # compile-time diagnostics (EPCOMM_DEBUG_*), () normally
        self.nvl = PeerBuffer(ctx.group, num_nvl_bytes)
        self.data_bytes = self.nvl.nbytes - self.meta_bytes
        self.host_info = HostMapped(plan.HOST_INFO_INTS)
        self.block_counters = ctx.zeros(plan.NUM_COUNTERS, cp.int32)
        # Device epoch counters ([0] dispatch/notify, [1] combine): advanced by the kernels themselves, so that
        # CUDA-graph replays advance them too. host_seq numbers the host waits of non-graph dispatches.
        self.epochs = ctx.zeros(2, cp.uint64)
        self.host_seq = 0
        # Whether the latest dispatch left its outputs in the buffer (zero-copy): combine then stages its rows above
        # zero_copy_split. The same on every rank, as all ranks make the same calls.
        self.outputs_in_buffer = False

    @property
    def nbytes(self) -> int:
        return self.nvl.nbytes

    def set_tuning(self, **changes) -> plan.IntranodeTuning:
        old, self.tuning = self.tuning, dataclasses.replace(self.tuning, **changes)
        return old

    def _epoch_ptr(self, i: int) -> int:
        return int(self.epochs.data.ptr) + 8 * i

    def _counter(self, kernel: str) -> int:
        return int(self.block_counters.data.ptr) + 4 * plan.COUNTER_SLOTS[kernel]

    # -- dispatch ------------------------------------------------------------------------------------------
    def _notify(self, in_rank, t, per_expert, num_experts, alignment, send_pos, matrix, prefix, info, capacity,
                do_count):
        ctx = self.ctx
        self.host_seq = self.host_seq % 0x7FFFFFFF + 1
        ctx.mark("start")
        get_kernel(plan.notify_spec(ctx.num_ranks)).launch(
            1, dict(is_token_in_rank=in_rank, num_tokens=t, num_tokens_per_expert=per_expert, num_experts=num_experts,
                    expert_alignment=alignment, send_pos=send_pos, count_matrix=matrix, prefix_matrix=prefix,
                    info_out=info, host_info=self.host_info.device_ptr if do_count else 0, capacity_rows=capacity,
                    peer_bases=self.nvl.peer_bases, epoch_counter=self._epoch_ptr(0), do_count=1 if do_count else 0,
                    host_seq=self.host_seq, **ctx.comm_args()),
            stream=ctx.stream)
        ctx.mark("notify")

    def _wait_host_info(self) -> None:
        ctx, seq, info = self.ctx, self.host_seq, self.host_info.host

        def ready():
            return ctx.err.has_error() or int(info[plan.HOST_INFO_EPOCH]) == seq

        host_wait(ready, f"rank {ctx.rank}: dispatch waiting for the receive count (call {seq})", ctx.timeout_s)
        ctx.check("dispatch notify")

    def _sized(self, exc, row_bytes, num_scales, num_topk, zero_copy) -> ConfigError:
        """A capacity error of notify (a rank would receive more rows than the receive area holds) with the
        num_nvl_bytes that would hold them; any other error as it is."""
        rec = self.ctx.err.read()
        if int(rec["code"]) != ERR_CAPACITY:
            return exc
        r = self.ctx.num_ranks
        need = sizing.smallest_nvl_bytes(
            lambda b: sizing.dispatch_capacity(b, r, row_bytes, num_scales, num_topk, zero_copy),
            int(rec["observed"]), r)
        return ConfigError(f"{exc} Make the Buffer with num_nvl_bytes >= {need} "
                           f"(Config(num_max_tokens=...).get_nvl_buffer_size_hint(hidden_bytes, num_ranks"
                           f"{', zero_copy=True' if zero_copy else ''}) for your largest batch).")

    def _recv_layout(self, row_bytes, num_scales, num_topk, zero_copy) -> plan.RecvLayout:
        return plan.recv_layout(self.data_bytes, row_bytes, num_scales, num_topk, zero_copy)

    @staticmethod
    def _check_zero_copy_rows(lay, rows, zero_copy) -> None:
        """A zero-copy dispatch's outputs are rows of the receive area: at most lay.capacity_rows of them."""
        if zero_copy and rows > lay.capacity_rows:
            raise ConfigError(f"num_worst_tokens: a zero-copy dispatch holds at most {lay.capacity_rows} rows in this "
                              f"Buffer, got {rows} (raise num_nvl_bytes: "
                              "Config.get_nvl_buffer_size_hint(..., zero_copy=True))")

    def _recv_outputs(self, lay, rows, h, dtype, s, k, zero_copy, call, with_meta=True):
        """The dispatch outputs: fresh arrays, or (zero_copy) views of this rank's receive area (its rows are
        already in receive order there); src_idx is always fresh (the handle keeps it past the next dispatch).
        Returns (x, scales, topk_idx, topk_weights, src_idx); None where absent."""
        cp = self.ctx.cp
        self._check_zero_copy_rows(lay, rows, zero_copy)
        with self.ctx.alloc_stream(call):
            src = cp.empty(rows, cp.int32) if with_meta else None
            if not zero_copy:
                return (cp.empty((rows, h), dtype), cp.empty((rows, s), cp.float32) if s else None,
                        cp.empty((rows, k), cp.int64) if k and with_meta else None,
                        cp.empty((rows, k), cp.float32) if k and with_meta else None, src)
        loc, base = self.nvl.local, self.meta_bytes
        return (loc.view(base + lay.off_x, (rows, h), dtype),
                loc.view(base + lay.off_scales, (rows, s), cp.float32) if s else None,
                loc.view(base + lay.off_idx, (rows, k), cp.int64) if k and with_meta else None,
                loc.view(base + lay.off_w, (rows, k), cp.float32) if k and with_meta else None, src)

    def dispatch(self, x, topk_idx, topk_weights, in_rank, num_experts, alignment, worst, config, call,
                 num_tokens_per_expert=None, zero_copy=False):
        ctx, cp, r = self.ctx, self.ctx.cp, self.ctx.num_ranks
        data, scales = x if isinstance(x, tuple) else (x, None)
        t, h = data.shape
        row_bytes = h * data.dtype.itemsize
        s = scales.shape[1] if scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        e_local = num_experts // r
        if e_local > plan.MAX_LOCAL_EXPERTS:
            raise ConfigError(f"num_experts: expected at most {plan.MAX_LOCAL_EXPERTS} experts per rank, "
                              f"got {e_local}")
        lay = self._recv_layout(row_bytes, s, k, zero_copy)
        self._check_zero_copy_rows(lay, worst, zero_copy)  # before any kernel: num_worst_tokens is known now
        ctx.begin(call)
        with ctx.alloc_stream(call):
            send_pos = cp.empty((t, r), cp.int32)
            matrix = cp.empty((r, r), cp.int32)
            prefix = cp.empty((r, r), cp.int32)
            info = cp.empty(1 + e_local, cp.int32)
        per_expert = num_tokens_per_expert  # the layout's counts: the per-expert list needs no top-k here
        if per_expert is None:
            per_expert = ctx.zeros(num_experts, cp.int32)
        self._notify(in_rank, t, per_expert, num_experts, alignment, send_pos, matrix, prefix, info,
                     lay.capacity_rows, True)
        if worst:
            n, rows, counts = None, worst, []
        else:
            try:
                self._wait_host_info()
            except ConfigError as exc:
                raise self._sized(exc, row_bytes, s, k, zero_copy) from None
            n = int(self.host_info.host[0])
            rows = n
            counts = [int(c) for c in self.host_info.host[1:1 + e_local]]
        recv_x, recv_scales, recv_idx, recv_w, recv_src = self._recv_outputs(lay, rows, h, data.dtype, s, k,
                                                                             zero_copy, call)
        self._send_and_receive(data, scales, topk_idx, topk_weights, num_experts, send_pos, matrix, info,
                               lay, rows, recv_x, recv_scales, recv_idx, recv_w, recv_src, config, zero_copy)
        self.outputs_in_buffer = bool(zero_copy)
        handle = DispatchHandle(
            num_ranks=r, num_experts=num_experts, num_tokens=t, hidden=h, is_token_in_rank=in_rank,
            num_recv_tokens_per_source=matrix[:, ctx.rank], rank_prefix_matrix=prefix, recv_src_idx=recv_src,
            num_recv_tokens=n, num_worst_tokens=worst, send_pos=send_pos, device_num_recv_tokens=info[:1],
            state=plan.IntranodeHandleState(count_matrix=matrix, info=info, layout=lay))
        ev = ctx.finish(call, (x, topk_idx, topk_weights, in_rank))
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        return out_x, recv_idx, recv_w, counts, handle, ev

    def _send_and_receive(self, data, scales, topk_idx, topk_weights, num_experts, send_pos, matrix, info,
                          lay, rows, recv_x, recv_scales, recv_idx, recv_w, recv_src, config, zero_copy,
                          cached=False):
        """dispatch_send, then dispatch_recv. cached (no notify ran): dispatch_send is the barrier, sends no source
        index, and in zero-copy mode (nothing to copy out) also waits for the rows in place of dispatch_recv."""
        ctx, r, tuning = self.ctx, self.ctx.num_ranks, self.tuning
        t, h = data.shape
        row_int4 = h * data.dtype.itemsize // 16
        s = scales.shape[1] if scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        itemsize = 4
        grid = ctx.grid(config.num_sms)
        peer_blocks = (config.send_peer_sms if config.send_peer_sms is not None
                       else plan.default_peer_sms(grid, r, scales is not None))
        fused_barrier = cached and tuning.fuse_kernels
        fused_recv = fused_barrier and zero_copy  # a cached call has no index, weight or source outputs
        comm = ctx.comm_args()
        get_kernel(plan.dispatch_send_spec(r, config.num_threads, self.defines)).launch(
            grid, dict(x=data, row_int4=row_int4, scales=scales,
                       scale_stride_t=scales.strides[0] // itemsize if scales is not None else 0,
                       scale_stride_s=scales.strides[1] // itemsize if scales is not None else 0,
                       num_scales=s, topk_idx=topk_idx, topk_weights=topk_weights, num_topk=k,
                       num_experts=num_experts, send_pos=send_pos, count_matrix=matrix, num_tokens=t,
                       peer_bases=self.nvl.peer_bases, data_offset=self.meta_bytes, off_x=lay.off_x,
                       off_scales=lay.off_scales, off_idx=lay.off_idx, off_w=lay.off_w,
                       off_src=-1 if cached else lay.off_src, out_x=recv_x, out_scales=recv_scales, out_idx=recv_idx,
                       out_w=recv_w, out_src=recv_src, num_out_rows=rows, peer_blocks=peer_blocks,
                       dynamic=int(tuning.dynamic_tokens), fused_barrier=int(fused_barrier),
                       fused_recv=int(fused_recv), counters=self._counter("dispatch_send"),
                       epoch_counter=self._epoch_ptr(0), **comm),
            stream=ctx.stream)
        ctx.mark("dispatch_send")
        if fused_recv:
            return
        get_kernel(plan.dispatch_recv_spec(r, config.num_threads, self.defines)).launch(
            grid, dict(local_base=self.nvl.local.ptr, data_offset=self.meta_bytes, off_x=lay.off_x,
                       off_scales=lay.off_scales, off_idx=lay.off_idx, off_w=lay.off_w, off_src=lay.off_src,
                       row_int4=row_int4, num_scales=s, num_topk=k, info=info, count_matrix=matrix,
                       num_out_rows=rows, out_x=recv_x, out_scales=recv_scales, out_idx=recv_idx, out_w=recv_w,
                       out_src=recv_src, zero_copy=1 if zero_copy else 0, epoch_counter=self._epoch_ptr(0), **comm),
            stream=ctx.stream)
        ctx.mark("dispatch_recv")

    def cached_dispatch(self, x, handle: DispatchHandle, config, call, zero_copy=False):
        ctx = self.ctx
        data, scales = x if isinstance(x, tuple) else (x, None)
        t, h = data.shape
        if h != handle.hidden:
            raise ConfigError(f"x: expected hidden {handle.hidden} (the handle's), got [{t}, {h}]")
        st = self._state(handle)
        s = scales.shape[1] if scales is not None else 0
        lay = self._recv_layout(h * data.dtype.itemsize, s, 0, zero_copy)
        rows = handle.num_rows
        recv_x, recv_scales, _, _, _ = self._recv_outputs(lay, rows, h, data.dtype, s, 0, zero_copy, call, False)
        ctx.begin(call)
        if self.tuning.fuse_kernels:  # dispatch_send is the barrier (and advances the epoch)
            ctx.mark("start")
        else:
            self._notify(handle.is_token_in_rank, t, None, handle.num_experts, 1, None, None, None, None,
                         lay.capacity_rows, False)
        self._send_and_receive(data, scales, None, None, handle.num_experts, handle.send_pos,
                               st.count_matrix, st.info, lay, rows, recv_x, recv_scales, None, None, None,
                               config, zero_copy, cached=True)
        self.outputs_in_buffer = bool(zero_copy)
        ev = ctx.finish(call, (x,))
        return ((recv_x, recv_scales) if scales is not None else recv_x), ev

    @staticmethod
    def _state(handle: DispatchHandle) -> plan.IntranodeHandleState:
        if not isinstance(handle.state, plan.IntranodeHandleState):
            raise ConfigError("handle: expected the handle of a dispatch made by this Buffer's intranode kernels")
        return handle.state

    # -- combine -------------------------------------------------------------------------------------------
    def _combine_layout(self, handle: DispatchHandle, k: int, what: str) -> plan.CombineLayout:
        """The staging layout of a combine of handle (intranode.combine_layout), checked to hold its rows."""
        lay = plan.combine_layout(self.data_bytes, handle.hidden, k, self.outputs_in_buffer)
        rows = handle.num_rows
        if rows > lay.capacity_rows:
            hint = ", zero_copy=True" if self.outputs_in_buffer else ""
            raise ConfigError(f"{what}: combine of {rows} rows of {handle.hidden * 2 + 4 * k} bytes needs that many "
                              f"staging rows; this Buffer holds {lay.capacity_rows} (raise num_nvl_bytes, see "
                              f"Config.get_nvl_buffer_size_hint(...{hint}))")
        return lay

    def _combine_view(self, lay, handle: DispatchHandle):
        return self.nvl.local.view(self.meta_bytes + lay.off_x, (handle.num_rows, handle.hidden), BF16)

    def get_combine_buffer(self, handle: DispatchHandle):
        """The [N, H] bf16 view of this rank's staging rows that a zero-copy combine of handle reads (see
        Buffer.get_combine_buffer)."""
        return self._combine_view(self._combine_layout(handle, 0, "get_combine_buffer"), handle)

    def combine(self, x, handle: DispatchHandle, topk_weights, bias, config, call, zero_copy=False):
        ctx, cp, tuning = self.ctx, self.ctx.cp, self.tuning
        t, h, r = handle.num_tokens, handle.hidden, ctx.num_ranks
        k = topk_weights.shape[1] if topk_weights is not None else 0
        st = self._state(handle)
        lay = self._combine_layout(handle, k, "x")
        rows = handle.num_rows
        if zero_copy:
            view = self._combine_view(lay, handle)
            if x is not None and int(x.data.ptr) != int(view.data.ptr):
                raise ConfigError("x: a zero-copy combine reads the array get_combine_buffer(handle) returned, and "
                                  "this is another array (or the buffer moved: call get_combine_buffer after the "
                                  "latest dispatch); pass x=None or that array")
            x = view
        ctx.begin(call)
        with ctx.alloc_stream(call):
            out = cp.empty((t, h), x.dtype)
            out_w = cp.empty((t, k), cp.float32) if k else None
        grid = ctx.grid(config.num_sms)
        row_int4 = h * 2 // 16
        comm = ctx.comm_args()
        ctx.mark("start")
        # A zero-copy combine without weights has nothing to stage: combine_reduce signals the rows itself.
        fused_stage = zero_copy and topk_weights is None and tuning.fuse_kernels
        if not fused_stage:
            get_kernel(plan.combine_stage_spec(r, config.num_threads, self.defines)).launch(
                grid, dict(x=x, row_int4=row_int4, topk_weights=topk_weights, num_topk=k,
                           count_matrix=st.count_matrix, num_rows=rows, peer_bases=self.nvl.peer_bases,
                           data_offset=self.meta_bytes, off_cx=lay.off_x, off_cw=lay.off_w,
                           zero_copy=1 if zero_copy else 0, counters=self._counter("combine_stage"),
                           epoch_counter=self._epoch_ptr(1), **comm),
                stream=ctx.stream)
            ctx.mark("combine_stage")
        warps = grid * config.num_threads // 32
        # Launched also with no tokens: it still waits for every rank's staged flag, closing the call.
        get_kernel(plan.combine_reduce_spec(r, config.num_threads, self.defines)).launch(
            grid if t else 1,
            dict(peer_bases=self.nvl.peer_bases, data_offset=self.meta_bytes, off_cx=lay.off_x, off_cw=lay.off_w,
                 row_int4=row_int4, num_topk=k, send_pos=handle.send_pos, count_matrix=st.count_matrix,
                 num_tokens=t, bias0=bias[0] if len(bias) > 0 else None, bias1=bias[1] if len(bias) > 1 else None,
                 x_local=x, w_local=topk_weights, out=out, out_w=out_w, num_parts=tuning.reduce_parts,
                 tail_tokens=tuning.tail_tokens(t, warps), dynamic=int(tuning.dynamic_tokens),
                 fused_stage=int(fused_stage), counters=self._counter("combine_reduce"),
                 epoch_counter=self._epoch_ptr(1), **comm),
            stream=ctx.stream)
        ctx.mark("combine_reduce")
        return out, out_w, ctx.finish(call, (x, topk_weights, bias))

    def close(self) -> None:
        self.nvl.close()
        self.host_info.free()
