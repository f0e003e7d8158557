"""What a Buffer's num_nvl_bytes holds under the GPU backend's layout (epcomm.intranode's plans), so that the CPU
backend refuses exactly what the GPU would, and an error can name the size to ask for instead (growing the buffer
on demand is not built)."""
from __future__ import annotations

from . import intranode as intra
from .errors import ConfigError

_PAGE = 4096


def default_nvl_bytes(num_ranks: int) -> int:
    """What the GPU backend allocates for num_nvl_bytes=0: 4096 tokens per rank of hidden 7168 bf16, top-16."""
    return intra.nvl_buffer_size_hint(4096, 7168 * 2, num_ranks, 16)


def _data_bytes(num_nvl_bytes: int, num_ranks: int) -> int:
    return max(0, (num_nvl_bytes or default_nvl_bytes(num_ranks)) - intra.meta_bytes(num_ranks))


def dispatch_capacity(num_nvl_bytes: int, num_ranks: int, row_bytes: int, num_scales: int, num_topk: int,
                      zero_copy: bool = False) -> int:
    """Rows one dispatch may receive on a rank (intranode.RecvLayout; zero_copy: below zero_copy_split)."""
    return intra.recv_layout(_data_bytes(num_nvl_bytes, num_ranks), row_bytes, num_scales, num_topk,
                             zero_copy).capacity_rows


def combine_capacity(num_nvl_bytes: int, num_ranks: int, hidden: int, num_topk: int,
                     outputs_in_buffer: bool = False) -> int:
    """Rows one combine may stage on a rank (intranode.CombineLayout; above zero_copy_split while a zero-copy
    dispatch's outputs live in the buffer)."""
    return intra.combine_layout(_data_bytes(num_nvl_bytes, num_ranks), hidden, num_topk,
                                outputs_in_buffer).capacity_rows


def smallest_nvl_bytes(capacity, rows: int, num_ranks: int) -> int:
    """The smallest num_nvl_bytes (a multiple of 4096) with capacity(num_nvl_bytes) >= rows; capacity grows with it."""
    lo = hi = intra.meta_bytes(num_ranks) + _PAGE
    while capacity(hi) < rows:
        lo, hi = hi, hi * 2
    while hi - lo > _PAGE:
        mid = (lo + hi) // 2 // _PAGE * _PAGE
        lo, hi = (mid, hi) if capacity(mid) < rows else (lo, mid)
    return hi


def _have(num_nvl_bytes: int) -> str:
    return f"num_nvl_bytes={num_nvl_bytes}" + (" (0: the default size, 4096 tokens per rank of hidden 7168 bf16)"
                                               if num_nvl_bytes == 0 else "")


def check_dispatch(num_nvl_bytes: int, num_ranks: int, rows_per_rank, row_bytes: int, num_scales: int,
                   num_topk: int, zero_copy: bool = False, what: str = "dispatch") -> None:
    """ConfigError when some rank would receive more rows than the buffer holds (the same on every rank: it is
    given every rank's count), naming the num_nvl_bytes that fits them."""
    rows = max(int(n) for n in rows_per_rank)
    cap = dispatch_capacity(num_nvl_bytes, num_ranks, row_bytes, num_scales, num_topk, zero_copy)
    if rows <= cap:
        return
    rank = max(range(len(rows_per_rank)), key=lambda r: int(rows_per_rank[r]))
    need = smallest_nvl_bytes(lambda b: dispatch_capacity(b, num_ranks, row_bytes, num_scales, num_topk, zero_copy),
                              rows, num_ranks)
    raise ConfigError(f"{what}: rank {rank} receives {rows} rows of {row_bytes} bytes ({num_scales} scales, top-{num_topk}"
                      f"{', zero-copy' if zero_copy else ''}) but {_have(num_nvl_bytes)} holds {cap}; make the Buffer "
                      f"with num_nvl_bytes >= {need} (Config(num_max_tokens=...).get_nvl_buffer_size_hint(hidden_bytes, "
                      f"num_ranks{', zero_copy=True' if zero_copy else ''}) for your largest batch)")


def check_combine(num_nvl_bytes: int, num_ranks: int, rows: int, hidden: int, num_topk: int,
                  outputs_in_buffer: bool = False) -> None:
    """ConfigError when a combine's rows do not fit the staging area, naming the num_nvl_bytes that fits them."""
    cap = combine_capacity(num_nvl_bytes, num_ranks, hidden, num_topk, outputs_in_buffer)
    if rows <= cap:
        return
    need = smallest_nvl_bytes(lambda b: combine_capacity(b, num_ranks, hidden, num_topk, outputs_in_buffer), rows,
                              num_ranks)
    raise ConfigError(f"combine: {rows} rows of hidden {hidden} (top-{num_topk}"
                      f"{', beside zero-copy dispatch outputs' if outputs_in_buffer else ''}) need more staging rows "
                      f"than {_have(num_nvl_bytes)} holds ({cap}); make the Buffer with num_nvl_bytes >= {need}")


def check_low_latency(num_rdma_bytes: int, tmax: int, hidden: int, num_ranks: int, num_experts: int) -> None:
    """ConfigError when num_rdma_bytes (> 0) is smaller than these low-latency shapes need (0: sized on first use)."""
    if not num_rdma_bytes:
        return
    from .low_latency import rdma_size_hint
    need = rdma_size_hint(tmax, hidden, num_ranks, num_experts)
    if need > num_rdma_bytes:
        raise ConfigError(f"num_rdma_bytes: Tmax={tmax}, hidden={hidden}, num_experts={num_experts} on {num_ranks} "
                          f"ranks need {need} bytes (get_low_latency_rdma_size_hint); this Buffer has {num_rdma_bytes}")
