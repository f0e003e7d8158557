"""Intranode normal mode: kernel specs, the buffer layout mirror, and launch plans for notify / dispatch / combine over
NVLink peer pointers (cuda_src/epcomm/intranode.cuh). The routing layout kernel is its own family: epcomm/layout.py."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .runtime import KernelSpec, register_family
from .runtime.diagnostics import for_kernel

NUM_THREADS = 512          # send / receive / combine blocks (16 warps, one token or row per warp at a time)
NOTIFY_THREADS = 512
MAX_LOCAL_EXPERTS = 1024   # kMaxLocalExperts in intranode.cuh
NUM_FLAG_KINDS = 4         # kNumFlagKinds
HOST_INFO_INTS = 1 + MAX_LOCAL_EXPERTS + 1   # kHostInfoInts: N, per-expert counts, epoch
HOST_INFO_EPOCH = 1 + MAX_LOCAL_EXPERTS
NUM_TICKETS = 2            # kNumTickets: a kernel's int32 counters are [blocks done, NUM_TICKETS ticket counters]
# Where each kernel's counters start in GpuBackend.block_counters (int32 index); zero between calls (the last block
# out of each kernel resets its own).
COUNTER_SLOTS = {"dispatch_send": 0, "combine_stage": 4, "combine_reduce": 8}
NUM_COUNTERS = 12
COMM_PARAMS = (("uint64_t", "err_record"), ("long long", "timeout_ns"), ("int", "rank"))


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def meta_bytes(num_ranks: int) -> int:
    """Mirror of Meta<kNumRanks>::kBytes: counts, per-expert counts (both double-buffered by epoch parity), flags."""
    counts = 2 * num_ranks * num_ranks * 4
    expert_counts = 2 * num_ranks * MAX_LOCAL_EXPERTS * 4
    flags_offset = _align(counts + expert_counts, 128)
    return _align(flags_offset + NUM_FLAG_KINDS * num_ranks * 8, 4096)


@dataclass(frozen=True)
class RecvLayout:
    """Where one dispatch call's rows sit in the data region (same on every rank): capacity and byte offsets."""
    capacity_rows: int
    off_x: int
    off_scales: int
    off_idx: int
    off_w: int
    off_src: int

    @staticmethod
    def plan(data_bytes: int, row_bytes: int, num_scales: int, num_topk: int) -> "RecvLayout":
        per_row = row_bytes + num_scales * 4 + num_topk * 12 + 4
        cap = max(0, (data_bytes - 5 * 256) // per_row)
        off_x = 0
        off_scales = _align(off_x + cap * row_bytes, 256)
        off_idx = _align(off_scales + cap * num_scales * 4, 256)
        off_w = _align(off_idx + cap * num_topk * 8, 256)
        off_src = _align(off_w + cap * num_topk * 4, 256)
        assert off_src + cap * 4 <= data_bytes
        return RecvLayout(cap, off_x, off_scales, off_idx, off_w, off_src)


@dataclass(frozen=True)
class CombineLayout:
    """Where one combine call's staged rows (row n of the receive order, for other ranks to read) sit in the data
    region of the rank that received them."""
    capacity_rows: int
    off_x: int
    off_w: int

    @staticmethod
    def plan(data_bytes: int, hidden: int, num_topk: int, base: int = 0) -> "CombineLayout":
        """Rows of the region [base, data_bytes) of the data region."""
        per_row = hidden * 2 + num_topk * 4
        cap = max(0, (data_bytes - base - 512) // per_row)
        off_w = base + _align(cap * hidden * 2, 256)
        return CombineLayout(cap, base, off_w)


def zero_copy_split(data_bytes: int) -> int:
    """Where the data region is cut while zero-copy outputs are live: a zero-copy dispatch's receive area (its
    outputs) is [0, split), and combine stages its rows in [split, data_bytes), so that a combine (and the expert
    computation writing its zero-copy input) never overwrites the dispatch's outputs."""
    return data_bytes // 2 // 4096 * 4096


def recv_layout(data_bytes: int, row_bytes: int, num_scales: int, num_topk: int, zero_copy: bool) -> RecvLayout:
    """A dispatch's receive layout in a data region of data_bytes (zero_copy: below zero_copy_split)."""
    area = zero_copy_split(data_bytes) if zero_copy else data_bytes
    return RecvLayout.plan(area, row_bytes, num_scales, num_topk)


def combine_layout(data_bytes: int, hidden: int, num_topk: int, outputs_in_buffer: bool) -> CombineLayout:
    """Where a combine stages its rows: above zero_copy_split while a zero-copy dispatch's outputs live in the
    buffer, else from the start of the data region."""
    base = zero_copy_split(data_bytes) if outputs_in_buffer else 0
    return CombineLayout.plan(data_bytes, hidden, num_topk, base)


def nvl_buffer_size_hint(num_max_tokens: int, hidden_bytes: int, num_ranks: int, num_topk: int = 16,
                         zero_copy: bool = False) -> int:
    """Bytes for the worst case: every rank sends all num_max_tokens tokens here (R * T rows of dispatch data,
    FP8 scales and top-k included), which also covers combine's R * T returned rows. zero_copy: room for both at
    once (zero-copy dispatch outputs stay in the buffer while combine stages beside them: zero_copy_split)."""
    rows = num_ranks * num_max_tokens
    hidden = max(hidden_bytes // 2, 128)
    dispatch = rows * (hidden_bytes + (hidden // 128) * 4 + num_topk * 12 + 4) + 5 * 256
    combine = rows * (hidden * 2 + num_topk * 4) + 512
    area = _align(max(dispatch, combine), 4096)
    return meta_bytes(num_ranks) + (2 * area if zero_copy else area)


# How much more an SM copying the rank's own rows moves than an SM storing rows to a peer, per row type: the split
# that balances the two sides, from the send-split sweeps in bench/NOTES.md (EP2, H 7168, 24 SMs).
PEER_SM_WEIGHT = {"fp8": 12 / 12, "bf16": 16 / 8}


def default_peer_sms(num_sms: int, num_ranks: int, fp8: bool = False) -> int:
    """How many of dispatch_send's SMs store rows to peers (the others copy the rank's own rows beside them).

    The split balances the two sides' times: peers get (R - 1) rows per own row, weighted by PEER_SM_WEIGHT for the
    row type (fp8: e4m3 rows with scales; else bf16). One SM, or one rank, cannot split: 0 means every SM does both."""
    if num_sms < 2 or num_ranks < 2:
        return 0
    weight = PEER_SM_WEIGHT["fp8" if fp8 else "bf16"] * (num_ranks - 1)
    peers = round(num_sms * weight / (weight + 1))
    return max(1, min(num_sms - 1, peers))



@dataclass(frozen=True)
class IntranodeTuning:
    """How the intranode kernels deal their work (results are identical for every setting; the GPU suite checks it).

    dynamic_tokens: dispatch_send's and combine_reduce's warps take tokens from a ticket counter (else a static deal).
    fuse_kernels: a cached dispatch runs without notify (dispatch_send is the barrier), a zero-copy cached dispatch
        without dispatch_recv (the send's last block waits for the rows), and a zero-copy combine without weights
        without combine_stage (combine_reduce signals its rows).
    reduce_parts: combine_reduce splits its last tokens into this many channel ranges each (1..8).
    reduce_tail_warps: how many tokens are split, in units of the kernel's warp count (None: every token).
    Change it with Buffer.set_tuning("intranode", **changes).
    """
    dynamic_tokens: bool = True
    fuse_kernels: bool = True
    reduce_parts: int = 4
    reduce_tail_warps: float | None = 1.0

    def __post_init__(self):
        for name in ("dynamic_tokens", "fuse_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"IntranodeTuning.{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.reduce_parts, int) or not 1 <= self.reduce_parts <= 8:
            raise ConfigError(f"IntranodeTuning.reduce_parts: expected an int in 1..8, got {self.reduce_parts!r}")
        tail = self.reduce_tail_warps
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, (int, float)) or tail < 0):
            raise ConfigError(f"IntranodeTuning.reduce_tail_warps: expected None or a number >= 0, got {tail!r}")

    def tail_tokens(self, num_tokens: int, num_warps: int) -> int:
        """How many of combine_reduce's last tokens are split into reduce_parts pieces."""
        if self.reduce_tail_warps is None:
            return num_tokens
        return min(num_tokens, int(round(self.reduce_tail_warps * num_warps)))


def default_tuning(num_ranks: int) -> IntranodeTuning:
    """The intranode family's heuristics: whole tokens from tickets, quarter tokens for the last (warp count) tokens
    of the combine, fused kernels (bench/NOTES.md has the sweeps behind each default)."""
    return IntranodeTuning()


@dataclass(frozen=True)
class IntranodeHandleState:
    """What an intranode dispatch leaves in its DispatchHandle for the combine and cached dispatches.

    count_matrix: [R, R] int32 device counts of the dispatch's epoch ([s, d] = rows source s sent to d).
    info: [1 + E_local] int32 device array: N, then the aligned per-expert receive counts.
    layout: the RecvLayout of the dispatch.
    """
    count_matrix: Any
    info: Any
    layout: RecvLayout


# -- kernel specs (the ABI: params are the stub's parameter list and the launch conversion) -----------------
@functools.lru_cache(maxsize=None)
def notify_spec(num_ranks: int) -> KernelSpec:
    return KernelSpec(
        family="intranode", op="notify", template_args=(("kNumRanks", num_ranks), ("kNumThreads", NOTIFY_THREADS)),
        params=(("const bool*", "is_token_in_rank"), ("int", "num_tokens"), ("const int*", "num_tokens_per_expert"),
                ("int", "num_experts"), ("int", "expert_alignment"), ("int*", "send_pos"), ("int*", "count_matrix"),
                ("int*", "prefix_matrix"), ("int*", "info_out"), ("int*", "host_info"), ("int", "capacity_rows"),
                ("const uint64_t*", "peer_bases"), ("uint64_t*", "epoch_counter"), ("int", "do_count"),
                ("int", "host_seq")) + COMM_PARAMS,
        num_threads=NOTIFY_THREADS)


@functools.lru_cache(maxsize=None)
def dispatch_send_spec(num_ranks: int, num_threads: int = NUM_THREADS, defines: tuple = ()) -> KernelSpec:
    return KernelSpec(
        family="intranode", op="dispatch_send", template_args=(("kNumRanks", num_ranks), ("kNumThreads", num_threads)),
        params=(("const int4*", "x"), ("int", "row_int4"), ("const float*", "scales"), ("long long", "scale_stride_t"),
                ("long long", "scale_stride_s"), ("int", "num_scales"), ("const int64_t*", "topk_idx"),
                ("const float*", "topk_weights"), ("int", "num_topk"), ("int", "num_experts"),
                ("const int*", "send_pos"), ("const int*", "count_matrix"),
                ("int", "num_tokens"), ("const uint64_t*", "peer_bases"), ("long long", "data_offset"),
                ("long long", "off_x"), ("long long", "off_scales"), ("long long", "off_idx"), ("long long", "off_w"),
                ("long long", "off_src"), ("int4*", "out_x"), ("float*", "out_scales"), ("int64_t*", "out_idx"),
                ("float*", "out_w"), ("int*", "out_src"), ("int", "num_out_rows"), ("int", "peer_blocks"),
                ("int", "dynamic"), ("int", "fused_barrier"), ("int", "fused_recv"),
                ("int*", "counters"), ("uint64_t*", "epoch_counter")) + COMM_PARAMS,
        num_threads=num_threads, defines=for_kernel(defines, "intranode", "dispatch_send"))


@functools.lru_cache(maxsize=None)
def dispatch_recv_spec(num_ranks: int, num_threads: int = NUM_THREADS, defines: tuple = ()) -> KernelSpec:
    return KernelSpec(
        family="intranode", op="dispatch_recv", template_args=(("kNumRanks", num_ranks), ("kNumThreads", num_threads)),
        params=(("const uint8_t*", "local_base"), ("long long", "data_offset"), ("long long", "off_x"),
                ("long long", "off_scales"), ("long long", "off_idx"), ("long long", "off_w"), ("long long", "off_src"),
                ("int", "row_int4"), ("int", "num_scales"), ("int", "num_topk"), ("const int*", "info"),
                ("const int*", "count_matrix"), ("int", "num_out_rows"), ("int4*", "out_x"), ("float*", "out_scales"),
                ("int64_t*", "out_idx"), ("float*", "out_w"), ("int*", "out_src"), ("int", "zero_copy"),
                ("const uint64_t*", "epoch_counter")) + COMM_PARAMS,
        num_threads=num_threads, defines=for_kernel(defines, "intranode", "dispatch_recv"))


@functools.lru_cache(maxsize=None)
def combine_stage_spec(num_ranks: int, num_threads: int = NUM_THREADS, defines: tuple = ()) -> KernelSpec:
    return KernelSpec(
        family="intranode", op="combine_stage", template_args=(("kNumRanks", num_ranks), ("kNumThreads", num_threads)),
        params=(("const int4*", "x"), ("int", "row_int4"), ("const float*", "topk_weights"), ("int", "num_topk"),
                ("const int*", "count_matrix"), ("int", "num_rows"), ("const uint64_t*", "peer_bases"),
                ("long long", "data_offset"), ("long long", "off_cx"), ("long long", "off_cw"), ("int", "zero_copy"),
                ("int*", "counters"), ("uint64_t*", "epoch_counter")) + COMM_PARAMS,
        num_threads=num_threads, defines=for_kernel(defines, "intranode", "combine_stage"))


@functools.lru_cache(maxsize=None)
def combine_reduce_spec(num_ranks: int, num_threads: int = NUM_THREADS, defines: tuple = ()) -> KernelSpec:
    return KernelSpec(
        family="intranode", op="combine_reduce", template_args=(("kNumRanks", num_ranks), ("kNumThreads", num_threads)),
        params=(("const uint64_t*", "peer_bases"), ("long long", "data_offset"), ("long long", "off_cx"),
                ("long long", "off_cw"), ("int", "row_int4"), ("int", "num_topk"), ("const int*", "send_pos"),
                ("const int*", "count_matrix"), ("int", "num_tokens"),
                ("const int4*", "bias0"), ("const int4*", "bias1"), ("const int4*", "x_local"),
                ("const float*", "w_local"), ("int4*", "out"), ("float*", "out_w"), ("int", "num_parts"),
                ("int", "tail_tokens"), ("int", "dynamic"), ("int", "fused_stage"), ("int*", "counters"),
                ("uint64_t*", "epoch_counter")) + COMM_PARAMS,
        num_threads=num_threads, defines=for_kernel(defines, "intranode", "combine_reduce"))


def example_specs() -> list[KernelSpec]:
    specs = []
    for r in (2, 4, 8):
        specs += [notify_spec(r), dispatch_send_spec(r), dispatch_recv_spec(r), combine_stage_spec(r),
                  combine_reduce_spec(r)]
    # Every diagnostics switch on (the device code they compile in must keep compiling).
    debug = (("EPCOMM_DEBUG_SEND_ROLES", 3), ("EPCOMM_DEBUG_TRACE", 1))
    specs += [dispatch_send_spec(2, defines=debug), dispatch_recv_spec(2, defines=debug),
              combine_stage_spec(2, defines=debug), combine_reduce_spec(2, defines=debug)]
    return specs


register_family("intranode", example_specs)
