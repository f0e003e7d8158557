"""Bootstrap probe kernels, Python side: their specs (registered for CI) and launchers that prove CUDA IPC peer
mappings (write_peer) and NVSHMEM device calls (nvshmem_put_ring) work. Device code: cuda_src/epcomm/probe.cuh."""
from __future__ import annotations

from .errors import ConfigError
from .runtime import ErrorRecord, KernelSpec, get_kernel, register_family

WRITE_PEER_THREADS = 256
WRITE_PEER_MAX_BLOCKS = 1024
PUT_RING_THREADS = 32


def write_peer_spec() -> KernelSpec:
    """epcomm_probe_write_peer(int* dst, int value, long long n): dst[0:n] = value."""
    return KernelSpec(family="probe", op="write_peer", template_args=(("kNumThreads", WRITE_PEER_THREADS),),
                      params=(("int*", "dst"), ("int", "value"), ("long long", "n")),
                      num_threads=WRITE_PEER_THREADS)


def nvshmem_put_ring_spec() -> KernelSpec:
    """epcomm_probe_nvshmem_put_ring(dst, src, n, sig, round, err_record, timeout_ns, rank): one block."""
    return KernelSpec(family="probe", op="nvshmem_put_ring", template_args=(("kNumThreads", PUT_RING_THREADS),),
                      params=(("int*", "dst"), ("const int*", "src"), ("long long", "n"), ("uint64_t*", "sig"),
                              ("uint64_t", "round"), ("uint64_t", "err_record"), ("long long", "timeout_ns"),
                              ("int", "rank")),
                      num_threads=PUT_RING_THREADS, uses_nvshmem=True)


def timestamp_spec() -> KernelSpec:
    """epcomm_probe_timestamp(unsigned long long* out, int slot): out[slot] = %globaltimer (ns)."""
    return KernelSpec(family="probe", op="timestamp", template_args=(("kNumThreads", 32),),
                      params=(("unsigned long long*", "out"), ("int", "slot")), num_threads=32)


def timestamp(out, slot: int, stream=None) -> None:
    """Write the GPU's nanosecond timer into out[slot] (out: uint64 device array) when the stream reaches this point."""
    get_kernel(timestamp_spec()).launch(1, dict(out=out, slot=slot), stream=stream)


BULK_STAGES, BULK_CHUNK = 8, 16384


def bulk_copy_spec() -> KernelSpec:
    """epcomm_probe_bulk_copy(src, dst, n_bytes): TMA copy, 8 stages of 16 KiB per block (sm_90)."""
    return KernelSpec(family="probe", op="bulk_copy", template_args=(("kStages", BULK_STAGES),
                                                                   ("kChunkBytes", BULK_CHUNK)),
                      params=(("const uint8_t*", "src"), ("uint8_t*", "dst"), ("long long", "n_bytes")),
                      num_threads=32, smem_bytes=BULK_STAGES * BULK_CHUNK)


def bulk_copy(src, dst, n_bytes: int, blocks: int, stream=None) -> None:
    """Copy n_bytes (a multiple of 16 KiB) from src to dst (device arrays or addresses; dst may be a peer's buffer)
    with Hopper bulk copies from `blocks` blocks, one thread each, 128 KiB in flight per block. Diagnostics."""
    if n_bytes % BULK_CHUNK:
        raise ConfigError(f"n_bytes: expected a multiple of {BULK_CHUNK}, got {n_bytes}")
    get_kernel(bulk_copy_spec()).launch(blocks, dict(src=src, dst=dst, n_bytes=n_bytes), stream=stream)


def example_specs() -> list[KernelSpec]:
    return [write_peer_spec(), nvshmem_put_ring_spec(), timestamp_spec(), bulk_copy_spec()]


register_family("probe", example_specs)


def _count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"{name}: expected a non-negative int, got {n!r}")
    return n


def write_peer(ptr, value: int, n: int, stream=None) -> None:
    """Fill n int32 at ptr (a CuPy array or a device address, e.g. a peer buffer opened through CUDA IPC) with value.

    Asynchronous on stream (None: the current stream).
    """
    n = _count("n", n)
    if n == 0:
        return
    grid = min(-(-n // WRITE_PEER_THREADS), WRITE_PEER_MAX_BLOCKS)
    get_kernel(write_peer_spec()).launch(grid, dict(dst=ptr, value=value, n=n), stream=stream)


def nvshmem_put_ring(dst, src, n: int, sig, err: ErrorRecord, round: int = 1, stream=None) -> None:
    """Every PE puts src[0:n] (int32) into the next PE's symmetric dst with put-with-signal (sets the next PE's sig to
    round), then waits, bounded by EPCOMM_TIMEOUT_S, until its own sig >= round (phase 'probe').

    dst: [>= n] int32 symmetric (NVSHMEM) array; src: [>= n] int32 device array; sig: [1] uint64 symmetric array holding
    less than round beforehand (zero it, or pass increasing rounds). Collective: every PE must call it. Asynchronous;
    after synchronising the stream call err.check("probe nvshmem_put_ring").
    """
    n = _count("n", n)
    round = _count("round", round)
    if round == 0:
        raise ConfigError("round: expected a positive int, got 0")
    if not isinstance(err, ErrorRecord):
        raise ConfigError(f"err: expected an epcomm.runtime.ErrorRecord, got {type(err).__name__}")
    get_kernel(nvshmem_put_ring_spec()).launch(
        1, dict(dst=dst, src=src, n=n, sig=sig, round=round, **err.wait_args()), stream=stream)
