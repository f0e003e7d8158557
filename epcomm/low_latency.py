"""Low-latency (decoding) mode: buffer sizing shared by every backend; GPU kernels plan here too."""
from __future__ import annotations

from .validate import check_int

#: Bytes of the per-message header in front of each low-latency row (source token index, padding).
LL_MSG_HEADER_BYTES = 16


def ll_message_bytes(hidden: int) -> int:
    """Bytes of the largest low-latency dispatch message: a bf16 row plus its header (FP8 rows are smaller)."""
    return LL_MSG_HEADER_BYTES + hidden * 2


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int) -> int:
    """Bytes of NVSHMEM memory for low-latency mode: two alternating buffers, each holding the worst-case
    dispatch receive area [E_local, R*Tmax] messages, the combine receive area [E, Tmax] bf16 rows, and the
    per-(expert, source) signals. Rounded up to 128 bytes."""
    tmax = check_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank", 1)
    h = check_int(hidden, "hidden", 8)
    r = check_int(num_ranks, "num_ranks", 1)
    e = check_int(num_experts, "num_experts", r)
    e_local = e // r
    dispatch_recv = e_local * r * tmax * ll_message_bytes(h)
    combine_recv = e * tmax * h * 2
    signals = 2 * e * 8
    per_buffer = dispatch_recv + combine_recv + signals
    return 2 * ((per_buffer + 127) // 128 * 128)
