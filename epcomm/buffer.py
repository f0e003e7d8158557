"""epcomm.Buffer: the public API (DeepEP's deep_ep.Buffer, framework-neutral).

Arguments are converted at the boundary (interop), validated (validate), handed to a backend (epcomm/backend.py:
CPU, numpy over mpi4py; GPU, kernel families over NVLink/NVSHMEM) and the results come back in the caller's array
type.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import validate as v
from .config import Config
from .env import env
from .errors import ConfigError, EpcommError
from .handles import DispatchHandle, Event, EventHandle, LowLatencyHandle
from .interop import BF16, FP8, framework_of, to_framework


@dataclass
class CallContext:
    """How a GPU call joins the caller's work: the caller's stream, an event to wait for first, async mode."""
    stream: Any = None
    previous_event: Event | None = None
    async_finish: bool = False
    allocate_on_comm_stream: bool = False
    sync_host: bool = False
    framework: str = "cupy"


class Buffer:
    """One expert-parallel communication buffer for a group of ranks.

    DeepEP's constructor, positionally and by name, plus epcomm's keyword-only `backend`:
    group: a torch.distributed ProcessGroup (gloo, NCCL, ...: bootstraps over its c10d store, no MPI needed), an
        mpi4py communicator, an epcomm.Group, or None: `comm`, else MPI.COMM_WORLD. `buf.group` is this object
        (DeepEP's `_buffer.group != group` test works); `buf.ep_group` is the epcomm.Group the Buffer runs on.
    num_nvl_bytes: bytes of the NVLink buffer of the normal kernels (see Config.get_nvl_buffer_size_hint);
        0: sized for 4096 tokens of hidden 7168 per rank, or, with low_latency_mode=True, no normal-mode buffer at
        all (normal-mode calls then raise ConfigError; get_dispatch_layout still works).
    num_rdma_bytes: bytes of the NVSHMEM buffer (low-latency mode: get_low_latency_rdma_size_hint); 0 sizes it on
        the first low-latency call.
    low_latency_mode: allocate the low-latency buffers.
    num_qps_per_rank: DeepEP's IBGDA queue pairs per peer; accepted (an int >= 1 in low-latency mode) and unused,
        as epcomm does not drive IBGDA itself.
    allow_nvlink_for_low_latency_mode: True (default): low-latency kernels store to NVLink-reachable peers directly;
        False: every peer gets NVSHMEM puts (GPU; a no-op on the CPU backend).
    allow_mnnvl: False (default) sets NVSHMEM_DISABLE_MNNVL=1 unless set, as DeepEP does; True lets NVSHMEM use
        multi-node NVLink and needs a GPU with fabric-handle support (ConfigError otherwise). epcomm's own NVLink
        paths stay within a host. No-op on the CPU backend.
    use_fabric: DeepEP's fabric-handle allocation of the NVLink buffer: not built (True is a ConfigError on the GPU,
        a no-op on the CPU backend).
    explicitly_destroy: False (default): the resources are freed when the Buffer is garbage-collected (or by
        destroy()); True: only destroy() frees them, and a Buffer collected without it warns (ResourceWarning) and
        leaks them, as DeepEP's does. Nothing is freed at interpreter exit (the process's end frees it).
    enable_shrink: DeepEP's rank-masking (shrink) mode for the low-latency calls (low_latency_update_mask_buffer
        and docs/api.md, Shrink mode). CPU backend only: the GPU kernels do not have it yet (ConfigError).
    comm: an mpi4py communicator, used when group is None (DeepEP's keyword).
    backend: 'cpu' or 'gpu'; default EPCOMM_BACKEND ('auto': GPU when one is visible).
    The attributes num_nvl_bytes / num_rdma_bytes report the bytes allocated on the GPU (the CPU backend allocates
    none and reports what was asked for).
    """

    num_sms: ClassVar[int] = 20

    def __init__(self, group=None, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 use_fabric: bool = False, explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None,
                 *, backend: str | None = None):
        from .group import Group, gpu_count
        nvl_bytes = v.check_int(num_nvl_bytes, "num_nvl_bytes", 0)
        rdma_bytes = v.check_int(num_rdma_bytes, "num_rdma_bytes", 0)
        self.low_latency_mode = bool(low_latency_mode)
        self.explicitly_destroy = bool(explicitly_destroy)
        self.enable_shrink = bool(enable_shrink)
        self._check_deepep_options(num_qps_per_rank, self.low_latency_mode)
        choice = backend or env("EPCOMM_BACKEND")
        if choice not in ("auto", "cpu", "gpu"):
            raise ConfigError(f"backend: expected 'auto', 'cpu' or 'gpu', got {choice!r}")
        if choice == "auto":
            choice = "gpu" if gpu_count() > 0 else "cpu"
        if group is None:
            group = comm
        self._own_group = not isinstance(group, Group)
        self.ep_group = group if isinstance(group, Group) else Group(group, use_gpu=(choice == "gpu"))
        self.group = group if group is not None else self.ep_group
        self.rank, self.num_ranks = self.ep_group.rank, self.ep_group.size
        self.group_size = self.num_ranks
        try:
            if choice == "gpu":
                if self.enable_shrink:
                    raise ConfigError("enable_shrink: shrink mode (rank masking) is built on the CPU backend only; "
                                      "the GPU kernels do not have it yet: pass enable_shrink=False or backend='cpu'")
                self._gpu_transport_options(allow_mnnvl, use_fabric)
                from .gpu.backend import GpuBackend
                self._backend = GpuBackend(self.ep_group, nvl_bytes, rdma_bytes, self.low_latency_mode)
                if not allow_nvlink_for_low_latency_mode and self.low_latency_mode:
                    self._backend.set_tuning("low_latency", force_nvshmem=True)
            else:
                from .cpu_backend import CpuBackend
                self._backend = CpuBackend(self.ep_group, nvl_bytes, rdma_bytes, self.enable_shrink)
        except BaseException:
            _release(getattr(self, "_backend", None), self.ep_group if self._own_group else None)
            raise
        self.backend = choice
        self._closed = False
        self._finalizer = self._make_finalizer()
        self._combined_since_dispatch = False  # get_combine_buffer's guard (see there)
        # The int that names this Buffer to epcomm.torch's custom ops (they take tensors and scalars only).
        self._op_id = next(_op_ids)
        _buffers_by_op_id[self._op_id] = self

    @property
    def num_nvl_bytes(self) -> int:
        """Bytes of the normal-mode NVLink buffer this rank allocated (0: none)."""
        return self._backend.num_nvl_bytes

    @property
    def num_rdma_bytes(self) -> int:
        """Bytes of the low-latency NVSHMEM buffer this rank allocated (0: none yet)."""
        return self._backend.num_rdma_bytes

    # -- tuning --------------------------------------------------------------------------------------------
    def tuning(self, family: str):
        """The frozen tuning object of a kernel family: "intranode" (epcomm.intranode.IntranodeTuning) or
        "low_latency" (epcomm.low_latency.LowLatencyTuning)."""
        self._check_open()
        return self._backend.tuning(family)

    def set_tuning(self, family: str, **changes):
        """Change fields of a family's tuning (see tuning()); returns the previous object, so that
        `old = buf.set_tuning("intranode", reduce_parts=2) ... buf.set_tuning("intranode", **vars(old))` restores it.
        Every rank must make the same change (some fields decide which kernels run). Results never depend on it."""
        self._check_open()
        return self._backend.set_tuning(family, **changes)

    # -- static settings -----------------------------------------------------------------------------------
    @staticmethod
    def set_num_sms(num_sms: int) -> None:
        """The most SMs the normal kernels may use (the default Config's num_sms): an even number, as DeepEP asks."""
        n = v.check_int(num_sms, "num_sms", 1)
        if n % 2:
            raise ConfigError(f"num_sms: expected an even number (DeepEP's rule: its kernels pair SMs), got {n}")
        Buffer.num_sms = n

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's recommended dispatch Config for num_ranks ranks (its table; Buffer.num_sms SMs). Rank counts
        outside the table (epcomm runs any) get Config(Buffer.num_sms) with DeepEP's default chunk sizes."""
        return _deepep_config(_DISPATCH_CONFIGS, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's recommended combine Config for num_ranks ranks (see get_dispatch_config)."""
        return _deepep_config(_COMBINE_CONFIGS, num_ranks)

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        from .low_latency import rdma_size_hint
        return rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # -- helpers -------------------------------------------------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise EpcommError("this Buffer was destroyed")

    def _on_device(self):
        """The rank's GPU made current (other libraries, e.g. JAX at start-up, may switch the thread's device)."""
        return self._backend.device_scope()

    def _in(self, a, name):
        _check_no_grad(a, name)
        with self._on_device():
            return self._backend.import_array(a, name)

    def _topk_idx(self, topk_idx, num_tokens=None):
        """topk_idx checked and widened to int64 on the rank's device: the widening is a kernel, and run on whatever
        device is current (JAX makes device 0 current in every process) it would write a copy on the wrong GPU,
        unordered with the call's stream. It runs on the caller's stream, which the call's comm stream then waits
        for."""
        with self._on_device():
            idx = self._in(topk_idx, "topk_idx")
            stream = self._backend.caller_stream(topk_idx)
            with stream if stream is not None else contextlib.nullcontext():
                return v.check_topk_idx(idx, num_tokens)

    def _in_x(self, x, name="x"):
        if isinstance(x, tuple):
            return tuple(self._in(a, f"{name}[{i}]") for i, a in enumerate(x))
        return self._in(x, name)

    def _ctx(self, like, previous_event, async_finish, allocate_on_comm_stream) -> CallContext:
        if previous_event is not None and not isinstance(previous_event, Event):
            raise ConfigError(f"previous_event: expected an epcomm Event or None, got {type(previous_event).__name__}")
        with self._on_device():
            stream = self._backend.caller_stream(like)
        sync = self._backend.on_device and framework_of(like) == "jax"
        return CallContext(stream, previous_event, bool(async_finish), bool(allocate_on_comm_stream), sync,
                           framework_of(like))

    @staticmethod
    def _out(a, fw):
        if isinstance(a, tuple):  # an FP8 pair: (e4m3 data, scales)
            return (to_framework(a[0], fw, FP8),) + tuple(to_framework(t, fw) for t in a[1:])
        return to_framework(a, fw)

    # -- normal mode ---------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts: int, previous_event=None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """Routing layout of topk_idx ([num_tokens, num_topk] int64, entries in [-1, num_experts)).

        Returns (num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [num_nodes] int32 or None on one node,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool, event)."""
        self._check_open()
        fw = framework_of(topk_idx, "topk_idx")
        idx = self._topk_idx(topk_idx)
        e = v.check_num_experts(num_experts, self.num_ranks)
        self._backend.check_topk_range(idx, e)
        ctx = self._ctx(topk_idx, previous_event, async_finish, allocate_on_comm_stream)
        per_rank, per_rdma, per_expert, in_rank, ev = self._run(
            lambda: self._backend.get_dispatch_layout(idx, e, ctx), ctx)
        return self._out(per_rank, fw), self._out(per_rdma, fw), self._out(per_expert, fw), self._out(in_rank, fw), ev

    def _run(self, fn, ctx):
        """The one place where backend work meets the caller: fn() runs on the rank's GPU and returns an Event (None
        when the work is already complete), alone or last of a tuple; that comes back as an Event whose
        current_stream_wait() joins the caller's framework's stream. JAX callers have no stream to join: their
        results are complete when returned."""
        with self._on_device():
            out = fn()
        ev = (out[-1] if isinstance(out, tuple) else out) or Event()
        ev.framework = ctx.framework
        if ctx.sync_host:
            ev.synchronize()
        return (*out[:-1], ev) if isinstance(out, tuple) else ev

    @staticmethod
    def _check_hook_framework(return_recv_hook, fw):
        """JAX arrays are immutable values: outputs handed back before the hook has received them could never show the
        data (converting them to JAX reads them at once), so a JAX caller gets an error instead of stale arrays."""
        if return_recv_hook and fw == "jax":
            raise ConfigError("return_recv_hook: not available to JAX callers (JAX arrays are immutable, so outputs "
                              "returned before hook() would never hold the received data); use return_recv_hook=False")

    def _hook(self, hook, ctx):
        """A backend's receive hook as the caller gets it: run like a call (_run), returning the receive's Event."""
        return None if hook is None else (lambda: self._run(hook, ctx))

    def dispatch(self, x, handle: DispatchHandle | None = None, num_tokens_per_rank=None,
                 num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
                 topk_idx=None, topk_weights=None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event=None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, zero_copy: bool = False):
        """Send each token once to every rank that holds one of its experts.

        x: [T, H] bf16, or (float8_e4m3fn [T, H], float32 scales [T, H/128]).
        With handle= (a cached dispatch, e.g. the backward of combine) only x is needed and only recv_x returns.
        Returns (recv_x, recv_topk_idx [N, K] int64, recv_topk_weights [N, K] float32,
        num_recv_tokens_per_expert_list list[int], handle, event); rows are ordered by (source rank, source token).
        zero_copy: the received arrays are views of this Buffer's receive area, where the rows arrive, instead of
        fresh arrays (no copy-out). They stay valid until the next dispatch on this Buffer (combine leaves them
        alone) and must not be written. Every rank passes the same value. The Buffer needs room for both areas:
        Config.get_nvl_buffer_size_hint(..., zero_copy=True). Not for JAX callers (JAX arrays are immutable).
        """
        self._check_open()
        fw = framework_of(x[0] if isinstance(x, tuple) and x else x, "x")
        self._check_zero_copy_framework(zero_copy, fw)
        xin = self._in_x(x)
        data, scales = v.check_dispatch_x(xin)
        t, h = data.shape
        config = config or _default_config(Buffer.num_sms)
        if not isinstance(config, Config):
            raise ConfigError(f"config: expected an epcomm.Config, got {type(config).__name__}")
        ctx = self._ctx(x[0] if isinstance(x, tuple) else x, previous_event, async_finish, allocate_on_comm_stream)
        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise ConfigError(f"handle: expected the DispatchHandle of an earlier dispatch, got {type(handle).__name__}")
            if t != handle.num_tokens:
                v.fail("x", f"[{handle.num_tokens}, hidden] rows (the handle's token count)", data)
            if topk_idx is not None or topk_weights is not None:
                raise ConfigError("topk_idx/topk_weights: a cached dispatch (handle=...) takes neither")
            recv_x, ev = self._run(lambda: self._backend.cached_dispatch(xin, handle, config, ctx, bool(zero_copy)), ctx)
            self._combined_since_dispatch = False
            return self._out(recv_x, fw), None, None, None, handle, ev
        if is_token_in_rank is None:
            raise ConfigError("is_token_in_rank: expected the [num_tokens, num_ranks] bool layout from "
                              "get_dispatch_layout (or a handle for a cached dispatch)")
        in_rank = v.check_array(self._in(is_token_in_rank, "is_token_in_rank"), "is_token_in_rank",
                                (t, self.num_ranks), np.bool_, f"[{t}, {self.num_ranks}] bool")
        if (topk_idx is None) != (topk_weights is None):
            raise ConfigError("topk_idx/topk_weights: pass both or neither")
        idx = w = None
        if topk_idx is not None:
            idx = self._topk_idx(topk_idx, t)
            w = v.check_topk_weights(self._in(topk_weights, "topk_weights"), idx)
        if num_tokens_per_expert is None:
            raise ConfigError("num_tokens_per_expert: expected the [num_experts] int32 counts from get_dispatch_layout")
        per_expert = self._in(num_tokens_per_expert, "num_tokens_per_expert")
        v.check_array(per_expert, "num_tokens_per_expert", (None,), np.int32, "[num_experts] int32")
        e = v.check_num_experts(per_expert.shape[0], self.num_ranks)
        if idx is not None:
            self._backend.check_topk_range(idx, e)
        align = v.check_int(expert_alignment, "expert_alignment", 1)
        worst = v.check_int(num_worst_tokens, "num_worst_tokens", 0)
        if num_tokens_per_rank is not None:
            v.check_array(self._in(num_tokens_per_rank, "num_tokens_per_rank"), "num_tokens_per_rank",
                          (self.num_ranks,), np.int32, f"[{self.num_ranks}] int32")
        recv_x, recv_idx, recv_w, per_expert_list, new_handle, ev = self._run(
            lambda: self._backend.dispatch(xin, idx, w, in_rank, e, align, worst, config, ctx,
                                           num_tokens_per_expert=per_expert, zero_copy=bool(zero_copy)), ctx)
        self._combined_since_dispatch = False
        return self._out(recv_x, fw), self._out(recv_idx, fw), self._out(recv_w, fw), per_expert_list, new_handle, ev

    @staticmethod
    def _check_zero_copy_framework(zero_copy, fw):
        if zero_copy and fw == "jax":
            raise ConfigError("zero_copy: not available to JAX callers (JAX arrays are immutable values, and "
                              "zero-copy arrays are buffer memory that later calls reuse); use zero_copy=False")

    def get_combine_buffer(self, handle: DispatchHandle):
        """The [N, H] bf16 array (CuPy on the GPU, numpy on the CPU backend) a zero-copy combine of handle reads:
        write the expert outputs into it (e.g. as a GEMM's output), then call combine(None, handle, zero_copy=True),
        which skips copying x into the buffer. On the GPU it is this rank's staging rows in the NVLink buffer, which
        other ranks read during the combine: ask for it after the dispatch of the step (a dispatch is a barrier of
        every rank, after which nobody reads them), and write it only before that step's combine."""
        self._check_open()
        if not isinstance(handle, DispatchHandle):
            raise ConfigError(f"handle: expected the DispatchHandle of a dispatch, got {type(handle).__name__}")
        if self._combined_since_dispatch:
            raise ConfigError("get_combine_buffer: a combine ran on this Buffer since the last dispatch; other ranks "
                              "may still be reading the staging rows, so they cannot be handed out for writing "
                              "before the next dispatch (a dispatch is a barrier of every rank)")
        with self._on_device():
            return self._backend.get_combine_buffer(handle)

    def combine(self, x, handle: DispatchHandle, topk_weights=None, bias=None, config: Config | None = None,
                previous_event=None, async_finish: bool = False, allocate_on_comm_stream: bool = False,
                zero_copy: bool = False):
        """Bring every rank's rows back to their source token and sum them in float32 (plus bias), in bf16.

        x: [N, H] bf16 (N = rows this rank received in the dispatch of handle, or its num_worst_tokens).
        zero_copy: x is get_combine_buffer(handle) (or None for it), already in the buffer: no staging copy.
        Returns (combined_x [T, H] bf16, combined_topk_weights [T, K] float32 or None, event)."""
        self._check_open()
        if not isinstance(handle, DispatchHandle):
            raise ConfigError(f"handle: expected the DispatchHandle of a dispatch, got {type(handle).__name__}")
        rows = handle.num_rows
        if zero_copy and x is None:
            # The caller's stream and framework: the weights', else the backend's own (the handle's arrays).
            like = topk_weights if topk_weights is not None else handle.is_token_in_rank
            fw = framework_of(like, "topk_weights")
            xin = None
        else:
            like = x
            fw = framework_of(x, "x")
            xin = self._in(x, "x")
            v.check_array(xin, "x", (rows, handle.hidden), BF16,
                          f"[{rows}, {handle.hidden}] bf16 (the dispatch's rows)")
        self._check_zero_copy_framework(zero_copy, fw)
        w = None
        if topk_weights is not None:
            w = self._in(topk_weights, "topk_weights")
            v.check_array(w, "topk_weights", (rows, None), np.float32, f"[{rows}, num_topk] float32")
        biases = ()
        if bias is not None:
            items = bias if isinstance(bias, tuple) else (bias,)
            biases = v.check_bias(tuple(self._in(b, "bias") for b in items), handle.num_tokens, handle.hidden)
        config = config or _default_config(Buffer.num_sms)
        ctx = self._ctx(like, previous_event, async_finish, allocate_on_comm_stream)
        combined, combined_w, ev = self._run(
            lambda: self._backend.combine(xin, handle, w, biases, config, ctx, bool(zero_copy)), ctx)
        self._combined_since_dispatch = True
        return self._out(combined, fw), self._out(combined_w, fw), ev

    # -- low-latency mode ----------------------------------------------------------------------------------
    def low_latency_dispatch(self, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None,
                             use_fp8: bool = True, round_scale: bool = False, use_ue8m0: bool = False,
                             async_finish: bool = False, return_recv_hook: bool = False):
        """Expert-major dispatch for decoding: every (token, k) pair goes to its expert.

        x: [T, H] bf16 with T <= num_max_dispatch_tokens_per_rank; topk_idx [T, K] int64 (-1 = none).
        Returns (recv_x, recv_count [E_local] int32, handle, event, hook). recv_x is [E_local, R*Tmax, H] bf16, or
        (float8_e4m3fn [E_local, R*Tmax, H], scales [E_local, R*Tmax, H/128] float32 or [.., H/512] int32 with
        use_ue8m0) with column-major scales. With return_recv_hook the call only sends (event covers the send) and
        hook() receives: it returns the receive's Event (without async_finish the caller's stream already waits for
        it; JAX callers get the outputs complete when hook() returns). Without it, hook is None."""
        self._check_open()
        fw = framework_of(x, "x")
        self._check_hook_framework(return_recv_hook, fw)
        xin = self._in(x, "x")
        v.check_array(xin, "x", (None, None), BF16, "[num_tokens, hidden] bf16")
        t, h = xin.shape
        tmax = v.check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        if t > tmax:
            v.fail("x", f"at most num_max_dispatch_tokens_per_rank={tmax} tokens", xin)
        if use_fp8 and h % 128:
            v.fail("x", "a hidden size that is a multiple of 128 with use_fp8", xin)
        if h % 8:
            v.fail("x", "a hidden size that is a multiple of 8", xin)
        if use_ue8m0 and not round_scale:
            raise ConfigError("use_ue8m0: needs round_scale=True (UE8M0 scales are powers of two)")
        if use_ue8m0 and not use_fp8:
            raise ConfigError("use_ue8m0: needs use_fp8=True")
        idx = self._topk_idx(topk_idx, t)
        e = v.check_num_experts(num_experts, self.num_ranks)
        self._backend.check_topk_range(idx, e)
        e_local = e // self.num_ranks
        stats = wait = None
        if cumulative_local_expert_recv_stats is not None:
            stats = self._in(cumulative_local_expert_recv_stats, "cumulative_local_expert_recv_stats")
            v.check_array(stats, "cumulative_local_expert_recv_stats", (e_local,), np.int32, f"[{e_local}] int32")
        if dispatch_wait_recv_cost_stats is not None:
            wait = self._in(dispatch_wait_recv_cost_stats, "dispatch_wait_recv_cost_stats")
            v.check_array(wait, "dispatch_wait_recv_cost_stats", (self.num_ranks,), np.int64,
                          f"[{self.num_ranks}] int64")
        ctx = self._ctx(x, None, async_finish, False)
        recv_x, recv_count, handle, hook, ev = self._run(
            lambda: self._backend.low_latency_dispatch(xin, idx, tmax, e, bool(use_fp8), bool(round_scale),
                                                       bool(use_ue8m0), bool(return_recv_hook), stats, wait, ctx),
            ctx)
        handle.framework = fw
        return self._out(recv_x, fw), self._out(recv_count, fw), handle, ev, self._hook(hook, ctx)

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle):
        """The [E_local, R*Tmax, H] bf16 array a zero-copy low_latency_combine reads its input from: a torch tensor
        for a torch caller of the dispatch, else CuPy (GPU) or numpy (CPU backend)."""
        self._check_open()
        if not isinstance(handle, LowLatencyHandle):
            raise ConfigError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        with self._on_device():
            buf = self._backend.get_next_low_latency_combine_buffer(handle)
        # A torch caller gets a torch view it can write into (DeepEP's form); JAX arrays are immutable, so JAX and the
        # others get the backend's own array (CuPy on the GPU, numpy on the CPU backend).
        return self._out(buf, "torch") if handle.framework == "torch" else buf

    def low_latency_combine(self, x, topk_idx, topk_weights, handle: LowLatencyHandle, use_logfmt: bool = False,
                            zero_copy: bool = False, async_finish: bool = False, return_recv_hook: bool = False,
                            out=None, combine_wait_recv_cost_stats=None):
        """Weighted sum of the expert outputs back to each token: [T, H] bf16. DeepEP's argument order.

        x: [E_local, R*Tmax, H] bf16 expert outputs in the dispatch's layout (ignored with zero_copy, which reads
        get_next_low_latency_combine_buffer(handle)). use_logfmt: DeepEP's 10-bit LogFMT transport of the rows
        (epcomm.reference section 6; hidden a multiple of 512; the CPU backend; the GPU kernels do not have it yet:
        ConfigError). combine_wait_recv_cost_stats: [R] int64, += the time waited for each source rank
        (CPU backend; the GPU kernels do not measure it yet: ConfigError). Returns (combined_x, event, hook): hook as
        in low_latency_dispatch (None without return_recv_hook; hook() receives and returns the receive's Event)."""
        self._check_open()
        if not isinstance(handle, LowLatencyHandle):
            raise ConfigError(f"handle: expected a LowLatencyHandle, got {type(handle).__name__}")
        if use_logfmt and handle.hidden % 512:
            raise ConfigError(f"use_logfmt: needs a hidden size that is a multiple of 512 (DeepEP's LogFMT chunks), "
                              f"got {handle.hidden}; pass use_logfmt=False")
        stats = None
        if combine_wait_recv_cost_stats is not None:
            stats = self._in(combine_wait_recv_cost_stats, "combine_wait_recv_cost_stats")
            v.check_array(stats, "combine_wait_recv_cost_stats", (self.num_ranks,), np.int64,
                          f"[{self.num_ranks}] int64")
        fw = framework_of(topk_idx, "topk_idx")
        e_local = handle.num_experts // self.num_ranks
        rows = self.num_ranks * handle.num_max_dispatch_tokens_per_rank
        xin = None
        if not zero_copy:
            fw = framework_of(x, "x")
            xin = self._in(x, "x")
            v.check_array(xin, "x", (e_local, rows, handle.hidden), BF16, f"[{e_local}, {rows}, {handle.hidden}] bf16")
        idx = self._topk_idx(topk_idx, handle.num_tokens)
        w = v.check_topk_weights(self._in(topk_weights, "topk_weights"), idx)
        o = None
        if out is not None:
            o = self._in(out, "out")
            v.check_array(o, "out", (handle.num_tokens, handle.hidden), BF16, f"[{handle.num_tokens}, {handle.hidden}] bf16")
        self._check_hook_framework(return_recv_hook, fw)
        ctx = self._ctx(topk_idx, None, async_finish, False)
        combined, hook, ev = self._run(
            lambda: self._backend.low_latency_combine(xin, idx, w, handle, bool(zero_copy), bool(return_recv_hook), o,
                                                      ctx, wait_stats=stats, use_logfmt=bool(use_logfmt)), ctx)
        return (out if out is not None else self._out(combined, fw)), ev, self._hook(hook, ctx)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Reset both low-latency buffers (needed only after an error or a change of shapes)."""
        self._check_open()
        with self._on_device():
            self._backend.clean_low_latency_buffer(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # -- lifetime ------------------------------------------------------------------------------------------
    def destroy(self) -> None:
        """Free the buffers (and the group, if this Buffer made it). Collective on the GPU (every rank calls it).
        Safe to call twice; works whatever explicitly_destroy is (DeepEP asserts it was set)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        _release(self._backend, self.ep_group if self._own_group else None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    # -- DeepEP's API surface (constructor options, events, operational calls) --------------------------------
    @staticmethod
    def _check_deepep_options(num_qps_per_rank, low_latency_mode) -> None:
        v.check_int(num_qps_per_rank, "num_qps_per_rank", 1 if low_latency_mode else 0)

    def _gpu_transport_options(self, allow_mnnvl, use_fabric) -> None:
        """DeepEP's transport switches, on the GPU backend (the CPU backend has no GPU memory to apply them to)."""
        if use_fabric:
            raise ConfigError("use_fabric: epcomm's NVLink buffer is cudaMalloc memory shared through CUDA IPC "
                              "handles; fabric-handle allocation is not built (pass use_fabric=False)")
        if not allow_mnnvl:
            os.environ.setdefault("NVSHMEM_DISABLE_MNNVL", "1")  # as DeepEP: no multi-node NVLink detection
        elif not _fabric_supported(self.ep_group.device):
            raise ConfigError(f"allow_mnnvl: GPU {self.ep_group.device} of rank {self.rank} has no fabric-handle "
                              "support, so this machine has no multi-node NVLink; pass allow_mnnvl=False")

    def _make_finalizer(self):
        """Frees the resources when the Buffer is garbage-collected (explicitly_destroy=False), or warns that they
        leak (True). Never at interpreter exit: then MPI, NVSHMEM or CUDA may already be gone, and the process's
        end frees everything anyway."""
        fin = weakref.finalize(self, _release_at_gc, self._backend, self.ep_group if self._own_group else None,
                               self.explicitly_destroy, self.rank)
        fin.atexit = False
        return fin

    @staticmethod
    def capture() -> Event:
        """An EventOverlap recorded on the current stream now (DeepEP's Buffer.capture()): torch's current stream when
        torch sees CUDA, else CuPy's; complete at once without a GPU. Pass it as previous_event."""
        return Event(EventHandle())

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: epcomm compiles its kernels at run time for the GPU in use (SM90 features included on Hopper), so
        nothing is left out at build time as in a DeepEP wheel built with DISABLE_SM90_FEATURES."""
        return True

    def get_local_buffer_tensor(self, dtype, size=None, offset: int = 0, use_rdma_buffer: bool = False):
        """This rank's raw buffer as an array of dtype (DeepEP's call): the NVLink buffer, or with use_rdma_buffer
        the low-latency NVSHMEM buffer, from byte `offset` on (DeepEP adds offset to the byte address), as many whole
        elements as fit; `size` (a shape) takes the first prod(size) of them. A torch dtype gives a torch tensor,
        anything else the backend's array (CuPy on the GPU, numpy on the CPU backend). The CPU backend has no
        communication buffer: there it is host memory of num_nvl_bytes / num_rdma_bytes owned by the Buffer, which
        nothing communicates through."""
        self._check_open()
        fw, dt = _dtype_of(dtype)
        with self._on_device():
            raw = self._local_buffer_bytes(bool(use_rdma_buffer))
            off = v.check_int(offset, "offset", 0, raw.nbytes)
            count = (raw.nbytes - off) // dt.itemsize
            flat = raw[off:off + count * dt.itemsize].view(dt)
            if size is not None:
                shape = tuple(int(d) for d in size)
                n = int(np.prod(shape, dtype=np.int64))
                if n > flat.size:
                    raise ConfigError(f"size: expected at most {flat.size} elements of {dt} from offset {off}, "
                                      f"got {list(shape)}")
                flat = flat[:n].reshape(shape)
            return self._out(flat, "torch") if fw == "torch" else flat

    def _local_buffer_bytes(self, use_rdma: bool):
        """uint8 array over this rank's buffer (the GPU backend's NVLink or NVSHMEM buffer; CPU: host scratch)."""
        return self._backend.local_buffer(use_rdma)

    def get_comm_stream(self):
        """The Buffer's communication stream (DeepEP's call): a torch.cuda stream when torch sees CUDA, else the CuPy
        stream; None on the CPU backend (every call completes before it returns)."""
        self._check_open()
        stream = self._backend.comm_stream()
        if stream is None:
            return None
        import sys
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.ExternalStream(int(stream.ptr), device=torch.device("cuda", self.ep_group.device))
        return stream

    # -- shrink mode and reset (docs/api.md, Shrink mode / Reset after a timeout) -------------------------------
    def _check_shrink(self, what: str) -> None:
        self._check_open()
        if not self.enable_shrink:
            raise ConfigError(f"{what}: needs shrink mode: make the Buffer with enable_shrink=True")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Mask (mask=True) or unmask rank_to_mask on this rank only: the low-latency dispatch, combine and
        clean_low_latency_buffer neither send to nor wait for a masked rank (docs/api.md, Shrink mode)."""
        self._check_shrink("low_latency_update_mask_buffer")
        r = v.check_int(rank_to_mask, "rank_to_mask", 0, self.num_ranks - 1)
        self._backend.update_mask(r, bool(mask))

    def low_latency_query_mask_buffer(self, mask_status) -> None:
        """Write this rank's mask into mask_status: [num_ranks] int32 (numpy or torch CPU), 1 = masked."""
        self._check_shrink("low_latency_query_mask_buffer")
        out = self._in(mask_status, "mask_status")
        v.check_array(out, "mask_status", (self.num_ranks,), np.int32, f"[{self.num_ranks}] int32")
        out[...] = self._backend.query_mask()

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmask every rank (on this rank only)."""
        self._check_shrink("low_latency_clean_mask_buffer")
        self._backend.clean_mask()

    def reset(self) -> None:
        """Make the Buffer usable again after a CommTimeoutError, without a new bootstrap: every live rank calls it
        (also ranks that saw no error), the same number of times. Drops the messages of calls that failed or were
        skipped, numbers calls from 0 again on every rank, puts the low-latency ping-pong index back to 0 and ends
        with a bounded barrier (CommTimeoutError naming a rank that did not come; masked ranks are not waited for).
        Handles from before the reset must not be used after it. GPU backend: not built (ConfigError)."""
        self._check_open()
        if self._backend.on_device:
            raise ConfigError("reset: not built on the GPU backend yet; destroy the Buffer and make a new one")
        self._backend.reset()


_op_ids = itertools.count(1)
_buffers_by_op_id: "weakref.WeakValueDictionary[int, Buffer]" = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=16)
def _default_config(num_sms: int) -> Config:
    """The Config of a call that passes none (Configs are frozen: one per SM count, not one per call)."""
    return Config(num_sms=num_sms)


def buffer_by_op_id(bid: int, who: str) -> Buffer:
    """The live Buffer whose op id is bid (epcomm.torch's custom ops and epcomm.jax's callbacks name Buffers by it);
    EpcommError naming `who` once it was garbage-collected."""
    buf = _buffers_by_op_id.get(int(bid))
    if buf is None:
        raise EpcommError(f"{who}: no live Buffer has op id {bid} (it was garbage-collected)")
    return buf


def _check_no_grad(a, name: str) -> None:
    """A torch tensor that requires grad, passed while autograd records, would come back with its gradient silently
    cut (the plain API has no backward): refuse it and name the wrappers that have one. Under torch.no_grad(), or
    with .detach(), the call is the caller's explicit choice and goes through."""
    module = type(a).__module__
    if not (module == "torch" or module.startswith("torch.")) or not getattr(a, "requires_grad", False):
        return
    import torch
    if torch.is_grad_enabled():
        raise ConfigError(f"{name}: this tensor requires grad, and Buffer's calls have no backward, so the gradient "
                          "would be silently lost; use epcomm.torch.dispatch / epcomm.torch.combine (autograd), or "
                          "pass .detach() (or call under torch.no_grad()) to drop the gradient on purpose")


