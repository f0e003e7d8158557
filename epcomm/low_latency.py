"""Low-latency (decoding) mode: the buffer layout and its size hint (shared by every backend), the kernel specs of
cuda_src/epcomm/low_latency.cuh, its tuning and handle state (pure data; the launcher is epcomm/gpu/low_latency.py).

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
from dataclasses import dataclass
from typing import Any

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

# Indices into the launcher's epochs: [kind][half].
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
# Tuning and handle state
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LowLatencyTuning:
    """How the low-latency kernels move their bytes (change it with Buffer.set_tuning("low_latency", **changes)).

    once_per_rank: dispatch sends a token's payload once per NVLink-reachable destination rank (dispatch_tokens) and
        only a 16-byte header per expert; False sends the whole message per (token, expert) as DeepEP does. Peers
        reached by NVSHMEM puts always get whole messages.
    combine_once_per_rank: combine sums a token's rows at each NVLink-reachable expert rank (weighted, float32; the
        token owner's top-k weights cross first) and sends one float32 row per (token, rank) instead of a bf16 row per
        (token, expert); False sends every row back as DeepEP does. None: True where it moves fewer bytes, K > 2R (a
        float32 row weighs two bf16 rows; uniform routing puts K / R of a token's rows on a rank). The sum's order
        differs from the reference's k order (float32 reassociation, then one bf16 rounding), so results can differ
        from the per-expert path in the last bf16 bit; tests compare at calc_diff < 1e-5 as DeepEP's do.
    combine_send_blocks_per_expert: blocks combine_send gives each local expert (None: the heuristic).
    force_nvshmem: NVSHMEM puts for every destination, the own rank included (default: EPCOMM_FORCE_NVSHMEM).
    """
    once_per_rank: bool = True
    combine_once_per_rank: bool | None = None
    combine_send_blocks_per_expert: int | None = None
    force_nvshmem: bool = False

    def __post_init__(self):
        for name in ("once_per_rank", "force_nvshmem"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"LowLatencyTuning.{name}: expected a bool, got {getattr(self, name)!r}")
        if self.combine_once_per_rank is not None and not isinstance(self.combine_once_per_rank, bool):
            raise ConfigError("LowLatencyTuning.combine_once_per_rank: expected None or a bool, got "
                              f"{self.combine_once_per_rank!r}")
        bpe = self.combine_send_blocks_per_expert
        if bpe is not None and (isinstance(bpe, bool) or not isinstance(bpe, int) or bpe < 1):
            raise ConfigError(f"LowLatencyTuning.combine_send_blocks_per_expert: expected None or an int >= 1, got "
                              f"{bpe!r}")

    def combine_sums_once(self, num_topk: int, num_ranks: int) -> bool:
        """Whether a combine with this top-k sums each token once per rank (None: K > 2R)."""
        once = self.combine_once_per_rank
        return bool(num_topk > 2 * num_ranks if once is None else once)


def default_tuning() -> LowLatencyTuning:
    """The low-latency family's defaults (EPCOMM_FORCE_NVSHMEM read here, when a Buffer is made)."""
    from .env import env
    return LowLatencyTuning(force_nvshmem=bool(env("EPCOMM_FORCE_NVSHMEM")))


@dataclass(frozen=True)
class LowLatencyHandleState:
    """What a GPU low-latency dispatch leaves in its LowLatencyHandle: the (Tmax, H, R, E) key of the buffer layout
    it used, and expert_rows [R, Tmax, K] int32 ((source, token, k) -> row, for the once-per-rank combine)."""
    layout_key: tuple
    expert_rows: Any
