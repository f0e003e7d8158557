"""Low-latency (decoding) mode: the buffer layout and its size hint (shared by every backend), the kernel specs of
cuda_src/epcomm/low_latency.cuh, and LowLatencyGpu, the GPU backend's low-latency half (NVSHMEM symmetric memory).

Buffer: one NVSHMEM symmetric allocation of two halves with the same layout (LowLatencyLayout); dispatch calls
alternate halves (call count parity), and so do combine calls, independently. Per half, in order:

    dispatch_signals [E_local][R] u64      (epoch << 32) | (count + 1) from each source, per local expert
    combine_signals  [E] u64               [d * E_local] = (epoch << 1) | partial from owner d (once, after all its
                                           rows; partial: they are combine_partial rows); other slots unused
    weight_signals   [R] u64               epoch from each source: its top-k weights are in combine_weights
    dispatch_recv    [E_local][R][Tmax]    messages of msg_stride bytes: 16-byte header (int32 source token index,
                                           int32 1 when the payload is in dispatch_tokens, else 0, int32 k + 1 of
                                           direct stores, else 0) + bf16 [H], or
                                           e4m3 [H] + float32 scale_inv [H / 128] (only the header when the payload
                                           went to dispatch_tokens)
    combine_recv     [E][Tmax]             bf16 [H] rows: expert e's output for this rank's token t
    combine_send     [E_local][R*Tmax]     bf16 [H]: get_next_low_latency_combine_buffer (zero-copy input); staging
                                           of the NVSHMEM path otherwise
    dispatch_send    [Tmax]                messages: staging of the NVSHMEM path
    dispatch_tokens  [R][Tmax]             messages: [s][t] = source s's token t, sent ONCE to this rank however many
                                           of its experts here it names (NVLink peers; once_per_rank)
    combine_weights  [R][Tmax][MAX_TOPK]   f32: [s][t][k] = source s's topk_weights[t, k]
    combine_partial  [R][Tmax]             f32 [H] rows: [d][t] = rank d's weighted sum of its experts' outputs for
                                           this rank's token t, sent ONCE per (token, rank) (NVLink peers;
                                           combine_once_per_rank)

Every region starts on a 256-byte boundary; offsets depend only on (Tmax, H, R, E), never on dtype options.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from .errors import ConfigError
from .runtime import KernelSpec, register_family
from .runtime.diagnostics import for_kernel
from .validate import check_int

#: Bytes of the per-message header in front of each low-latency row (source token index, padding).
LL_MSG_HEADER_BYTES = 16
#: Mirrors of kMaxRanks / kMaxTopk in cuda_src/epcomm/low_latency.cuh (shared-memory tables).
MAX_RANKS = 256
MAX_TOPK = 256
#: Region alignment inside a half, and of a half.
ALIGN = 256
FP8_BLOCK = 128

DISPATCH_SEND_THREADS = 512
DISPATCH_RECV_THREADS = 512
COMBINE_SEND_THREADS = 512
COMBINE_RECV_THREADS = 512   # a bf16 row of H 7168 in two steps of the block
MAX_BLOCKS_PER_EXPERT = 32

COMM_PARAMS = (("uint64_t", "err_record"), ("long long", "timeout_ns"), ("int", "rank"))

# Indices into LowLatencyGpu.epochs: [kind][half].
EPOCH_DISPATCH, EPOCH_COMBINE = 0, 2


def _align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def ll_message_bytes(hidden: int) -> int:
    """Bytes of the largest low-latency dispatch message: a bf16 row plus its header (FP8 rows are smaller)."""
    return LL_MSG_HEADER_BYTES + hidden * 2


def message_bytes(hidden: int, use_fp8: bool) -> int:
    """Bytes of one dispatch message as sent: header + bf16 [H], or header + e4m3 [H] + float32 [H / 128], rounded up
    to 16 (the NVSHMEM path puts exactly this many bytes)."""
    payload = hidden + 4 * (hidden // FP8_BLOCK) if use_fp8 else 2 * hidden
    return LL_MSG_HEADER_BYTES + _align(payload, 16)


@dataclass(frozen=True)
class LowLatencyLayout:
    """Byte offsets of one half of the low-latency buffer (add half_offset(h) for half h); see the module docstring.

    Fields: num_max_dispatch_tokens_per_rank (Tmax), hidden (H), num_ranks (R), num_experts (E); msg_stride: bytes per
    dispatch message slot; off_*: region offsets inside a half; signal_bytes: end of the signal regions (what
    clean_low_latency_buffer zeroes); half_bytes: size of a half (a multiple of ALIGN).
    """
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_ranks: int
    num_experts: int
    msg_stride: int
    off_dispatch_signals: int
    off_combine_signals: int
    off_weight_signals: int
    signal_bytes: int
    off_dispatch_recv: int
    off_combine_recv: int
    off_combine_send: int
    off_dispatch_send: int
    off_dispatch_tokens: int
    off_combine_weights: int
    off_combine_partial: int
    half_bytes: int

    @staticmethod
    def plan(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> "LowLatencyLayout":
        tmax = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
        h = check_int(hidden, "hidden", 8)
        r = check_int(num_ranks, "num_ranks", 1)
        e = check_int(num_experts, "num_experts", r)
        if e % r:
            raise ConfigError(f"num_experts: expected a multiple of num_ranks={r}, got {e}")
        if h % 8:
            raise ConfigError(f"hidden: expected a multiple of 8, got {h}")
        e_local = e // r
        msg_stride = _align(ll_message_bytes(h), 16)
        row_bytes = 2 * h
        off_dispatch_signals = 0
        off_combine_signals = _align(off_dispatch_signals + e_local * r * 8)
        off_weight_signals = _align(off_combine_signals + e * 8)
        signal_bytes = _align(off_weight_signals + r * 8)
        off_dispatch_recv = signal_bytes
        off_combine_recv = _align(off_dispatch_recv + e_local * r * tmax * msg_stride)
        off_combine_send = _align(off_combine_recv + e * tmax * row_bytes)
        off_dispatch_send = _align(off_combine_send + e_local * r * tmax * row_bytes)
        off_dispatch_tokens = _align(off_dispatch_send + tmax * msg_stride)
        off_combine_weights = _align(off_dispatch_tokens + r * tmax * msg_stride)
        off_combine_partial = _align(off_combine_weights + r * tmax * MAX_TOPK * 4)
        half_bytes = _align(off_combine_partial + r * tmax * h * 4)
        return LowLatencyLayout(tmax, h, r, e, msg_stride, off_dispatch_signals, off_combine_signals,
                                off_weight_signals, signal_bytes, off_dispatch_recv, off_combine_recv,
                                off_combine_send, off_dispatch_send, off_dispatch_tokens, off_combine_weights,
                                off_combine_partial, half_bytes)

    @property
    def key(self) -> tuple:
        return (self.num_max_dispatch_tokens_per_rank, self.hidden, self.num_ranks, self.num_experts)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def total_bytes(self) -> int:
        return 2 * self.half_bytes

    def half_offset(self, half: int) -> int:
        if half not in (0, 1):
            raise ValueError(f"half: expected 0 or 1, got {half}")
        return half * self.half_bytes

    def regions(self) -> list[tuple[str, int, int]]:
        """(name, offset, bytes) of every region of one half, in address order (for tests and diagnostics)."""
        e_local, r, tmax, row = self.num_local_experts, self.num_ranks, self.num_max_dispatch_tokens_per_rank, \
            2 * self.hidden
        return [("dispatch_signals", self.off_dispatch_signals, e_local * r * 8),
                ("combine_signals", self.off_combine_signals, self.num_experts * 8),
                ("weight_signals", self.off_weight_signals, r * 8),
                ("dispatch_recv", self.off_dispatch_recv, e_local * r * tmax * self.msg_stride),
                ("combine_recv", self.off_combine_recv, self.num_experts * tmax * row),
                ("combine_send", self.off_combine_send, e_local * r * tmax * row),
                ("dispatch_send", self.off_dispatch_send, tmax * self.msg_stride),
                ("dispatch_tokens", self.off_dispatch_tokens, r * tmax * self.msg_stride),
                ("combine_weights", self.off_combine_weights, r * tmax * MAX_TOPK * 4),
                ("combine_partial", self.off_combine_partial, r * tmax * self.hidden * 4)]


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of NVSHMEM memory for low-latency mode: two alternating halves, each holding the signals, the worst-case
    dispatch receive area [E_local, R*Tmax] messages, the combine receive area [E, Tmax] bf16 rows, the zero-copy
    combine input [E_local, R*Tmax] bf16 rows, a [Tmax]-message staging area, the once-per-rank dispatch area
    [R, Tmax] messages and the once-per-rank combine areas (weights [R, Tmax, MAX_TOPK] f32, partial sums
    [R, Tmax, H] f32) (LowLatencyLayout)."""
    return LowLatencyLayout.plan(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts).total_bytes


