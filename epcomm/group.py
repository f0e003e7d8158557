"""Process group: an mpi4py communicator or a torch.distributed ProcessGroup -> ranks, hosts, (virtual) nodes,
device choice, NVSHMEM start, CUDA IPC.

Everything that needs the communicator is here; kernels never talk to MPI or torch. Two transports carry the Python
objects: _MpiTransport (point-to-point on a duplicate of the communicator) and _TorchTransport (keys in the group's
c10d store, so that gloo and NCCL groups work alike and nothing goes through NCCL). Teardown is idempotent.
"""
from __future__ import annotations

import itertools
import os
import pickle
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

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
        raise BootstrapError(f"mpi4py is needed to form a group over MPI: {exc}") from None
    return MPI


def gpu_count() -> int:
    """CUDA devices visible to this process (0 where CuPy or a driver is missing)."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


def is_torch_group(obj) -> bool:
    """True for a torch.distributed ProcessGroup (checked without importing torch)."""
    if "torch" not in type(obj).__module__.split(".")[0]:
        return False
    import torch.distributed as dist
    return isinstance(obj, dist.ProcessGroup)


def _launcher_world_size() -> int:
    """WORLD_SIZE as torchrun (or another torch launcher) sets it; 0 when unset or not a number."""
    try:
        return int(os.environ.get("WORLD_SIZE", "0"))
    except ValueError:
        return 0


class _MpiTransport:
    """Python objects over an mpi4py communicator: collectives on it, and exchange() point-to-point on a duplicate."""

    kind = "mpi"

    def __init__(self, comm):
        MPI = _mpi()
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if self.size == 1 and _launcher_world_size() > 1:
            raise ConfigError(
                f"group: this process was started by torchrun (WORLD_SIZE={_launcher_world_size()}) but MPI sees "
                "1 rank, so every process would be rank 0 of its own 1-rank world: pass the torch.distributed group, "
                "e.g. epcomm.Buffer(torch.distributed.group.WORLD) after torch.distributed.init_process_group(), "
                "or launch with mpiexec")
        self._local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()
        self._xcomm = self.comm.Dup()     # exchange()'s own context: no mix-up with other Groups or collectives

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def alltoall(self, objs: list) -> list:
        return self.comm.alltoall(objs)

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast(self, obj, root: int):
        return self.comm.bcast(obj, root=root)

    def post(self, seq, phase: str, objs: list, skip=()):
        """Start sending objs[d] to every other rank d not in skip; returns what finish_sends() completes."""
        return {d: self._xcomm.isend((seq, phase, objs[d]), dest=d, tag=_EXCHANGE_TAG)
                for d in range(self.size) if d != self.rank and d not in skip}

    def poll(self, src: int, seq: int):
        """(seq, phase, obj) of the next exchange message from src, or None while none has arrived."""
        msg = self._xcomm.improbe(source=src, tag=_EXCHANGE_TAG)
        return None if msg is None else msg.recv()

    def sends_pending(self, sends: dict) -> dict:
        return {d: r for d, r in sends.items() if not r.Test()}

    def close(self) -> None:
        try:
            self._local.Free()
        except Exception:
            pass
        try:
            # Receive what peers sent to a call this rank never made (after a failure); MPICH's finalize
            # aborts on unreceived large messages.
            MPI = _mpi()
            while (msg := self._xcomm.improbe(source=MPI.ANY_SOURCE, tag=_EXCHANGE_TAG)) is not None:
                msg.recv()
            self._xcomm.Free()
        except Exception:
            pass


class _TorchTransport:
    """Python objects over a torch.distributed ProcessGroup (gloo, NCCL or any other backend): every message is a key
    of the group's c10d store (the TCPStore torchrun and init_process_group set up), so nothing runs on the group's
    own backend (NCCL refuses several ranks on one GPU; a store also bounds every wait). Keys are
    `epcomm/<instance>/<call>/<src>><dst>`, deleted by their receiver, so the store does not grow."""

    kind = "torch"
    _instances: dict = {}      # group name -> Groups made over it in this process (the same count on every rank)

    def __init__(self, pg):
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d
        if not dist.is_initialized():
            raise BootstrapError("group: a torch.distributed ProcessGroup needs torch.distributed.init_process_group()")
        self.pg = pg
        self.rank = pg.rank()
        self.size = pg.size()
        try:
            self.store = c10d._get_process_group_store(pg)
        except Exception:
            self.store = c10d._get_default_store()
        name = str(getattr(pg, "group_name", "") or ",".join(map(str, dist.get_process_group_ranks(pg))))
        counter = self._instances.setdefault(name, itertools.count())
        self.prefix = f"epcomm/{name}/{next(counter)}"
        self._seq = itertools.count()   # allgather / bcast / barrier calls (exchange() numbers its own)
        hosts = self._collect([socket.gethostname()] * self.size, "group")
        me = hosts[self.rank]
        self.local_rank = sum(1 for r in range(self.rank) if hosts[r] == me)
        self.local_size = hosts.count(me)

    def _key(self, seq, src: int, dst: int) -> str:
        return f"{self.prefix}/{seq}/{src}>{dst}"

    def _collect(self, objs: list, phase: str) -> list:
        """An unbounded-in-spirit alltoall for bootstrap collectives, bounded by EPCOMM_TIMEOUT_S all the same."""
        seq = f"c{next(self._seq)}"
        self.post(seq, phase, objs)
        out = [None] * self.size
        out[self.rank] = objs[self.rank]
        keys = [self._key(seq, s, self.rank) for s in range(self.size) if s != self.rank]
        if keys:
            try:
                self.store.wait(keys, timedelta(seconds=float(env("EPCOMM_TIMEOUT_S"))))
            except Exception as exc:
                missing = [s for s in range(self.size) if s != self.rank and not self.store.check([self._key(seq, s, self.rank)])]
                raise CommTimeoutError(f"rank {self.rank}: rank(s) {missing} did not arrive in phase {phase} within "
                                       f"{env('EPCOMM_TIMEOUT_S')} s (EPCOMM_TIMEOUT_S): {exc}", self.rank,
                                       missing[0] if missing else -1, phase) from None
        for s in range(self.size):
            if s != self.rank:
                _, _, out[s] = self._take(self._key(seq, s, self.rank))
        return out

    def allgather(self, obj) -> list:
        return self._collect([obj] * self.size, "allgather")

    def alltoall(self, objs: list) -> list:
        return self._collect(list(objs), "alltoall")

    def barrier(self) -> None:
        self._collect([None] * self.size, "barrier")

    def bcast(self, obj, root: int):
        return self._collect([obj if self.rank == root else None] * self.size, "bcast")[root]

    def _take(self, key: str):
        value = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        return value

    def post(self, seq, phase: str, objs: list, skip=()):
        for d in range(self.size):
            if d != self.rank and d not in skip:
                self.store.set(self._key(seq, self.rank, d), pickle.dumps((seq, phase, objs[d]), protocol=5))
        return {}

    def poll(self, src: int, seq: int):
        key = self._key(seq, src, self.rank)
        if not self.store.check([key]):
            return None
        return self._take(key)

    def sends_pending(self, sends: dict) -> dict:
        return {}

    def close(self) -> None:
        pass


class Group:
    """The ranks of one expert-parallel group.

    comm: an mpi4py communicator (default COMM_WORLD) or a torch.distributed ProcessGroup (any backend: the objects
        travel through its c10d store, so a gloo group of CPU processes or an NCCL group works, under torchrun or any
        launcher that ran init_process_group).
    device: CUDA device index for this rank (default: torch.cuda.current_device() for a torch group in a process
        where torch sees CUDA, as DeepEP does; else local_rank % visible GPUs); None on the CPU backend.
    virtual_node_size: group consecutive ranks of one host into virtual nodes of this size, so that internode
        code paths run on one host (default EPCOMM_VIRTUAL_NODE_SIZE; 0 = one node per host).
    """

    def __init__(self, comm=None, *, device: int | None = None, use_gpu: bool | None = None,
                 virtual_node_size: int | None = None):
        self._transport = _TorchTransport(comm) if comm is not None and is_torch_group(comm) else _MpiTransport(comm)
        self.kind = self._transport.kind  # "mpi" or "torch"
        self.comm = self._transport.pg if self.kind == "torch" else self._transport.comm
        self.rank = self._transport.rank
        self.size = self._transport.size
        self.local_rank = self._transport.local_rank
        self.local_size = self._transport.local_size
        self._closed = False
        self._exchange_seq = 0            # exchange() calls so far in this epoch (the same on every rank in step)
        self._epoch = 0                   # reset() calls so far: messages of an older epoch are stale, dropped
        self._held: dict = {}             # src -> a message received for another call, read again by the next poll
        self._broken: str | None = None   # why exchange() can no longer be used (after a timeout or desync)
        self._nvshmem_started = False
        self._ipc_opened: list[int] = []

        ndev = gpu_count() if use_gpu is not False else 0
        if use_gpu and ndev == 0:
            raise BootstrapError(f"rank {self.rank}: a GPU group was asked for but no CUDA device is visible")
        self.device = None
        if ndev > 0:
            self.device = self._default_device(ndev) if device is None else int(device)
            if not 0 <= self.device < ndev:
                raise ConfigError(f"device: expected 0..{ndev - 1}, got {device}")
            import cupy
            cupy.cuda.Device(self.device).use()
        self.topology = self._make_topology(virtual_node_size)

    def _default_device(self, ndev: int) -> int:
        if self.kind == "torch":
            import torch
            if torch.cuda.is_available():
                return int(torch.cuda.current_device())
        return self.local_rank % ndev

    # -- collectives on Python objects ------------------------------------------------------------------
    def allgather(self, obj) -> list:
        return self._transport.allgather(obj)

    def alltoall(self, objs: list) -> list:
        return self._transport.alltoall(objs)

    def bounded_barrier(self, phase: str, timeout_s: float | None = None) -> None:
        """A barrier that gives up after timeout_s (default EPCOMM_TIMEOUT_S) with CommTimeoutError naming the
        missing peer and the phase, instead of hanging when a rank never arrives."""
        self.exchange([None] * self.size, phase, timeout_s)

    def exchange(self, objs: list, phase: str, timeout_s: float | None = None, same_phase: bool = True,
                 masked: list | None = None) -> list:
        """Bounded alltoall of Python objects: objs[d] goes to rank d; returns what every rank sent here.

        Waits at most timeout_s (default EPCOMM_TIMEOUT_S) for the peers. A peer that never arrives, or one that
        is at another call (an earlier call failed on some ranks only), raises CommTimeoutError naming this rank,
        the peer and the phase; the group's exchange() is then unusable until every live rank calls reset().
        same_phase=False: a peer at the same call number in another phase is not an error here (the CPU backend's
        call signatures compare the calls themselves and raise ConfigError, epcomm/agreement.py).
        masked: shrink mode's [size] list of 0/1, changed in place: a masked peer is neither sent to nor waited for
        (its slot in the result is None), and a peer that times out or is at another call is masked instead of
        raising (as DeepEP's low-latency kernels with a mask buffer).
        """
        if len(objs) != self.size:
            raise ConfigError(f"objs: expected {self.size} items (one per rank), got {len(objs)}")
        if self._broken is not None:
            raise CommTimeoutError(f"rank {self.rank}: phase {phase}: this group is unusable after an earlier "
                                   f"failure ({self._broken}); every live rank calls reset() (Buffer.reset), or "
                                   f"make a new Buffer", rank=self.rank, phase=phase)
        timeout = env("EPCOMM_TIMEOUT_S") if timeout_s is None else float(timeout_s)
        deadline = time.monotonic() + timeout
        seq = (self._epoch, self._exchange_seq)
        self._exchange_seq += 1
        skip = {d for d in range(self.size) if masked is not None and masked[d] and d != self.rank}
        sends = self._transport.post(seq, phase, objs, skip)
        out = [None] * self.size
        out[self.rank] = objs[self.rank]
        # Probe each pending source on its own: a faster peer's NEXT message may already be queued behind this one.
        pending = [d for d in range(self.size) if d != self.rank and d not in skip]
        polls = 0
        while pending:
            for src in list(pending):
                msg = self._held.pop(src, None) or self._transport.poll(src, seq)
                if msg is None:
                    continue
                their_seq, their_phase, obj = msg
                if their_seq[0] < seq[0]:
                    continue                           # sent before a reset(): stale, dropped
                if their_seq != seq or (same_phase and their_phase != phase):
                    # Kept for the call it belongs to (a peer already in a reset() this rank has not reached).
                    self._held[src] = msg
                    why = f"rank {src} was at call {their_seq} ({their_phase}) during call {seq} ({phase})"
                    pending.remove(src)
                    if masked is not None:
                        masked[src] = 1
                        continue
                    self._broken = why
                    raise CommTimeoutError(f"rank {self.rank}: waited for rank {src} in phase {phase} (call {seq}) "
                                           f"but it sent phase {their_phase} (call {their_seq}): an earlier call "
                                           f"failed on some ranks only", self.rank, src, phase, their_seq[1], seq[1])
                out[src] = obj
                pending.remove(src)
            if pending:
                if time.monotonic() > deadline and masked is not None:
                    for src in pending:                # shrink mode: a peer that timed out is masked
                        masked[src] = 1
                    pending = []
                    break
                polls = self._poll_pause(polls, deadline, timeout, pending[0], phase, "receive")
        while sends:
            sends = self._transport.sends_pending(sends)
            if sends:
                if time.monotonic() > deadline and masked is not None:
                    for d in sends:
                        masked[d] = 1
                    break
                polls = self._poll_pause(polls, deadline, timeout, next(iter(sends)), phase, "send")
        return out

    def reset(self, timeout_s: float | None = None, masked: list | None = None) -> None:
        """Make exchange() usable again after a failure: every live rank calls it (the same number of times).

        Starts a new epoch (exchange messages of older epochs, sent to calls that failed or were skipped, are
        dropped when they turn up), numbers calls from 0 again and ends with a bounded barrier of the new epoch,
        so that the next exchange() is the same call on every rank. CommTimeoutError if a rank does not arrive
        (masked peers, in shrink mode, are not waited for)."""
        self._epoch += 1
        self._exchange_seq = 0
        self._broken = None
        self.exchange([None] * self.size, "reset", timeout_s, masked=None if masked is None else list(masked))

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
        self._transport.barrier()

    def bcast(self, obj, root: int = 0):
        return self._transport.bcast(obj, root)

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
        """Start NVSHMEM over this group: a unique id made on rank 0 and broadcast to the others (through mpi4py
        for an MPI communicator, works with any MPI; through the c10d store for a torch group)."""
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
            if self.kind == "mpi":
                nvshmem.init(device=dev, mpi_comm=self.comm, initializer_method="emulated_mpi")
            else:
                import numpy as np
                uid = nvshmem.get_unique_id(empty=self.rank != 0)
                raw = self.bcast(uid._data.view(np.uint8).tobytes() if self.rank == 0 else None, root=0)
                uid._data.view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
                nvshmem.init(device=dev, uid=uid, rank=self.rank, nranks=self.size, initializer_method="uid")
        except Exception as exc:
            raise BootstrapError(f"rank {self.rank}: NVSHMEM init failed: {exc}") from None
        if nvshmem.my_pe() != self.rank or nvshmem.n_pes() != self.size:
            raise BootstrapError(f"NVSHMEM PE {nvshmem.my_pe()}/{nvshmem.n_pes()} does not match the group's rank "
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
        self._transport.close()

    def __repr__(self) -> str:
        return (f"Group({self.kind}, rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
                f"nodes={self.num_nodes}, device={self.device})")
