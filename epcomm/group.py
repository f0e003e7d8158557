"""Process group: an mpi4py communicator -> ranks, hosts, (virtual) nodes, device choice, NVSHMEM start, CUDA IPC.

Everything that needs the communicator is here; kernels never talk to MPI. Teardown is idempotent.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from .env import env
from .errors import BootstrapError, CommTimeoutError, ConfigError

#: MPI tag of exchange() messages (sent on the Group's own duplicate of the communicator).
_EXCHANGE_TAG = 0x3E7C


@dataclass(frozen=True)
class Topology:
    """Who shares a node and who can reach whom.

    node_of_rank[r]: the (virtual) node of rank r; nodes are numbered 0..num_nodes-1 in rank order.
    device_of_rank[r]: CUDA device index rank r uses on its host (-1 without a GPU).
    host_of_rank[r]: index of r's physical host.
    p2p[i][j]: ranks i and j can load/store each other's memory (same node and NVLink/P2P or the same GPU).
    """
    node_of_rank: tuple[int, ...]
    device_of_rank: tuple[int, ...]
    host_of_rank: tuple[int, ...]
    p2p: tuple[tuple[bool, ...], ...]

    @property
    def num_ranks(self) -> int:
        return len(self.node_of_rank)

    @property
    def num_nodes(self) -> int:
        return max(self.node_of_rank) + 1

    def ranks_on_node(self, node: int) -> list[int]:
        return [r for r, n in enumerate(self.node_of_rank) if n == node]

    def all_p2p(self) -> bool:
        return all(all(row) for row in self.p2p)


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a base dependency
        raise BootstrapError(f"mpi4py is needed to form a group: {exc}") from None
    return MPI


def gpu_count() -> int:
    """CUDA devices visible to this process (0 where CuPy or a driver is missing)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