def blocks_per_expert(num_local_experts: int, num_sms: int) -> int:
    """Blocks the receive / combine-send kernels give each local expert: about one wave of the GPU in all."""
    return max(1, min(MAX_BLOCKS_PER_EXPERT, -(-num_sms // max(1, num_local_experts))))


# ---------------------------------------------------------------------------------------------------------------------
# Kernel specs (the ABI: params are the stub's parameter list and the launch conversion)
# ---------------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def dispatch_send_spec(use_fp8: bool, round_scale: bool) -> KernelSpec:
    return KernelSpec(
        family="low_latency", op="dispatch_send",
        template_args=(("kNumThreads", DISPATCH_SEND_THREADS), ("kUseFp8", bool(use_fp8)),
                       ("kRoundScale", bool(use_fp8 and round_scale))),
        params=(("const int4*", "x"), ("const int64_t*", "topk_idx"), ("int", "num_tokens"), ("int", "num_topk"),
                ("int", "hidden"), ("int", "num_experts"), ("int", "num_ranks"), ("int", "tmax"),
                ("uint8_t*", "sym_base"), ("long long", "off_signals"), ("long long", "off_recv"),
                ("long long", "off_staging"), ("long long", "off_tokens"), ("int", "msg_stride"),
                ("int", "msg_bytes"), ("int*", "expert_counters"), ("int*", "block_counter"),
                ("uint64_t*", "epoch_counter"), ("int", "force_nvshmem"), ("int", "once_per_rank"),
                ("int*", "num_bad_indices"), ("int*", "expert_rows"), ("int", "expert_rows_len")) + COMM_PARAMS,
        num_threads=DISPATCH_SEND_THREADS, uses_nvshmem=True)


@functools.lru_cache(maxsize=None)
def dispatch_recv_spec(use_fp8: bool, use_ue8m0: bool) -> KernelSpec:
    return KernelSpec(
        family="low_latency", op="dispatch_recv",
        template_args=(("kNumThreads", DISPATCH_RECV_THREADS), ("kUseFp8", bool(use_fp8)),
                       ("kUseUe8m0", bool(use_fp8 and use_ue8m0))),
        params=(("const uint8_t*", "local_base"), ("long long", "off_signals"), ("long long", "off_recv"),
                ("long long", "off_tokens"), ("int", "msg_stride"), ("int", "hidden"), ("int", "num_ranks"),
                ("int", "num_local_experts"), ("int", "tmax"), ("int", "blocks_per_expert"), ("int", "num_topk"),
                ("const uint64_t*", "epoch_counter"), ("int4*", "out_x"), ("void*", "out_scales"),
                ("int*", "out_src_info"), ("int64_t*", "out_layout_range"), ("int*", "out_count"),
                ("int*", "cumulative_stats"), ("long long*", "wait_stats"), ("int*", "out_expert_rows")) + COMM_PARAMS,
        num_threads=DISPATCH_RECV_THREADS)


@functools.lru_cache(maxsize=None)
def combine_send_spec(defines: tuple = ()) -> KernelSpec:
    return KernelSpec(
        family="low_latency", op="combine_send", template_args=(("kNumThreads", COMBINE_SEND_THREADS),),
        params=(("const int4*", "x"), ("int", "hidden"), ("const int*", "src_info"),
                ("const int64_t*", "layout_range"), ("int", "num_ranks"), ("int", "num_local_experts"),
                ("int", "tmax"), ("int", "blocks_per_expert"), ("uint8_t*", "sym_base"),
                ("long long", "off_signals"), ("long long", "off_recv"), ("long long", "off_staging"),
                ("int", "zero_copy"), ("int*", "block_counter"), ("uint64_t*", "epoch_counter"),
                ("int", "force_nvshmem"), ("int", "once_per_rank"), ("const int64_t*", "topk_idx"),
                ("const float*", "topk_weights"), ("int", "num_tokens"), ("int", "num_topk"),
                ("const int*", "expert_rows"), ("long long", "off_weight_signals"), ("long long", "off_weights"),
                ("long long", "off_partial")) + COMM_PARAMS,
        num_threads=COMBINE_SEND_THREADS, uses_nvshmem=True,
        defines=for_kernel(defines, "low_latency", "combine_send"))


@functools.lru_cache(maxsize=None)
def combine_recv_spec() -> KernelSpec:
    return KernelSpec(
        family="low_latency", op="combine_recv", template_args=(("kNumThreads", COMBINE_RECV_THREADS),),
        params=(("const uint8_t*", "local_base"), ("long long", "off_signals"), ("long long", "off_recv"),
                ("long long", "off_partial"), ("int", "hidden"), ("int", "num_experts"), ("int", "num_ranks"),
                ("int", "tmax"), ("const int64_t*", "topk_idx"), ("const float*", "topk_weights"),
                ("int", "num_tokens"), ("int", "num_topk"), ("const uint64_t*", "epoch_counter"),
                ("int4*", "out")) + COMM_PARAMS,
        num_threads=COMBINE_RECV_THREADS)


def example_specs() -> list[KernelSpec]:
    return [dispatch_send_spec(False, False), dispatch_send_spec(True, False), dispatch_send_spec(True, True),
            dispatch_recv_spec(False, False), dispatch_recv_spec(True, False), dispatch_recv_spec(True, True),
            combine_send_spec(), combine_recv_spec(),
            combine_send_spec(defines=(("EPCOMM_DEBUG_LL_COMBINE_SKIP", 15),))]  # the diagnostics switch on


register_family("low_latency", example_specs)


# ---------------------------------------------------------------------------------------------------------------------
# The GPU backend's low-latency half
# ---------------------------------------------------------------------------------------------------------------------

class LowLatencyGpu:
    """Low-latency dispatch / combine on the GPU over one NVSHMEM symmetric buffer (owned by GpuBackend).

    backend: the GpuBackend (its comm stream, error record, _begin/_finish, bad-index counter).
    num_rdma_bytes: bytes of the symmetric buffer (Buffer.get_low_latency_rdma_size_hint); 0 sizes it on the first
        call for that call's shapes (a collective allocation: every rank makes the same first call).
    EPCOMM_FORCE_NVSHMEM=1 (read here, at construction): NVSHMEM puts for every destination, the own rank included.

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

    def __init__(self, backend, num_rdma_bytes: int):
        from .config import env
        self.be = backend
        self.cp = backend.cp
        self.group = backend.group
        self.rank, self.num_ranks = backend.rank, backend.num_ranks
        if self.num_ranks > MAX_RANKS:
            raise ConfigError(f"low_latency_mode: expected at most {MAX_RANKS} ranks, got {self.num_ranks}")
        self.force_nvshmem = bool(env("EPCOMM_FORCE_NVSHMEM"))
        # Dispatch sends a token's payload once per NVLink-reachable destination rank (dispatch_tokens) and only a
        # 16-byte header per expert; False sends the whole message per (token, expert) as DeepEP does (kept for
        # comparison: tests and bench/bench_low_latency.py run both). Peers reached by NVSHMEM puts always get
        # whole messages.
        self.once_per_rank = True
        # True: combine sums a token's rows at each NVLink-reachable expert rank (weighted, float32; the token
        # owner's top-k weights cross first) and sends one float32 row per (token, rank) instead of a bf16 row per
        # (token, expert); False sends every row back as DeepEP does. None (default): True where it moves fewer
        # bytes, K > 2R (a float32 row weighs two bf16 rows; uniform routing puts K / R of a token's rows on a rank:
        # EP2 with top-8 yes, EP4 and EP8 no). The sum's order differs from the reference's k order (float32
        # reassociation, then one bf16 rounding), so results can differ from the per-expert path in the last bf16
        # bit; tests compare at calc_diff < 1e-5 as DeepEP's do.
        self.combine_once_per_rank = None
        # Diagnostics (bench/bench_low_latency.py --trace): kSkip* bits of low_latency.cuh (wrong results when set),
        # and a blocks-per-expert override of combine_send (None: blocks_per_expert()).
        self.combine_debug_skip = 0
        self.combine_send_bpe = None
        self.nbytes = int(num_rdma_bytes)
        self.num_sms = backend.num_sms_device
        self.sym = None            # uint8 CuPy array over the symmetric buffer (nvshmem.core.array)
        self.layout: LowLatencyLayout | None = None
        self.dispatch_calls = 0    # host call counters: the half of the next call is the parity
        self.combine_calls = 0
        cp = self.cp
        with backend.stream:
            # [dispatch half 0, dispatch half 1, combine half 0, combine half 1]: calls made on each (device-owned).
            self.epochs = cp.zeros(4, dtype=cp.uint64)
            self.block_counters = cp.zeros(2, dtype=cp.int32)   # [dispatch_send, combine_send] last-block-out
            self.expert_counters = cp.zeros(1024, dtype=cp.int32)
        self._retired: list = []   # arrays replaced while kernels may still use them (kept alive)
        if not self.group.nvshmem_started:
            # The symmetric heap must hold the buffer (NVSHMEM's default is 1 GiB); same value on every rank.
            want = max(self.nbytes + (256 << 20), 1 << 30)
            os.environ.setdefault("NVSHMEM_SYMMETRIC_SIZE", str(want))
        self.group.init_nvshmem()
        if self.nbytes:
            self._allocate(self.nbytes)

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
        self.cp.cuda.Device().synchronize()
        self.group.barrier()

    @property
    def base_ptr(self) -> int:
        return int(self.sym.data.ptr)

    def _prepare(self, tmax: int, hidden: int, num_experts: int, ctx) -> LowLatencyLayout:
        """The layout for these shapes: allocates on first use (num_rdma_bytes=0), cleans on a change of shapes."""
        lay = LowLatencyLayout.plan(tmax, hidden, self.num_ranks, num_experts)
        if self.layout is not None and self.layout.key == lay.key:
            return self.layout
        capturing = ctx is not None and ctx.stream is not None and ctx.stream.is_capturing()
        if self.sym is None:
            if capturing:
                raise ConfigError("low_latency_dispatch: the first low-latency call allocates the buffer; make one "
                                  "outside CUDA-graph capture (or pass num_rdma_bytes)")
            self._allocate(lay.total_bytes)
        if lay.total_bytes > self.nbytes:
            need = rdma_size_hint(tmax, hidden, self.num_ranks, num_experts)
            raise ConfigError(f"num_rdma_bytes: Tmax={tmax}, hidden={hidden}, num_experts={num_experts} on "
                              f"{self.num_ranks} ranks need {need} bytes (get_low_latency_rdma_size_hint); this "
                              f"Buffer has {self.nbytes}")
        if self.layout is not None:
            if capturing:
                raise ConfigError("low-latency shapes changed during CUDA-graph capture: make one call with the new "
                                  "shapes (Tmax, hidden, num_experts) before capturing")
            self._clean(lay)
        self.layout = lay
        if self.expert_counters.size < num_experts:
            self._retired.append(self.expert_counters)
            with self.be.stream:
                self.expert_counters = self.cp.zeros(num_experts, dtype=self.cp.int32)
        return lay

    def _clean(self, lay: LowLatencyLayout) -> None:
        """Collective reset: wait for every rank's low-latency work, zero both halves' signals, the epochs and the
        counters, and let no rank send before every rank has zeroed."""
        cp = self.cp
        self.be.stream.synchronize()
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
        lay = LowLatencyLayout.plan(tmax, hidden, self.num_ranks, num_experts)
        if self.sym is None:
            self._allocate(lay.total_bytes)
        if lay.total_bytes > self.nbytes:
            raise ConfigError(f"num_rdma_bytes: these shapes need {lay.total_bytes} bytes, this Buffer has "
                              f"{self.nbytes}")
        if self.expert_counters.size < num_experts:
            self._retired.append(self.expert_counters)
            with self.be.stream:
                self.expert_counters = self.cp.zeros(num_experts, dtype=self.cp.int32)
        self._clean(lay)
        self.layout = lay

    def _epoch_ptr(self, kind: int, half: int) -> int:
        return int(self.epochs.data.ptr) + 8 * (kind + half)

    def _counter_ptr(self, i: int) -> int:
        return int(self.block_counters.data.ptr) + 4 * i

    def _combine_send_view(self, lay: LowLatencyLayout, half: int):
        from .interop import BF16
        start = lay.half_offset(half) + lay.off_combine_send
        rows = self.num_ranks * lay.num_max_dispatch_tokens_per_rank
        nbytes = lay.num_local_experts * rows * lay.hidden * 2
        return self.sym[start:start + nbytes].view(BF16).reshape(lay.num_local_experts, rows, lay.hidden)

    def _split(self, ctx, keep, lay: LowLatencyLayout, receive, return_recv_hook: bool, what: str):
        """The end of a call whose send kernel is launched: (None, event of send and receive) with receive() launched
        now, or (hook, event of the send) with return_recv_hook. hook() launches receive() after the caller's stream
        as it is then and returns the receive's Event. keep: arrays the kernels use (kept alive by the events)."""
        be = self.be
        if not return_recv_hook:
            receive()
            return None, be._finish(ctx, keep)

        def hook():
            if self.layout is None or self.layout.key != lay.key:
                raise ConfigError(f"hook: the low-latency buffer was re-laid out (new shapes or a clean) since this "
                                  f"{what}; its data is gone")
            be._begin(ctx)
            receive()
            return be._finish(ctx, keep)

        return hook, be._finish(ctx, keep)

    # -- dispatch ------------------------------------------------------------------------------------------
    def dispatch(self, x, topk_idx, tmax, num_experts, use_fp8, round_scale, use_ue8m0, return_recv_hook,
                 cumulative_stats, wait_stats, ctx):
        """Returns (recv_x, recv_count, handle, hook or None, event); shapes as Buffer.low_latency_dispatch, hook as
        _split."""
        from .handles import LowLatencyHandle
        from .interop import BF16
        from .runtime import get_kernel
        cp, be = self.cp, self.be
        t, h = x.shape
        k = topk_idx.shape[1]
        r = self.num_ranks
        if k > MAX_TOPK:
            raise ConfigError(f"topk_idx: expected at most {MAX_TOPK} columns on the GPU, got [{t}, {k}]")
        lay = self._prepare(tmax, h, num_experts, ctx)
        e_local = lay.num_local_experts
        half = self.dispatch_calls & 1
        self.dispatch_calls += 1
        base = self.base_ptr
        half_off = lay.half_offset(half)
        rows = r * tmax
        num_scales = h // FP8_BLOCK
        be._begin(ctx)
        with be._alloc_stream(ctx):
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
        comm = tuple(be.err.wait_params())
        get_kernel(dispatch_send_spec(use_fp8, round_scale)).launch(
            max(1, min(t, 2 * self.num_sms)),
            (x, topk_idx, t, k, h, num_experts, r, tmax, base, half_off + lay.off_dispatch_signals,
             half_off + lay.off_dispatch_recv, half_off + lay.off_dispatch_send, half_off + lay.off_dispatch_tokens,
             lay.msg_stride, message_bytes(h, use_fp8), self.expert_counters, self._counter_ptr(0),
             self._epoch_ptr(EPOCH_DISPATCH, half), int(self.force_nvshmem), int(self.once_per_rank),
             be.bad_index.device_ptr, expert_rows, expert_rows.size) + comm,
            stream=be.stream)
        handle = LowLatencyHandle(src_info, layout_range, tmax, h, num_experts, t, half,
                                  backend_state={"layout": lay.key, "expert_rows": expert_rows})
        bpe = blocks_per_expert(e_local, self.num_sms)

        def receive():
            get_kernel(dispatch_recv_spec(use_fp8, use_ue8m0)).launch(
                e_local * bpe,
                (base, half_off + lay.off_dispatch_signals, half_off + lay.off_dispatch_recv,
                 half_off + lay.off_dispatch_tokens, lay.msg_stride, h, r, e_local, tmax, bpe, k,
                 self._epoch_ptr(EPOCH_DISPATCH, half), data, scales, src_info, layout_range, recv_count,
                 cumulative_stats, wait_stats, expert_rows) + tuple(be.err.wait_params()),
                stream=be.stream)

        hook, ev = self._split(ctx, (x, topk_idx, cumulative_stats, wait_stats), lay, receive, return_recv_hook,
                               "dispatch")
        return recv_x, recv_count, handle, hook, ev

    # -- combine -------------------------------------------------------------------------------------------
    def combine_sums_once(self, num_topk: int) -> bool:
        """Whether a combine with this top-k sums each token once per rank (combine_once_per_rank; None: K > 2R)."""
        once = self.combine_once_per_rank
        return bool(num_topk > 2 * self.num_ranks if once is None else once)

    def next_combine_buffer(self, handle):
        """The [E_local, R*Tmax, H] bf16 view of symmetric memory the next zero-copy combine reads."""
        lay = self._prepare(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts, None)
        return self._combine_send_view(lay, self.combine_calls & 1)

    def combine(self, x, topk_idx, topk_weights, handle, zero_copy, return_recv_hook, out, ctx):
        """Returns (combined [T, H] bf16, hook or None, event); semantics as Buffer.low_latency_combine, hook as
        _split."""
        from .interop import BF16
        from .runtime import get_kernel
        cp, be = self.cp, self.be
        t, k = topk_idx.shape
        if k > MAX_TOPK:
            raise ConfigError(f"topk_idx: expected at most {MAX_TOPK} columns on the GPU, got [{t}, {k}]")
        tmax, h, e = handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts
        lay = self._prepare(tmax, h, e, ctx)
        e_local, r = lay.num_local_experts, self.num_ranks
        half = self.combine_calls & 1
        self.combine_calls += 1
        if zero_copy:
            x = self._combine_send_view(lay, half)
        base = self.base_ptr
        half_off = lay.half_offset(half)
        be._begin(ctx)
        with be._alloc_stream(ctx):
            result = out if out is not None else cp.empty((t, h), BF16)
        expert_rows = handle.backend_state.get("expert_rows")  # [R, Tmax, K of the dispatch]
        once = self.combine_sums_once(k) and expert_rows is not None
        if once and expert_rows.shape[2] != k:
            raise ConfigError(f"topk_idx: the combine got {k} columns, the dispatch of this handle "
                              f"{expert_rows.shape[2]}; pass the dispatch's topk_idx")
        # Once per rank, most of the work is dealt over the whole grid: one wave (a block per SM) where E_local allows.
        bpe = self.combine_send_bpe or (max(1, self.num_sms // e_local) if once else
                                        blocks_per_expert(e_local, self.num_sms))
        get_kernel(combine_send_spec()).launch(
            e_local * bpe,
            (x, h, handle.src_info, handle.layout_range, r, e_local, tmax, bpe, base,
             half_off + lay.off_combine_signals, half_off + lay.off_combine_recv, half_off + lay.off_combine_send,
             int(bool(zero_copy)), self._counter_ptr(1), self._epoch_ptr(EPOCH_COMBINE, half),
             int(self.force_nvshmem), int(once), topk_idx, topk_weights, t, k, expert_rows if once else None,
             half_off + lay.off_weight_signals, half_off + lay.off_combine_weights,
             half_off + lay.off_combine_partial, int(self.combine_debug_skip)) +
            tuple(be.err.wait_params()),
            stream=be.stream)

        def receive():
            get_kernel(combine_recv_spec()).launch(
                max(1, min(t, 2 * self.num_sms)),
                (base, half_off + lay.off_combine_signals, half_off + lay.off_combine_recv,
                 half_off + lay.off_combine_partial, h, e, r, tmax, topk_idx, topk_weights, t, k,
                 self._epoch_ptr(EPOCH_COMBINE, half), result) + tuple(be.err.wait_params()),
                stream=be.stream)

        hook, ev = self._split(ctx, (x, topk_idx, topk_weights, handle.src_info, handle.layout_range, expert_rows,
                                     result), lay, receive, return_recv_hook, "combine")
        return result, hook, ev

    # -- lifetime ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Collective: frees the symmetric buffer once every rank's kernels are done."""
        if self.sym is None:
            return
        import nvshmem.core as nvshmem
        try:
            self.be.stream.synchronize()
            self.cp.cuda.Device().synchronize()
        finally:
            self.group.barrier()  # no peer still writes into this rank's copy
            nvshmem.free_array(self.sym)
            self.sym = None
