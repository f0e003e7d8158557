"""GpuBackend: builds the kernel families a Buffer asked for, over one GpuContext, and routes each call to its family.

Routing (one line per family): the layout family always; normal mode to the intranode family when every rank is
P2P-reachable (one NVLink node); low-latency mode to the low-latency family (NVLink stores to P2P peers, NVSHMEM puts
to the others).
"""
from __future__ import annotations

import contextlib

from .. import sizing
from ..errors import ConfigError
from ..interop import as_cupy, caller_stream
from .context import GpuContext
from .layout import LayoutGpu


class GpuBackend:
    name = "gpu"
    on_device = True

    def __init__(self, group, num_nvl_bytes: int, num_rdma_bytes: int, low_latency_mode: bool):
        import cupy
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.device = cupy.cuda.Device(group.device)
        with self.device:
            self.ctx = GpuContext(group)
            self.layout = LayoutGpu(self.ctx)
            self.intranode = None
            self.low_latency = None
            self._no_normal = None  # why normal-mode calls are unavailable, when they are
            try:
                # Normal mode: unless a low-latency Buffer asked for no NVLink bytes (DeepEP's num_nvl_bytes=0).
                if low_latency_mode and num_nvl_bytes == 0:
                    self._no_normal = ("this Buffer was made with low_latency_mode=True and num_nvl_bytes=0 (no normal-"
                                       "mode buffer); pass num_nvl_bytes (Config.get_nvl_buffer_size_hint)")
                elif group.topology.all_p2p():
                    from .intranode import IntranodeGpu
                    nbytes = num_nvl_bytes or sizing.default_nvl_bytes(self.num_ranks)
                    self.intranode = IntranodeGpu(self.ctx, nbytes)
                else:
                    self._no_normal = ("normal mode across nodes (ranks not all P2P-reachable) has no GPU kernels yet; "
                                       f"topology: {group.topology}")
                if low_latency_mode:
                    from .low_latency import LowLatencyGpu
                    self.low_latency = LowLatencyGpu(self.ctx, num_rdma_bytes)
            except BaseException:
                self.close()
                raise

    # -- arrays, streams, devices (the Backend protocol's boundary half) -----------------------------------
    def device_scope(self):
        """The rank's GPU made current (other libraries, e.g. JAX at start-up, may switch the thread's device)."""
        return self.device

    def import_array(self, a, name: str):
        return as_cupy(a, name)

    def caller_stream(self, like):
        return caller_stream(like)

    def check_topk_range(self, topk_idx, num_experts: int) -> None:
        """Nothing on the host: the kernels count out-of-range indices (GpuContext.check raises for them)."""

    def comm_stream(self):
        return self.ctx.stream

    def local_buffer(self, use_rdma: bool):
        """uint8 CuPy array over this rank's NVLink buffer, or (use_rdma) its low-latency NVSHMEM buffer."""
        import numpy as np
        if use_rdma:
            if self.low_latency is None or self.low_latency.sym is None:
                raise ConfigError("use_rdma_buffer: this Buffer has no low-latency buffer yet (make it with "
                                  "low_latency_mode=True and num_rdma_bytes > 0)")
            return self.low_latency.sym
        local = self._normal().nvl.local
        return local.view(0, (local.nbytes,), np.uint8)

    # -- families ------------------------------------------------------------------------------------------
    def _normal(self):
        if self.intranode is None:
            raise ConfigError(f"normal mode: {self._no_normal}")
        return self.intranode

    def _ll(self):
        if self.low_latency is None:
            raise ConfigError("low_latency_mode: this Buffer was made without low_latency_mode=True")
        return self.low_latency

    def _family(self, family: str):
        if family == "intranode":
            return self._normal()
        if family == "low_latency":
            return self._ll()
        raise ConfigError(f"family: expected 'intranode' or 'low_latency', got {family!r}")

    def tuning(self, family: str):
        return self._family(family).tuning

    def set_tuning(self, family: str, **changes):
        return self._family(family).set_tuning(**changes)

    @property
    def num_nvl_bytes(self) -> int:
        return self.intranode.nbytes if self.intranode is not None else 0

    @property
    def num_rdma_bytes(self) -> int:
        return self.low_latency.nbytes if self.low_latency is not None else 0

    # -- calls ---------------------------------------------------------------------------------------------
    def get_dispatch_layout(self, topk_idx, num_experts, call):
        return self.layout.get_dispatch_layout(topk_idx, num_experts, call)

    def dispatch(self, x, topk_idx, topk_weights, is_token_in_rank, num_experts, expert_alignment, num_worst_tokens,
                 config, call, num_tokens_per_expert=None, zero_copy=False):
        return self._normal().dispatch(x, topk_idx, topk_weights, is_token_in_rank, num_experts, expert_alignment,
                                       num_worst_tokens, config, call, num_tokens_per_expert, zero_copy)

    def cached_dispatch(self, x, handle, config, call, zero_copy=False):
        return self._normal().cached_dispatch(x, handle, config, call, zero_copy)

    def get_combine_buffer(self, handle):
        return self._normal().get_combine_buffer(handle)

    def combine(self, x, handle, topk_weights, bias, config, call, zero_copy=False):
        return self._normal().combine(x, handle, topk_weights, bias, config, call, zero_copy)

    def low_latency_dispatch(self, x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0,
                             return_recv_hook, cumulative_stats, wait_stats, call):
        return self._ll().dispatch(x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0,
                                   return_recv_hook, cumulative_stats, wait_stats, call)

    def low_latency_combine(self, x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, call,
                            wait_stats=None, use_logfmt=False):
        if use_logfmt:
            raise ConfigError("use_logfmt: the GPU low-latency combine has no LogFMT kernel yet (the CPU backend has "
                              "it); pass use_logfmt=False")
        if wait_stats is not None:
            raise ConfigError("combine_wait_recv_cost_stats: epcomm's GPU combine kernels do not measure receive "
                              "waits yet; pass None (dispatch_wait_recv_cost_stats is measured)")
        return self._ll().combine(x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, call)

    def get_next_low_latency_combine_buffer(self, handle):
        return self._ll().next_combine_buffer(handle)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
        self._ll().clean(num_max_dispatch_tokens_per_rank, hidden, num_experts)

    def sync(self) -> None:
        self.ctx.sync()

    def close(self) -> None:
        ctx = getattr(self, "ctx", None)
        intranode, low_latency = getattr(self, "intranode", None), getattr(self, "low_latency", None)
        with contextlib.ExitStack() as stack:  # every part is freed even if an earlier one raises
            if ctx is not None:
                stack.callback(ctx.close)
            if intranode is not None:
                stack.callback(intranode.close)
            if low_latency is not None:
                stack.callback(low_latency.close)  # collective: frees the NVSHMEM buffer
            if ctx is not None:
                ctx.stream.synchronize()
