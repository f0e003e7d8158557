"""Device memory the kernels share: raw cudaMalloc buffers mapped into peers through CUDA IPC, and small
host-mapped pinned records the host can read while kernels run. Offsets inside buffers belong to each
family's layout (intranode.meta_bytes / RecvLayout), never to call sites."""
from __future__ import annotations

import ctypes

import numpy as np

_CUDA_HOST_ALLOC_MAPPED = 2


class DeviceBuffer:
    """A raw cudaMalloc allocation (not from CuPy's pool, so its IPC handle covers exactly this memory)."""

    def __init__(self, nbytes: int):
        import cupy
        self.nbytes = int(nbytes)
        self.ptr = cupy.cuda.runtime.malloc(self.nbytes)
        cupy.cuda.runtime.memset(self.ptr, 0, self.nbytes)

    def view(self, offset: int, shape: tuple, dtype):
        """A CuPy array over bytes [offset, offset + size) of this buffer (no copy; invalid once freed)."""
        import cupy
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.nbytes:
            raise ValueError(f"view of {nbytes} bytes at {offset} is outside the buffer of {self.nbytes} bytes")
        mem = cupy.cuda.UnownedMemory(self.ptr + offset, max(nbytes, 1), self)
        return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))

    def free(self) -> None:
        if self.ptr:
            import cupy
            cupy.cuda.runtime.free(self.ptr)
            self.ptr = 0


class PeerBuffer:
    """One DeviceBuffer per rank, every P2P-reachable peer's copy mapped here through CUDA IPC.

    peer_ptrs[r]: rank r's buffer as seen by this process (None where not reachable).
    peer_bases: [R] uint64 device array of those pointers (0 where unreachable), what kernels index.
    """

    def __init__(self, group, nbytes: int):
        import cupy
        sizes = group.allgather(int(nbytes))
        if len(set(sizes)) != 1:
            from .errors import ConfigError
            raise ConfigError(f"num_nvl_bytes: every rank must pass the same size, got {sizes}")
        self.group = group
        self.local = DeviceBuffer(nbytes)
        self.nbytes = self.local.nbytes
        self.peer_ptrs = group.exchange_ipc(self.local.ptr)
        self.peer_bases = cupy.asarray(np.array([p or 0 for p in self.peer_ptrs], dtype=np.uint64))
        group.barrier()

    def close(self) -> None:
        if self.local.ptr:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
            self.group.barrier()  # nobody still writes into a peer's buffer
            self.group.close_ipc([p for r, p in enumerate(self.peer_ptrs) if r != self.group.rank and p])
            self.local.free()


def mapped_device_pointer(host_ptr: int) -> int:
    """Device address of pinned host memory allocated with cudaHostAllocMapped. Under unified virtual addressing
    (every 64-bit Linux CUDA device) it is the host address itself; CuPy exposes no cudaHostGetDevicePointer."""
    import cupy
    if not cupy.cuda.Device().attributes.get("UnifiedAddressing", 1):
        from .errors import BootstrapError
        raise BootstrapError("this device lacks unified addressing; epcomm needs it for host-mapped records")
    return int(host_ptr)


class HostMapped:
    """Pinned host memory mapped into the device: kernels write it, the host polls it without a sync."""

    def __init__(self, count: int, dtype=np.int32):
        import cupy
        self.dtype = np.dtype(dtype)
        self.nbytes = int(count) * self.dtype.itemsize
        self.host_ptr = cupy.cuda.runtime.hostAlloc(self.nbytes, _CUDA_HOST_ALLOC_MAPPED)
        raw = (ctypes.c_byte * self.nbytes).from_address(self.host_ptr)
        self.host = np.frombuffer(raw, dtype=self.dtype, count=count)
        self.host[...] = 0
        self.device_ptr = mapped_device_pointer(self.host_ptr)

    def free(self) -> None:
        if self.host_ptr:
            import cupy
            self.host = None
            cupy.cuda.runtime.freeHost(self.host_ptr)
            self.host_ptr = 0
