"""The CPU backend: numpy arrays across mpi4py ranks, built on the reference's send and receive halves.

Each operation packs what this rank sends (reference *_send), exchanges the messages with one bounded alltoall
over the communicator (Group.exchange: CommTimeoutError instead of a hang), and unpacks what arrived
(reference *_recv). Slow, exact, and a way to develop MoE code on a laptop: `mpiexec -n 4 python my_model.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from . import agreement
from . import intranode as intranode_plan
from . import low_latency as low_latency_plan
from . import reference as ref
from . import sizing
from .errors import ConfigError
from .handles import DispatchHandle, Event, LowLatencyHandle
from .interop import as_numpy
from .validate import check_topk_range_host


@dataclass
class CpuDispatchState:
    """What a CPU dispatch keeps in its DispatchHandle: the array a zero-copy combine of it reads (made on demand)."""
    combine_buffer: np.ndarray | None = None


class CpuBackend:
    """The Backend protocol (epcomm/backend.py) on the host. It allocates no buffers and reports the sizes it was
    asked for, but a call that would not fit the GPU backend's buffers of those sizes raises the same ConfigError
    here (epcomm.sizing), so that code developed on CPUs does not first fail on a GPU. Tuning objects are kept (so
    code that tunes runs on both backends) but change nothing here: there are no kernels to tune."""
    name = "cpu"
    on_device = False

    def __init__(self, group, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, enable_shrink: bool = False):
        self.group = group
        self.num_nvl_bytes, self.num_rdma_bytes = int(num_nvl_bytes), int(num_rdma_bytes)
        self.rank, self.num_ranks = group.rank, group.size
        self._ll_combine_buffers: dict[int, np.ndarray] = {}
        self._ll_next = 0
        self._outputs_in_buffer = False   # the latest dispatch was zero-copy (combine then stages above the split)
        self._scratch: dict[bool, np.ndarray] = {}
        self._tuning = {"intranode": intranode_plan.default_tuning(self.num_ranks),
                        "low_latency": low_latency_plan.LowLatencyTuning()}
        self._seq = 0                      # communicating calls made on this Buffer: the signatures' sequence number
        # Shrink mode (DeepEP's mask buffer): mask[r] == 1 means rank r is skipped by the low-latency calls.
        self.mask: list[int] | None = [0] * self.num_ranks if enable_shrink else None

    # -- cross-rank agreement (epcomm/agreement.py) ---------------------------------------------------------
    def _signature(self, kind: str, **fields) -> agreement.Signature:
        """This call's signature, numbered when the call is made (a receive hook exchanges it later)."""
        sig = agreement.make(kind, self._seq, **fields)
        self._seq += 1
        return sig

    def _exchange(self, msgs: list, sig: agreement.Signature, masked: list | None = None) -> list:
        """group.exchange with the signature riding on every message; ConfigError on every rank when they differ,
        before anything received is used (a rank at another kind of call is named, not a timeout).
        masked: shrink mode's mask (low-latency calls only): masked peers' slots come back None."""
        kind = agreement.KINDS[sig.kind]
        arrived = self.group.exchange([(sig, m) for m in msgs], kind, same_phase=False, masked=masked)
        agreement.check([a[0] for a in arrived if a is not None], self.rank)
        return [None if a is None else a[1] for a in arrived]

    def _live(self, r: int) -> bool:
        return self.mask is None or not self.mask[r]

    # -- shrink mode and reset ----------------------------------------------------------------------------
    def update_mask(self, rank: int, mask: bool) -> None:
        self.mask[rank] = 1 if mask else 0

    def query_mask(self) -> np.ndarray:
        return np.asarray(self.mask, np.int32)

    def clean_mask(self) -> None:
        self.mask[:] = [0] * self.num_ranks

    def reset(self) -> None:
        """After a failure (every live rank calls it): a new exchange epoch, call numbers and the low-latency
        ping-pong index back to 0 on every rank, then a bounded barrier (Group.reset)."""
        self.group.reset(masked=self.mask)
        self._seq = 0
        self._ll_next = 0
        self._outputs_in_buffer = False

    @staticmethod
    def _x_fields(x) -> dict:
        data, scales = x if isinstance(x, tuple) else (x, None)
        return {"hidden": data.shape[1], "dtype": "bf16" if scales is None else "fp8",
                "num_scales": -1 if scales is None else scales.shape[1]}

    # -- the boundary ---------------------------------------------------------------------------------------
    def device_scope(self):
        return contextlib.nullcontext()

    def import_array(self, a, name: str):
        return as_numpy(a, name)

    def caller_stream(self, like):
        return None

    def check_topk_range(self, topk_idx, num_experts: int) -> None:
        check_topk_range_host(topk_idx, num_experts)

    def tuning(self, family: str):
        if family not in self._tuning:
            raise ConfigError(f"family: expected 'intranode' or 'low_latency', got {family!r}")
        return self._tuning[family]

    def set_tuning(self, family: str, **changes):
        old = self.tuning(family)
        self._tuning[family] = dataclasses.replace(old, **changes)
        return old

    def sync(self) -> None:
        pass

    # -- normal mode --------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, call=None):
        return (*ref.get_dispatch_layout(topk_idx, num_experts, self.num_ranks, self.group.num_nodes), None)

    def dispatch(self, x, topk_idx, topk_weights, is_token_in_rank, num_experts, expert_alignment,
                 num_worst_tokens, config, call=None, num_tokens_per_expert=None, zero_copy=False):
        # zero_copy: the outputs are fresh arrays here, which keeps the promise (valid until the next dispatch).
        x = _fp8_view(x)
        msgs = ref.dispatch_send(x, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert)
        # Each message carries its sender's per-destination counts (row s of the [src, dst] count matrix), so the
        # prefix matrix needs no second collective (and an error in dispatch_recv cannot strand the peers).
        send_counts = is_token_in_rank.sum(axis=0, dtype=np.int32)
        sig = self._signature("dispatch", **self._x_fields(x), num_topk=-1 if topk_idx is None else topk_idx.shape[1],
                              num_experts=num_experts, num_worst_tokens=num_worst_tokens,
                              expert_alignment=expert_alignment,
                              flags={"zero_copy": zero_copy, "with_topk": topk_idx is not None})
        arrived = self._exchange([(m, send_counts) for m in msgs], sig)
        # Every rank has the whole count matrix now, so all of them refuse a dispatch that overflows any rank.
        rows = np.stack([c for _, c in arrived]).sum(axis=0)
        self._check_dispatch_rows(rows, x, topk_idx, num_worst_tokens, zero_copy)
        res = ref.dispatch_recv([m for m, _ in arrived], self.rank, self.num_ranks, num_experts,
                                expert_alignment, num_worst_tokens)
        counts = np.asarray(res.num_recv_tokens_per_source, dtype=np.int32)
        matrix = np.stack([c for _, c in arrived]).cumsum(axis=0, dtype=np.int32)
        self._outputs_in_buffer = bool(zero_copy)
        data = x[0] if isinstance(x, tuple) else x
        handle = DispatchHandle(
            num_ranks=self.num_ranks, num_experts=num_experts, num_tokens=data.shape[0], hidden=data.shape[1],
            is_token_in_rank=is_token_in_rank, num_recv_tokens_per_source=counts, rank_prefix_matrix=matrix,
            recv_src_idx=res.recv_src_idx, num_recv_tokens=res.num_recv_tokens, num_worst_tokens=num_worst_tokens,
            state=CpuDispatchState())
        return (res.recv_x, res.recv_topk_idx, res.recv_topk_weights, list(res.num_recv_tokens_per_expert_list),
                handle, None)

    def _check_dispatch_rows(self, rows_per_rank, x, topk_idx, num_worst_tokens, zero_copy, what="dispatch"):
        data, scales = x if isinstance(x, tuple) else (x, None)
        rows = [max(int(n), num_worst_tokens if zero_copy else 0) for n in rows_per_rank]
        sizing.check_dispatch(self.num_nvl_bytes, self.num_ranks, rows, data.shape[1] * data.dtype.itemsize,
                              0 if scales is None else scales.shape[1],
                              0 if topk_idx is None else topk_idx.shape[1], bool(zero_copy), what)

    def comm_stream(self):
        return None

    def local_buffer(self, use_rdma: bool) -> np.ndarray:
        """Host scratch of the Buffer's size (get_local_buffer_tensor): nothing communicates through it here."""
        buf = self._scratch.get(use_rdma)
        if buf is None:
            nbytes = self.num_rdma_bytes if use_rdma else (self.num_nvl_bytes or sizing.default_nvl_bytes(self.num_ranks))
            if nbytes == 0:
                raise ConfigError("use_rdma_buffer: this Buffer was made with num_rdma_bytes=0")
            buf = self._scratch[use_rdma] = np.zeros(nbytes, np.uint8)
        return buf

    def cached_dispatch(self, x, handle: DispatchHandle, config, call=None, zero_copy=False):
        # The handle's prefix matrix ends with every rank's received row count.
        self._check_dispatch_rows(handle.rank_prefix_matrix[-1], _fp8_view(x), None, handle.num_worst_tokens,
                                  zero_copy, "cached dispatch")
        self._outputs_in_buffer = bool(zero_copy)
        msgs = ref.dispatch_send(_fp8_view(x), None, None, handle.is_token_in_rank)
        sig = self._signature("cached_dispatch", **self._x_fields(x), num_experts=handle.num_experts,
                              num_worst_tokens=handle.num_worst_tokens, flags={"zero_copy": zero_copy})
        res = ref.dispatch_recv(self._exchange(msgs, sig), self.rank, self.num_ranks,
                                handle.num_experts, 1, handle.num_worst_tokens)
        return res.recv_x, None

    def get_combine_buffer(self, handle: DispatchHandle):
        """An array kept with the handle; a zero-copy combine of the handle reads it (as the GPU's staging rows)."""
        state = handle.state
        if not isinstance(state, CpuDispatchState):
            raise ConfigError("handle: expected the handle of a dispatch made by this Buffer (CPU backend)")
        if state.combine_buffer is None:
            from .interop import BF16
            state.combine_buffer = np.zeros((handle.num_rows, handle.hidden), BF16)
        return state.combine_buffer

    def combine(self, x, handle: DispatchHandle, topk_weights, bias, config, call=None, zero_copy=False):
        if zero_copy:
            view = self.get_combine_buffer(handle)
            if x is not None and x is not view and not np.shares_memory(x, view):
                raise ConfigError("x: a zero-copy combine reads the array get_combine_buffer(handle) returned, and "
                                  "this is another array; pass x=None or that array")
            x = view
        sizing.check_combine(self.num_nvl_bytes, self.num_ranks, handle.num_rows, handle.hidden,
                             0 if topk_weights is None else topk_weights.shape[1], self._outputs_in_buffer)
        n = handle.num_recv_tokens
        w = topk_weights[:n] if topk_weights is not None else None
        msgs = ref.combine_send(x[:n], handle.num_recv_tokens_per_source, w)
        b = None if not bias else (bias[0] if len(bias) == 1 else tuple(bias))
        sig = self._signature("combine", hidden=handle.hidden, dtype="bf16",
                              num_topk=-1 if topk_weights is None else topk_weights.shape[1],
                              num_experts=handle.num_experts, num_worst_tokens=handle.num_worst_tokens,
                              flags={"zero_copy": zero_copy, "with_weights": topk_weights is not None})
        combined, combined_w = ref.combine_recv(self._exchange(msgs, sig), handle.is_token_in_rank, b)
        return combined, combined_w, None

    # -- low-latency mode ---------------------------------------------------------------------------------
    # Returns as the GPU launcher's (epcomm/gpu/low_latency.py): (outputs..., hook or None, event); a hook returns the Event of its receive. Here
    # every half is complete when it returns, so the events are None and Event() (already complete).
    def low_latency_dispatch(self, x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0,
                             return_recv_hook, cumulative_stats, wait_stats, call=None):
        sizing.check_low_latency(self.num_rdma_bytes, tmax, x.shape[1], self.num_ranks, num_experts)
        msgs = ref.low_latency_dispatch_send(x, topk_idx, self.rank, self.num_ranks, num_experts, tmax,
                                             use_fp8, round_scale, use_ue8m0)
        sig = self._signature("low_latency_dispatch", hidden=x.shape[1], dtype="bf16", num_topk=topk_idx.shape[1],
                              num_experts=num_experts, num_max_dispatch_tokens_per_rank=tmax,
                              flags={"use_fp8": use_fp8, "round_scale": round_scale, "use_ue8m0": use_ue8m0})
        slot: dict = {}

        def receive():
            t0 = time.perf_counter_ns()
            arrived = self._exchange(msgs, sig, self.mask)
            waited = time.perf_counter_ns() - t0
            # Shrink mode: a masked (or newly timed-out) source sends nothing; its count is 0 (DeepEP: -1 -> 0).
            arrived = [m if m is not None else _empty_message(x, use_fp8, use_ue8m0) for m in arrived]
            res = ref.low_latency_dispatch_recv(arrived, self.rank, self.num_ranks, num_experts, tmax,
                                                x.shape[1], use_fp8, use_ue8m0)
            slot["res"] = res
            if cumulative_stats is not None:
                cumulative_stats[...] += res.recv_count.astype(cumulative_stats.dtype)
            if wait_stats is not None:
                wait_stats[...] += np.int64(waited // max(1, self.num_ranks))
            return res

        buffer_idx = self._ll_next
        self._ll_next ^= 1
        if not return_recv_hook:
            res = receive()
            handle = LowLatencyHandle(res.src_info, res.layout_range, tmax, x.shape[1], num_experts, x.shape[0],
                                      buffer_idx)
            return res.recv_x, res.recv_count, handle, None, None
        # With a hook the outputs exist now and are filled by hook(): pre-allocate them and copy in.
        e_local = num_experts // self.num_ranks
        proto = _empty_ll_result(e_local, self.num_ranks, tmax, x.shape[1], use_fp8, use_ue8m0)
        handle = LowLatencyHandle(proto["src_info"], proto["layout_range"], tmax, x.shape[1], num_experts,
                                  x.shape[0], buffer_idx)

        def hook():
            _copy_ll_result(receive(), proto)
            return Event()                  # the receive is complete when hook() returns

        return proto["recv_x"], proto["recv_count"], handle, hook, None

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle):
        e_local = handle.num_experts // self.num_ranks
        shape = (e_local, self.num_ranks * handle.num_max_dispatch_tokens_per_rank, handle.hidden)
        buf = self._ll_combine_buffers.get(handle.buffer_idx)
        if buf is None or buf.shape != shape:
            from .interop import BF16
            buf = np.zeros(shape, dtype=BF16)
            self._ll_combine_buffers[handle.buffer_idx] = buf
        return buf

    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, zero_copy,
                            return_recv_hook, out, call=None, wait_stats=None, use_logfmt=False):
        if zero_copy:
            x = self.get_next_low_latency_combine_buffer(handle)
        msgs = ref.low_latency_combine_send(x, handle.src_info, handle.layout_range, use_logfmt)
        sig = self._signature("low_latency_combine", hidden=handle.hidden, dtype="bf16", num_topk=topk_idx.shape[1],
                              num_experts=handle.num_experts,
                              num_max_dispatch_tokens_per_rank=handle.num_max_dispatch_tokens_per_rank,
                              flags={"zero_copy": zero_copy, "use_logfmt": use_logfmt})
        if out is None:
            from .interop import BF16
            out = np.empty((topk_idx.shape[0], handle.hidden), dtype=BF16)

        def hook():
            t0 = time.perf_counter_ns()
            arrived = self._exchange(msgs, sig, self.mask)
            from .interop import BF16
            arrived = [m if m is not None else ref.LowLatencyMessage(np.zeros(0, np.int32), np.zeros(0, np.int32),
                                                                    np.zeros((0, handle.hidden), BF16))
                       for m in arrived]
            idx = topk_idx
            if self.mask is not None and any(self.mask):
                # Shrink mode: a top-k entry whose expert lives on a masked rank adds nothing (as topk_idx == -1).
                owner = np.where(topk_idx >= 0, topk_idx // (handle.num_experts // self.num_ranks), 0)
                idx = np.where((topk_idx >= 0) & np.asarray(self.mask, bool)[owner], -1, topk_idx)
            if wait_stats is not None:  # as the dispatch's: the exchange's wait, split evenly over the sources
                wait_stats[...] += np.int64((time.perf_counter_ns() - t0) // max(1, self.num_ranks))
            out[...] = ref.low_latency_combine_recv(arrived, idx, topk_weights, self.rank, self.num_ranks,
                                                     handle.num_experts)
            return Event()

        if return_recv_hook:
            return out, hook, None
        hook()
        return out, None, None

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        """Nothing to reset: every CPU call is complete when it returns. In shrink mode a barrier of the unmasked
        ranks, as DeepEP's clean (a rank that does not arrive in time is masked)."""
        if self.mask is not None:
            self.group.exchange([None] * self.num_ranks, "clean_low_latency_buffer", masked=self.mask)

    def close(self) -> None:
        self._ll_combine_buffers.clear()
        self._scratch.clear()


def _empty_message(x, use_fp8: bool, use_ue8m0: bool) -> ref.LowLatencyMessage:
    """What a masked source contributes to a low-latency dispatch: no rows."""
    none = np.zeros(0, np.int32)
    rows = ref.low_latency_dispatch_send(x[:0], np.zeros((0, 1), np.int64), 0, 1, 1, 1, use_fp8, use_fp8,
                                         use_ue8m0)[0].rows
    return ref.LowLatencyMessage(none, none, rows)


def _fp8_view(x):
    """An FP8 pair whose data came as uint8 bits (validation allows them) viewed as float8_e4m3fn."""
    if isinstance(x, tuple) and x[0].dtype == np.uint8:
        from .interop import FP8
        return (x[0].view(FP8), x[1])
    return x


def _empty_ll_result(e_local, num_ranks, tmax, hidden, use_fp8, use_ue8m0) -> dict:
    from .interop import BF16, FP8
    rows = num_ranks * tmax
    if use_fp8:
        s = hidden // 128
        scales = (np.zeros((e_local, (s + 3) // 4, rows), np.int32) if use_ue8m0
                  else np.zeros((e_local, s, rows), np.float32)).transpose(0, 2, 1)
        recv_x = (np.zeros((e_local, rows, hidden), FP8), scales)
    else:
        recv_x = np.zeros((e_local, rows, hidden), BF16)
    return {"recv_x": recv_x, "recv_count": np.zeros(e_local, np.int32),
            "src_info": np.full((e_local, rows), -1, np.int32), "layout_range": np.zeros((e_local, num_ranks), np.int64)}


def _copy_ll_result(res, proto: dict) -> None:
    if isinstance(proto["recv_x"], tuple):
        proto["recv_x"][0][...] = res.recv_x[0]
        proto["recv_x"][1][...] = res.recv_x[1]
    else:
        proto["recv_x"][...] = res.recv_x
    proto["recv_count"][...] = res.recv_count
    proto["src_info"][...] = res.src_info
    proto["layout_range"][...] = res.layout_range