class Group:
    """The ranks of one expert-parallel group.

    comm: an mpi4py communicator (default COMM_WORLD).
    device: CUDA device index for this rank (default: local_rank % visible GPUs); None on the CPU backend.
    virtual_node_size: group consecutive ranks of one host into virtual nodes of this size, so that internode
        code paths run on one host (default EPCOMM_VIRTUAL_NODE_SIZE; 0 = one node per host).
    """

    def __init__(self, comm=None, *, device: int | None = None, use_gpu: bool | None = None,
                 virtual_node_size: int | None = None):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self._local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        self._closed = False
        self._xcomm = self.comm.Dup()     # exchange()'s own context: no mix-up with other Groups or collectives
        self._exchange_seq = 0            # exchange() calls so far (the same on every rank while in step)
        self._broken: str | None = None   # why exchange() can no longer be used (after a timeout or desync)
        self._nvshmem_started = False
        self._ipc_opened: list[int] = []

        ndev = gpu_count() if use_gpu is not False else 0
        if use_gpu and ndev == 0:
            raise BootstrapError(f"rank {self.rank}: a GPU group was asked for but no CUDA device is visible")
        self.device = None
        if ndev > 0:
            self.device = self.local_rank % ndev if device is None else int(device)
            if not 0 <= self.device < ndev:
                raise ConfigError(f"device: expected 0..{ndev - 1}, got {device}")
            import cupy
            cupy.cuda.Device(self.device).use()
        self.topology = self._make_topology(virtual_node_size)

    # -- collectives on Python objects ------------------------------------------------------------------
    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def alltoall(self, objs: list) -> list:
        return self.comm.alltoall(objs)

    def bounded_barrier(self, phase: str, timeout_s: float | None = None) -> None:
        """A barrier that gives up after timeout_s (default EPCOMM_TIMEOUT_S) with CommTimeoutError naming the
        missing peer and the phase, instead of hanging when a rank never arrives."""
        self.exchange([None] * self.size, phase, timeout_s)

    def exchange(self, objs: list, phase: str, timeout_s: float | None = None) -> list:
        """Bounded alltoall of Python objects: objs[d] goes to rank d; returns what every rank sent here.

        Waits at most timeout_s (default EPCOMM_TIMEOUT_S) for the peers. A peer that never arrives, or one that
        is at another call (an earlier call failed on some ranks only), raises CommTimeoutError naming this rank,
        the peer and the phase; the group's exchange() is unusable from then on (make a new Buffer).
        """
        if len(objs) != self.size:
            raise ConfigError(f"objs: expected {self.size} items (one per rank), got {len(objs)}")
        if self._broken is not None:
            raise CommTimeoutError(f"rank {self.rank}: phase {phase}: this group is unusable after an earlier "
                                   f"failure ({self._broken}); make a new Buffer", rank=self.rank, phase=phase)
        timeout = env("EPCOMM_TIMEOUT_S") if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout
        seq = self._exchange_seq
        self._exchange_seq += 1
        sends = {d: self._xcomm.isend((seq, phase, objs[d]), dest=d, tag=_EXCHANGE_TAG)
                 for d in range(self.size) if d != self.rank}
        out = [None] * self.size
        out[self.rank] = objs[self.rank]
        # Probe each pending source on its own: a faster peer's NEXT message may already be queued behind this one.
        pending = [d for d in range(self.size) if d != self.rank]
        polls = 0
        while pending:
            for src in list(pending):
                msg = self._xcomm.improbe(source=src, tag=_EXCHANGE_TAG)
                if msg is None:
                    continue
                their_seq, their_phase, obj = msg.recv()
                if their_seq != seq or their_phase != phase:
                    self._broken = f"rank {src} was at call {their_seq} ({their_phase}) during call {seq} ({phase})"
                    raise CommTimeoutError(f"rank {self.rank}: waited for rank {src} in phase {phase} (call {seq}) "
                                           f"but it sent phase {their_phase} (call {their_seq}): an earlier call "
                                           f"failed on some ranks only", self.rank, src, phase, their_seq, seq)
                out[src] = obj
                pending.remove(src)
            if pending:
                polls = self._poll_pause(polls, deadline, timeout, pending[0], phase, "receive")
        while sends:
            sends = {d: r for d, r in sends.items() if not r.Test()}
            if sends:
                polls = self._poll_pause(polls, deadline, timeout, next(iter(sends)), phase, "send")
        return out

    def _poll_pause(self, polls: int, deadline: float, timeout: float, peer: int, phase: str, what: str) -> int:
        """One step of a bounded host poll: spin briefly, then sleep; CommTimeoutError past the deadline."""
        if time.monotonic() > deadline:
            self._broken = f"rank {peer} did not arrive in phase {phase}"
            raise CommTimeoutError(f"rank {self.rank}: rank {peer} did not arrive in phase {phase} ({what}) within "
                                   f"{timeout} s (EPCOMM_TIMEOUT_S)", self.rank, peer, phase)
        if polls > 64:
            time.sleep(2e-4)
        return polls + 1

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    # -- topology ---------------------------------------------------------------------------------------
    def _make_topology(self, virtual_node_size: int | None) -> Topology:
        host = socket.gethostname()
        facts = self.allgather((host, self.device if self.device is not None else -1))
        hosts: list[str] = []
        for h, _ in facts:
            if h not in hosts:
                hosts.append(h)
        host_of_rank = tuple(hosts.index(h) for h, _ in facts)
        device_of_rank = tuple(d for _, d in facts)
        vsize = env("EPCOMM_VIRTUAL_NODE_SIZE") if virtual_node_size is None else int(virtual_node_size)
        if vsize:
            if vsize < 1 or self.size % vsize:
                raise ConfigError(f"virtual_node_size: expected a divisor of the group size {self.size}, got {vsize}")
            node_of_rank = tuple(r // vsize for r in range(self.size))
            for r in range(self.size):
                if host_of_rank[r] != host_of_rank[node_of_rank[r] * vsize]:
                    raise ConfigError(f"virtual_node_size={vsize}: rank {r} would share a virtual node with a rank "
                                      f"on another host")
        else:
            node_of_rank = host_of_rank
        reach = self._peer_access_row(host_of_rank, device_of_rank)
        rows = self.allgather(reach)
        p2p = tuple(tuple(bool(rows[i][j] and rows[j][i] and node_of_rank[i] == node_of_rank[j])
                          for j in range(self.size)) for i in range(self.size))
        return Topology(node_of_rank, device_of_rank, host_of_rank, p2p)

    def _peer_access_row(self, host_of_rank, device_of_rank) -> list[bool]:
        row = []
        for j in range(self.size):
            if host_of_rank[j] != host_of_rank[self.rank] or self.device is None or device_of_rank[j] < 0:
                row.append(False)
            elif device_of_rank[j] == self.device:
                row.append(True)
            else:
                import cupy
                row.append(bool(cupy.cuda.runtime.deviceCanAccessPeer(self.device, device_of_rank[j])))
        return row

    @property
    def num_nodes(self) -> int:
        return self.topology.num_nodes

    # -- CUDA IPC ---------------------------------------------------------------------------------------
    def exchange_ipc(self, ptr: int) -> list[int | None]:
        """All-gather the IPC handle of a cudaMalloc'ed pointer; returns every rank's pointer as seen here
        (own pointer for self, None for ranks not P2P-reachable). Opened handles close in close()."""
        import cupy
        handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
        handles = self.allgather(handle)
        out: list[int | None] = []
        for r, h in enumerate(handles):
            if r == self.rank:
                out.append(ptr)
            elif self.topology.p2p[self.rank][r]:
                try:
                    peer = cupy.cuda.runtime.ipcOpenMemHandle(h)
                except Exception as exc:
                    raise BootstrapError(f"rank {self.rank}: cannot open the CUDA IPC handle of rank {r}: {exc}") from None
                self._ipc_opened.append(peer)
                out.append(peer)
            else:
                out.append(None)
        return out

    def close_ipc(self, ptrs) -> None:
        import cupy
        for p in ptrs:
            if p in self._ipc_opened:
                self._ipc_opened.remove(p)
                cupy.cuda.runtime.ipcCloseMemHandle(p)

    # -- NVSHMEM ----------------------------------------------------------------------------------------
    def init_nvshmem(self) -> None:
        """Start NVSHMEM over this communicator (UID broadcast through mpi4py; works with any MPI)."""
        if self._nvshmem_started:
            return
        if self.device is None:
            raise BootstrapError("NVSHMEM needs a GPU; this group has none")
        os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
        try:
            import nvshmem.core as nvshmem
            from cuda.core import Device
        except ImportError as exc:
            raise BootstrapError(f"NVSHMEM needs nvshmem4py and cuda.core (install epcomm[cuda13]): {exc}") from None
        dev = Device(self.device)
        dev.set_current()
        try:
            nvshmem.init(device=dev, mpi_comm=self.comm, initializer_method="emulated_mpi")
        except Exception as exc:
            raise BootstrapError(f"rank {self.rank}: NVSHMEM init failed: {exc}") from None
        if nvshmem.my_pe() != self.rank or nvshmem.n_pes() != self.size:
            raise BootstrapError(f"NVSHMEM PE {nvshmem.my_pe()}/{nvshmem.n_pes()} does not match MPI rank "
                                 f"{self.rank}/{self.size}")
        self._nvshmem_started = True

    @property
    def nvshmem_started(self) -> bool:
        return self._nvshmem_started

    # -- teardown ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close opened IPC handles and finalise NVSHMEM. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._ipc_opened:
            self.close_ipc(list(self._ipc_opened))
        if self._nvshmem_started:
            import nvshmem.core as nvshmem
            nvshmem.finalize()
            self._nvshmem_started = False
        try:
            self._local.Free()
        except Exception:
            pass
        try:
            # Receive what peers sent to a call this rank never made (after a failure); MPICH's finalize
            # aborts on unreceived large messages.
            from mpi4py import MPI
            while (msg := self._xcomm.improbe(source=MPI.ANY_SOURCE, tag=_EXCHANGE_TAG)) is not None:
                msg.recv()
            self._xcomm.Free()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"Group(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"nodes={self.num_nodes}, device={self.device})")
