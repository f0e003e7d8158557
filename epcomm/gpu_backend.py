"""The GPU backend: CuPy arrays, the Buffer's communication stream, and the intranode kernels over NVLink.

Stream rule (interop's ordering promise): every call makes the comm stream wait for the caller's stream (or
previous_event), issues its kernels there, records an event, and unless async_finish makes the caller's
stream wait for it. Epochs: each notify / combine call bumps a counter that every rank bumps identically;
flags hold the epoch of their last signal, so no flag is ever reset.
"""
from __future__ import annotations

import numpy as np

from . import intranode as intra
from .config import env
from .errors import CommTimeoutError, ConfigError, EpcommError
from .handles import DispatchHandle, Event
from .memory import HostMapped, PeerBuffer
from .runtime import get_kernel
from .runtime.watchdog import ErrorRecord, host_wait


def _ptr(a) -> int:
    return 0 if a is None else int(a.data.ptr)


class GpuBackend:
    name = "gpu"

    def __init__(self, group, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool):
        import cupy
        self.cp = cupy
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        if not group.topology.all_p2p():
            raise ConfigError("the GPU backend's normal kernels need every rank P2P-reachable (one NVLink node); "
                              f"topology: {group.topology}")
        if num_nvl_bytes == 0:
            num_nvl_bytes = intra.nvl_buffer_size_hint(4096, 7168 * 2, self.num_ranks, 16)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.err = ErrorRecord(self.rank)
        self.meta_bytes = intra.meta_bytes(self.num_ranks)
        if num_nvl_bytes <= self.meta_bytes:
            raise ConfigError(f"num_nvl_bytes: expected more than {self.meta_bytes} bytes (the meta area), "
                              f"got {num_nvl_bytes}")
        self.nvl = PeerBuffer(group, num_nvl_bytes)
        self.data_bytes = self.nvl.nbytes - self.meta_bytes
        self.host_info = HostMapped(intra.HOST_INFO_INTS)
        self.bad_index = HostMapped(1)
        self.block_counters = cupy.zeros(intra.NUM_COUNTERS, dtype=cupy.int32)
        # Device epoch counters ([0] dispatch/notify, [1] combine): advanced by the kernels themselves, so that
        # CUDA-graph replays advance them too. host_seq numbers the host waits of non-graph dispatches.
        self.epochs = cupy.zeros(2, dtype=cupy.uint64)
        self.host_seq = 0
        self.poisoned: str | None = None
        self.timeout_s = float(env("EPCOMM_TIMEOUT_S"))
        self.num_sms_device = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.low_latency = None
        self.trace: list | None = None  # set to [] to record per-kernel timestamps (bench: graph_split, --trace)
        self.trace_stamps = cupy.zeros(256, cupy.uint64)
        self.kernel_trace = False  # diagnostics (bench): kernels also write in-kernel timestamps (see _marks)
        # Diagnostics (bench): dispatch_send's parts, bit 0 peer rows, bit 1 own rows, bit 2 per-row metadata.
        self.send_role_mask = 7
        # Diagnostics (bench, to time each against the other in one run; True in normal use): dynamic_tokens lets
        # dispatch_send's and combine_reduce's warps take tokens from a ticket counter (else a static deal);
        # fuse_kernels runs a cached dispatch without notify (dispatch_send is the barrier), a zero-copy cached
        # dispatch without dispatch_recv (the send's last block waits for the rows), and a zero-copy combine without
        # weights without combine_stage (combine_reduce signals its rows).
        self.dynamic_tokens = True
        self.fuse_kernels = True
        # combine_reduce's work items (bench sweeps them): the last reduce_tail_warps x (its warp count) tokens are
        # split into reduce_parts channel ranges each, the others are whole tokens (None: every token is split).
        # Default: quarter tokens for the last (warp count) tokens, the best of eight settings in two runs
        # (bench/NOTES.md: 196.4 against 198.5 us for half tokens everywhere).
        self.reduce_parts = 4
        self.reduce_tail_warps: float | None = 1.0
        # Whether the latest dispatch left its outputs in the buffer (zero-copy): combine then stages its rows above
        # zero_copy_split. The same on every rank, as all ranks make the same calls.
        self.outputs_in_buffer = False
        if low_latency_mode:
            from .low_latency import LowLatencyGpu
            self.low_latency = LowLatencyGpu(self, num_rdma_bytes)

    # -- plumbing ------------------------------------------------------------------------------------------
    def _mark(self, name: str) -> None:
        """Diagnostics (bench): a device timestamp on the comm stream between kernels, to split a call's time (a
        kernel, not an event, so that it also works inside CUDA graphs). self.trace is a list of names; slot i of
        self.trace_stamps (uint64, ns) gets the time the stream reached the i-th mark."""
        if self.trace is not None:
            from .probe import timestamp
            timestamp(self.trace_stamps, len(self.trace) % self.MARKS_BASE, stream=self.stream)
            self.trace.append(name)

    KERNEL_MARKS = ("dispatch_send", "dispatch_recv", "combine_stage", "combine_reduce")
    MARKS_BASE = 128  # kernel marks live in trace_stamps[128:], 8 per kernel (the stream marks use [0, 128))

    def _marks(self, kernel: str) -> int:
        """Diagnostics (bench, kernel_trace): where `kernel` writes its in-kernel timestamps, or 0 (none)."""
        if not self.kernel_trace:
            return 0
        slot = self.MARKS_BASE + 8 * self.KERNEL_MARKS.index(kernel)
        return int(self.trace_stamps.data.ptr) + 8 * slot

    def _comm(self):
        return tuple(self.err.wait_params())

    def _check(self, what: str) -> None:
        if self.poisoned:
            raise EpcommError(f"this Buffer is unusable after an earlier failure ({self.poisoned}); destroy it")
        try:
            self.err.check(what)
        except CommTimeoutError as exc:
            self.poisoned = str(exc)
            raise
        if self.bad_index.host[0]:
            n = int(self.bad_index.host[0])
            self.bad_index.host[0] = 0
            raise ConfigError(f"topk_idx: expected expert indices in [-1, num_experts), the layout kernel found {n} "
                              "out of range (they were ignored)")

    def _begin(self, ctx):
        self._check("before the call")
        if ctx.previous_event is not None and ctx.previous_event.cuda_event is not None:
            self.stream.wait_event(ctx.previous_event.cuda_event)
        else:
            self.stream.wait_event(ctx.stream.record())

    def _finish(self, ctx, keepalive=()) -> Event:
        ev = self.stream.record()
        if not ctx.async_finish:
            ctx.stream.wait_event(ev)
        out = Event(ev, on_complete=lambda: self._check("after the call"))
        out.keepalive = keepalive
        return out

    def _alloc_stream(self, ctx):
        """Where outputs are allocated (cp.empty only: no kernel, so the comm stream needs no extra wait; the
        _begin wait already orders it after the caller's earlier use of any reused pool memory)."""
        return self.stream if ctx.allocate_on_comm_stream else ctx.stream

    def _grid(self, config) -> int:
        return max(1, min(int(config.num_sms), self.num_sms_device))

    # -- layout --------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, ctx):
        cp = self.cp
        self._begin(ctx)
        t, k = topk_idx.shape
        bucket = intra.max_experts_bucket(num_experts)
        with self.stream:  # zero-filled on the comm stream, so the kernel below is ordered after the fill
            counts = cp.zeros(self.num_ranks + num_experts, cp.int32)  # one fill for both count arrays
            per_rank, per_expert = counts[:self.num_ranks], counts[self.num_ranks:]
            in_rank = cp.empty((t, self.num_ranks), cp.bool_)  # every entry written by the kernel
        if t:
            get_kernel(intra.layout_spec(bucket)).launch(
                (t + intra.LAYOUT_THREADS - 1) // intra.LAYOUT_THREADS,
                (topk_idx, t, k, num_experts, self.num_ranks, per_rank, per_expert, in_rank, self.bad_index.device_ptr),
                stream=self.stream)
        ev = self._finish(ctx, (topk_idx,))
        return per_rank, None, per_expert, in_rank, ev

    # -- dispatch ------------------------------------------------------------------------------------------
    def _epoch_ptr(self, i: int) -> int:
        return int(self.epochs.data.ptr) + 8 * i

    def _notify(self, in_rank, t, per_expert, num_experts, alignment, send_pos, matrix, prefix, info, capacity,
                do_count):
        self.host_seq = self.host_seq % 0x7FFFFFFF + 1
        self._mark("start")
        get_kernel(intra.notify_spec(self.num_ranks)).launch(
            1, (in_rank, t, per_expert, num_experts, alignment, send_pos, matrix, prefix, info,
                self.host_info.device_ptr if do_count else 0, capacity, self.nvl.peer_bases, self._epoch_ptr(0),
                1 if do_count else 0, self.host_seq) + self._comm(), stream=self.stream)
        self._mark("notify")

    def _wait_host_info(self) -> None:
        seq = self.host_seq
        info = self.host_info.host

        def ready():
            return self.err.has_error() or int(info[intra.HOST_INFO_EPOCH]) == seq

        host_wait(ready, f"rank {self.rank}: dispatch waiting for the receive count (call {seq})", self.timeout_s)
        self._check("dispatch notify")

    def _recv_layout(self, row_bytes, num_scales, num_topk, zero_copy) -> "intra.RecvLayout":
        area = intra.zero_copy_split(self.data_bytes) if zero_copy else self.data_bytes
        return intra.RecvLayout.plan(area, row_bytes, num_scales, num_topk)

    @staticmethod
    def _check_zero_copy_rows(lay, rows, zero_copy) -> None:
        """A zero-copy dispatch's outputs are rows of the receive area: at most lay.capacity_rows of them."""
        if zero_copy and rows > lay.capacity_rows:
            raise ConfigError(f"num_worst_tokens: a zero-copy dispatch holds at most {lay.capacity_rows} rows in this "
                              f"Buffer, got {rows} (raise num_nvl_bytes: "
                              "Config.get_nvl_buffer_size_hint(..., zero_copy=True))")

    def _recv_outputs(self, lay, rows, h, dtype, s, k, zero_copy, ctx, with_meta=True):
        """The dispatch outputs: fresh arrays, or (zero_copy) views of this rank's receive area (its rows are
        already in receive order there); src_idx is always fresh (the handle keeps it past the next dispatch).
        Returns (x, scales, topk_idx, topk_weights, src_idx); None where absent."""
        cp = self.cp
        self._check_zero_copy_rows(lay, rows, zero_copy)
        with self._alloc_stream(ctx):
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

    def _dispatched(self, zero_copy: bool) -> None:
        self.outputs_in_buffer = bool(zero_copy)

    def dispatch(self, x, topk_idx, topk_weights, in_rank, num_experts, alignment, worst, config, ctx,
                 num_tokens_per_expert=None, zero_copy=False):
        cp = self.cp
        data, scales = x if isinstance(x, tuple) else (x, None)
        t, h = data.shape
        row_bytes = h * data.dtype.itemsize
        s = scales.shape[1] if scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        e_local = num_experts // self.num_ranks
        if e_local > intra.MAX_LOCAL_EXPERTS:
            raise ConfigError(f"num_experts: expected at most {intra.MAX_LOCAL_EXPERTS} experts per rank, "
                              f"got {e_local}")
        lay = self._recv_layout(row_bytes, s, k, zero_copy)
        self._check_zero_copy_rows(lay, worst, zero_copy)  # before any kernel: num_worst_tokens is known now
        self._begin(ctx)
        with self._alloc_stream(ctx):
            send_pos = cp.empty((t, self.num_ranks), cp.int32)
            matrix = cp.empty((self.num_ranks, self.num_ranks), cp.int32)
            prefix = cp.empty((self.num_ranks, self.num_ranks), cp.int32)
            info = cp.empty(1 + e_local, cp.int32)
        per_expert = num_tokens_per_expert  # the layout's counts: the per-expert list needs no top-k here
        if per_expert is None:
            with self.stream:
                per_expert = cp.zeros(num_experts, cp.int32)
        self._notify(in_rank, t, per_expert, num_experts, alignment, send_pos, matrix, prefix, info,
                     lay.capacity_rows, True)
        if worst:
            n, rows, counts = None, worst, []
        else:
            self._wait_host_info()
            n = int(self.host_info.host[0])
            rows = n
            counts = [int(c) for c in self.host_info.host[1:1 + e_local]]
        recv_x, recv_scales, recv_idx, recv_w, recv_src = self._recv_outputs(lay, rows, h, data.dtype, s, k,
                                                                             zero_copy, ctx)
        self._send_and_receive(data, scales, topk_idx, topk_weights, num_experts, send_pos, matrix, info,
                               lay, rows, recv_x, recv_scales, recv_idx, recv_w, recv_src, config, zero_copy)
        self._dispatched(zero_copy)
        handle = DispatchHandle(
            num_ranks=self.num_ranks, num_experts=num_experts, num_tokens=t, hidden=h, is_token_in_rank=in_rank,
            num_recv_tokens_per_source=matrix[:, self.rank], rank_prefix_matrix=prefix, recv_src_idx=recv_src,
            num_recv_tokens=n, num_worst_tokens=worst, send_pos=send_pos, device_num_recv_tokens=info[:1],
            backend_state={"count_matrix": matrix, "info": info, "layout": lay})
        ev = self._finish(ctx, (x, topk_idx, topk_weights, in_rank))
        out_x = (recv_x, recv_scales) if scales is not None else recv_x
        return out_x, recv_idx, recv_w, counts, handle, ev

    def _send_and_receive(self, data, scales, topk_idx, topk_weights, num_experts, send_pos, matrix, info,
                          lay, rows, recv_x, recv_scales, recv_idx, recv_w, recv_src, config, zero_copy,
                          cached=False):
        """dispatch_send, then dispatch_recv. cached (no notify ran): dispatch_send is the barrier, sends no source
        index, and in zero-copy mode (nothing to copy out) also waits for the rows in place of dispatch_recv."""
        t, h = data.shape
        row_int4 = h * data.dtype.itemsize // 16
        s = scales.shape[1] if scales is not None else 0
        k = topk_idx.shape[1] if topk_idx is not None else 0
        itemsize = 4
        stride_t = scales.strides[0] // itemsize if scales is not None else 0
        stride_s = scales.strides[1] // itemsize if scales is not None else 0
        grid = self._grid(config)
        peer_blocks = (config.send_peer_sms if config.send_peer_sms is not None
                       else intra.default_peer_sms(grid, self.num_ranks, scales is not None))
        fused_barrier = cached and self.fuse_kernels
        fused_recv = fused_barrier and zero_copy  # a cached call has no index, weight or source outputs
        get_kernel(intra.dispatch_send_spec(self.num_ranks, config.num_threads)).launch(
            grid, (data, row_int4, scales, stride_t, stride_s, s, topk_idx, topk_weights, k, num_experts,
                   send_pos, matrix, t, self.nvl.peer_bases, self.meta_bytes, lay.off_x, lay.off_scales, lay.off_idx,
                   lay.off_w, -1 if cached else lay.off_src, recv_x, recv_scales, recv_idx, recv_w, recv_src, rows,
                   peer_blocks, self.send_role_mask, int(self.dynamic_tokens), int(fused_barrier), int(fused_recv),
                   self._counter("dispatch_send"), self._epoch_ptr(0),
                   self._marks("dispatch_send")) + self._comm(), stream=self.stream)
        self._mark("dispatch_send")
        if fused_recv:
            return
        get_kernel(intra.dispatch_recv_spec(self.num_ranks, config.num_threads)).launch(
            grid, (self.nvl.local.ptr, self.meta_bytes, lay.off_x, lay.off_scales, lay.off_idx, lay.off_w, lay.off_src,
                   row_int4, s, k, info, matrix, rows, recv_x, recv_scales, recv_idx, recv_w, recv_src,
                   1 if zero_copy else 0, self._epoch_ptr(0), self._marks("dispatch_recv")) + self._comm(),
            stream=self.stream)
        self._mark("dispatch_recv")

    def _counter(self, kernel: str) -> int:
        return int(self.block_counters.data.ptr) + 4 * intra.COUNTER_SLOTS[kernel]

    def cached_dispatch(self, x, handle: DispatchHandle, config, ctx, zero_copy=False):
        data, scales = x if isinstance(x, tuple) else (x, None)
        t, h = data.shape
        if h != handle.hidden:
            raise ConfigError(f"x: expected hidden {handle.hidden} (the handle's), got [{t}, {h}]")
        st = handle.backend_state
        s = scales.shape[1] if scales is not None else 0
        lay = self._recv_layout(h * data.dtype.itemsize, s, 0, zero_copy)
        rows = handle.num_rows
        recv_x, recv_scales, _, _, _ = self._recv_outputs(lay, rows, h, data.dtype, s, 0, zero_copy, ctx, False)
        self._begin(ctx)
        if self.fuse_kernels:  # dispatch_send is the barrier (and advances the epoch)
            self._mark("start")
        else:
            self._notify(handle.is_token_in_rank, t, None, handle.num_experts, 1, None, None, None, None,
                         lay.capacity_rows, False)
        self._send_and_receive(data, scales, None, None, handle.num_experts, handle.send_pos,
                               st["count_matrix"], st["info"], lay, rows, recv_x, recv_scales, None, None, None,
                               config, zero_copy, cached=True)
        self._dispatched(zero_copy)
        ev = self._finish(ctx, (x,))
        return ((recv_x, recv_scales) if scales is not None else recv_x), ev

    # -- combine -------------------------------------------------------------------------------------------
    def _combine_layout(self, handle: DispatchHandle, k: int, what: str) -> "intra.CombineLayout":
        """Where combine stages its rows: above zero_copy_split while the latest dispatch's outputs live in the
        buffer, else from the start of the data region."""
        base = intra.zero_copy_split(self.data_bytes) if self.outputs_in_buffer else 0
        lay = intra.CombineLayout.plan(self.data_bytes, handle.hidden, k, base)
        rows = handle.num_rows
        if rows > lay.capacity_rows:
            hint = ", zero_copy=True" if self.outputs_in_buffer else ""
            raise ConfigError(f"{what}: combine of {rows} rows of {handle.hidden * 2 + 4 * k} bytes needs that many "
                              f"staging rows; this Buffer holds {lay.capacity_rows} (raise num_nvl_bytes, see "
                              f"Config.get_nvl_buffer_size_hint(...{hint}))")
        return lay

    def _combine_view(self, lay, handle: DispatchHandle):
        rows = handle.num_rows
        from .interop import BF16
        return self.nvl.local.view(self.meta_bytes + lay.off_x, (rows, handle.hidden), BF16)

    def get_combine_buffer(self, handle: DispatchHandle, num_topk: int):
        """The [N, H] bf16 view of this rank's staging rows that a zero-copy combine of handle reads (see
        Buffer.get_combine_buffer)."""
        return self._combine_view(self._combine_layout(handle, num_topk, "get_combine_buffer"), handle)

    def combine(self, x, handle: DispatchHandle, topk_weights, bias, config, ctx, zero_copy=False):
        cp = self.cp
        t, h, r = handle.num_tokens, handle.hidden, self.num_ranks
        k = topk_weights.shape[1] if topk_weights is not None else 0
        lay = self._combine_layout(handle, k, "x")
        rows = handle.num_rows
        if zero_copy:
            view = self._combine_view(lay, handle)
            if x is not None and int(x.data.ptr) != int(view.data.ptr):
                raise ConfigError("x: a zero-copy combine reads the array get_combine_buffer(handle) returned, and "
                                  "this is another array (or the buffer moved: call get_combine_buffer after the "
                                  "latest dispatch); pass x=None or that array")
            x = view
        st = handle.backend_state
        self._begin(ctx)
        with self._alloc_stream(ctx):
            out = cp.empty((t, h), x.dtype)
            out_w = cp.empty((t, k), cp.float32) if k else None
        grid = self._grid(config)
        row_int4 = h * 2 // 16
        self._mark("start")
        # A zero-copy combine without weights has nothing to stage: combine_reduce signals the rows itself.
        fused_stage = zero_copy and topk_weights is None and self.fuse_kernels
        if not fused_stage:
            get_kernel(intra.combine_stage_spec(r, config.num_threads)).launch(
                grid, (x, row_int4, topk_weights, k, st["count_matrix"], rows, self.nvl.peer_bases, self.meta_bytes,
                       lay.off_x, lay.off_w, 1 if zero_copy else 0, self._counter("combine_stage"),
                       self._epoch_ptr(1), self._marks("combine_stage")) + self._comm(), stream=self.stream)
            self._mark("combine_stage")
        b0 = bias[0] if len(bias) > 0 else None
        b1 = bias[1] if len(bias) > 1 else None
        warps = grid * config.num_threads // 32
        tail = t if self.reduce_tail_warps is None else min(t, int(round(self.reduce_tail_warps * warps)))
        # Launched also with no tokens: it still waits for every rank's staged flag, closing the call.
        get_kernel(intra.combine_reduce_spec(r, config.num_threads)).launch(
            grid if t else 1, (self.nvl.peer_bases, self.meta_bytes, lay.off_x, lay.off_w, row_int4, k,
                               handle.send_pos, st["count_matrix"], t, b0, b1, x, topk_weights,
                               out, out_w, self.reduce_parts, tail, int(self.dynamic_tokens), int(fused_stage),
                               self._counter("combine_reduce"), self._epoch_ptr(1),
                               self._marks("combine_reduce")) + self._comm(), stream=self.stream)
        self._mark("combine_reduce")
        ev = self._finish(ctx, (x, topk_weights, bias))
        return out, out_w, ev

    # -- low-latency (epcomm/low_latency.py: LowLatencyGpu) ------------------------------------------------
    def _ll(self):
        if self.low_latency is None:
            raise ConfigError("low_latency_mode: this Buffer was made without low_latency_mode=True")
        return self.low_latency

    def low_latency_dispatch(self, x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0,
                             return_recv_hook, cumulative_stats, wait_stats, ctx):
        return self._ll().dispatch(x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0,
                                   return_recv_hook, cumulative_stats, wait_stats, ctx)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, ctx):
        return self._ll().combine(x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, ctx)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll().next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._ll().clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def sync(self) -> None:
        self.stream.synchronize()
        self._check("synchronize")

    def close(self) -> None:
        try:
            self.stream.synchronize()
        finally:
            if self.low_latency is not None:
                self.low_latency.close()  # collective: frees the NVSHMEM buffer
            self.nvl.close()
            self.host_info.free()
            self.bad_index.free()
            self.err.close()