def _release(backend, group) -> None:
    """Free a Buffer's backend, then the group it made (None: the caller's group, left alone)."""
    try:
        if backend is not None:
            backend.close()
    finally:
        if group is not None:
            group.close()


def _release_at_gc(backend, group, explicitly_destroy: bool, rank: int) -> None:
    if explicitly_destroy:
        warnings.warn(f"epcomm.Buffer of rank {rank} was garbage-collected without destroy() although "
                      "explicitly_destroy=True: its resources leak", ResourceWarning, stacklevel=2)
        return
    _release(backend, group)


def _fabric_supported(device) -> bool:
    """Whether the GPU can export fabric handles (the memory kind multi-node NVLink shares)."""
    try:
        from cuda.bindings import driver
        driver.cuInit(0)
        err, dev = driver.cuDeviceGet(int(device))
        err2, value = driver.cuDeviceGetAttribute(
            driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_FABRIC_SUPPORTED, dev)
        return int(err) == 0 and int(err2) == 0 and bool(value)
    except Exception:
        return False


def _dtype_of(dtype):
    """(framework, numpy dtype) of a dtype argument: a torch dtype gives 'torch', anything else 'native'."""
    from .interop import BF16, FP8
    if type(dtype).__module__.split(".")[0] == "torch":
        import torch
        special = {torch.bfloat16: BF16, getattr(torch, "float8_e4m3fn", None): FP8}
        if dtype in special:
            return "torch", special[dtype]
        return "torch", np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    try:
        return "native", np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"dtype: expected a numpy, CuPy or torch dtype, got {dtype!r}") from None


# DeepEP's recommended configs per rank count: (nvl send, nvl recv, rdma send, rdma recv) chunk sizes, with
# Buffer.num_sms SMs (deep_ep.Buffer.get_dispatch_config / get_combine_config).
_DISPATCH_CONFIGS = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
    96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_CONFIGS = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
    96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _deepep_config(table: dict, num_ranks) -> Config:
    r = v.check_int(num_ranks, "num_ranks", 1)
    return Config(Buffer.num_sms, *table[r]) if r in table else Config(Buffer.num_sms)
