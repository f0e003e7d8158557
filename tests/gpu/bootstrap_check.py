"""GPU bootstrap check (mpirun -n N, N ranks on the visible GPUs): group and topology, CUDA IPC peer mapping
with a runtime-compiled kernel writing into every peer's buffer, NVSHMEM start, and an NVSHMEM device put ring."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import Cases, exit_with  # noqa: E402

from epcomm import Group  # noqa: E402
from epcomm import probe  # noqa: E402
from epcomm.memory import PeerBuffer  # noqa: E402
from epcomm.runtime import ErrorRecord  # noqa: E402

group = Group()
cases = Cases(group.comm)
r, n = group.rank, group.size


def topology():
    t = group.topology
    assert t.num_ranks == n and group.device == group.local_rank % cp.cuda.runtime.getDeviceCount()
    assert t.all_p2p(), f"expected every rank P2P-reachable on one host, got {t.p2p}"
    if r == 0:
        print(f"topology: devices {t.device_of_rank}, nodes {t.node_of_rank}")


def ipc_write_peer():
    n_ints = 1 << 16
    buf = PeerBuffer(group, n_ints * 4 * n)  # one slot per writer
    mine = cp.ndarray((n, n_ints), cp.int32, cp.cuda.MemoryPointer(cp.cuda.UnownedMemory(buf.local.ptr, buf.nbytes, None), 0))
    mine.fill(-1)
    cp.cuda.Device().synchronize()
    group.barrier()
    for p in range(n):  # write my rank into slot r of every peer's buffer
        probe.write_peer(buf.peer_ptrs[p] + r * n_ints * 4, 1000 + r, n_ints)
    cp.cuda.Device().synchronize()
    group.barrier()
    got = mine.get()
    for s in range(n):
        assert (got[s] == 1000 + s).all(), f"slot of rank {s} holds {np.unique(got[s])[:4]}"
    buf.close()


def nvshmem_ring():
    group.init_nvshmem()
    import nvshmem.core as nvshmem
    n_ints = 4096
    dst = nvshmem.array((n_ints,), dtype="int32")
    sig = nvshmem.array((1,), dtype="uint64")
    dst[:] = -1
    sig[:] = 0
    src = cp.full(n_ints, 7000 + r, dtype=cp.int32)
    err = ErrorRecord(r)
    cp.cuda.Device().synchronize()
    group.barrier()
    probe.nvshmem_put_ring(dst, src, n_ints, sig, err)
    cp.cuda.Device().synchronize()
    err.check("nvshmem put ring")
    want = 7000 + (r - 1) % n
    assert bool((dst == want).all()), f"expected {want}, got {cp.unique(dst)[:4]}"
    group.barrier()
    nvshmem.free_array(dst)
    nvshmem.free_array(sig)
    err.close()


cases.run("topology", topology)
cases.run("ipc_write_peer", ipc_write_peer)
cases.run("nvshmem_put_ring", nvshmem_ring)
code = cases.finish()
group.close()
exit_with(code)
