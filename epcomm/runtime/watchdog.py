"""Bounded waits, host side: the error record device waits write on expiry (mirror of cuda_src/epcomm/comm.cuh), the
phase names (mirror of cuda_src/epcomm/phases.cuh), the timeout setting and a bounded host poll.

Kernels that communicate take ``**error_record.wait_args()`` = (err_record address, timeout_ns, rank) as their last
three arguments; after synchronising, the caller runs ``error_record.check("dispatch")``, which raises CommTimeoutError
when a wait expired.
"""
from __future__ import annotations

import ctypes
import time
from typing import Callable

import numpy as np

from ..env import env
from ..errors import CommTimeoutError, ConfigError, EpcommError

# Mirror of epcomm::phase::k* (parity test: tests/test_runtime.py parses phases.cuh). 3, 5 and 6 are retired (no kernel
# waits in those phases any more); they keep their names so that an id is never reused.
PHASE_NAMES: dict[int, str] = {
    0: "unknown",
    1: "notify",
    2: "dispatch",
    3: "dispatch_send",
    4: "combine",
    5: "combine_send",
    6: "barrier",
    7: "ll_dispatch_recv",
    8: "ll_combine_recv",
    9: "probe",
    10: "ll_combine_send",
}
PHASE_IDS: dict[str, int] = {name: pid for pid, name in PHASE_NAMES.items()}

# Mirror of comm::kErr* and comm::kCmp*.
ERR_NONE, ERR_WRITING, ERR_TIMEOUT, ERR_CAPACITY = 0, 1, 2, 3
CMP_TEXT = {0: ">=", 1: "==", 2: "!="}

# Mirror of comm::ErrorRecord (parity test: tests/test_runtime.py compiles static_asserts generated from this dtype).
ERROR_RECORD_DTYPE = np.dtype({
    "names": ["code", "rank", "peer", "phase", "cmp", "block_idx", "observed", "expected", "waited_ns",
              "thread_idx", "reserved"],
    "formats": [np.int32, np.int32, np.int32, np.int32, np.int32, np.int32, np.int64, np.int64, np.int64,
                np.int32, np.int32],
    "offsets": [0, 4, 8, 12, 16, 20, 24, 32, 40, 48, 52],
    "itemsize": 56,
})


def timeout_seconds() -> float:
    """The bound of every device spin-wait and host poll, in seconds (EPCOMM_TIMEOUT_S)."""
    return float(env("EPCOMM_TIMEOUT_S"))  # config's parser rejects anything but a positive number


def timeout_ns() -> int:
    """EPCOMM_TIMEOUT_S in nanoseconds, as kernels take it (their `long long timeout_ns` parameter)."""
    return int(timeout_seconds() * 1e9)


def phase_name(phase_id: int) -> str:
    return PHASE_NAMES.get(int(phase_id), f"phase {int(phase_id)}")


def decode_error(record: np.ndarray, context: str = "") -> EpcommError | None:
    """The exception a filled error record stands for, or None when it holds no error.

    record: one element of ERROR_RECORD_DTYPE (a 0-d or 1-element array, or a np.void).
    kErrTimeout -> CommTimeoutError; kErrCapacity -> ConfigError (a receive buffer is too small); else EpcommError.
    """
    rec = np.asarray(record, dtype=ERROR_RECORD_DTYPE).reshape(-1)[0]
    code = int(rec["code"])
    if code == ERR_NONE:
        return None
    rank, peer, phase = int(rec["rank"]), int(rec["peer"]), phase_name(rec["phase"])
    observed, expected = int(rec["observed"]), int(rec["expected"])
    where = f" (block {int(rec['block_idx'])}, thread {int(rec['thread_idx'])})"
    suffix = f"; {context}" if context else ""
    if code == ERR_CAPACITY:
        return ConfigError(f"rank {rank}, phase '{phase}': rank {peer} needs {observed} rows but the buffer holds "
                           f"{expected}{where}{suffix}. Size the buffer for the worst case (see Buffer size hints); "
                           "the buffer is unusable until reset.")
    who = f"rank {rank} waited for rank {peer}" if peer >= 0 else f"rank {rank} waited"
    if code == ERR_TIMEOUT:
        cmp = CMP_TEXT.get(int(rec["cmp"]), "?")
        message = (f"{who} during phase '{phase}': observed {observed}, expected {cmp} {expected}, "
                   f"after {int(rec['waited_ns']) / 1e9:.1f} s{where}")
    elif code == ERR_WRITING:
        message = f"{who} during phase '{phase}' and timed out (error record still being written)"
    else:
        return EpcommError(f"rank {rank}, phase '{phase}': device error code {code} (peer {peer}, observed "
                           f"{observed}, expected {expected}){where}{suffix}")
    message += suffix + (". The peer may have failed, be stuck in another operation, or be slow (then raise "
                         "EPCOMM_TIMEOUT_S); the buffer is unusable until reset.")
    return CommTimeoutError(message, rank=rank, peer=peer, phase=phase, observed=observed, expected=expected)


class ErrorRecord:
    """One comm::ErrorRecord in host-mapped pinned memory: the device writes it when a bounded wait expires and the
    host reads it without synchronising (it is readable even while a kernel hangs). Beside it, in device memory, the
    comm::ErrorSlot kernels take: the record's device address and `seen`, the flag kernels poll instead of the record
    (reading host memory from every block of a grid costs microseconds per kernel).

    rank: this rank, passed to kernels for the report. device_ptr: the address kernels take as err_record (the slot).
    Needs a CUDA device (CuPy), current when it is made; allocate one per process (or per buffer) and reuse it.
    """

    def __init__(self, rank: int = 0):
        import cupy

        runtime = cupy.cuda.runtime
        self.rank = int(rank)
        self._size = ERROR_RECORD_DTYPE.itemsize
        self._host_ptr = runtime.hostAlloc(self._size, runtime.hostAllocMapped | runtime.hostAllocPortable)
        self._free_host = runtime.freeHost
        from ..memory import mapped_device_pointer
        self.record_device_ptr = mapped_device_pointer(self._host_ptr)
        buffer = (ctypes.c_byte * self._size).from_address(self._host_ptr)
        self._view = np.ndarray((1,), dtype=ERROR_RECORD_DTYPE, buffer=buffer)
        self._slot = cupy.zeros(2, dtype=cupy.uint64)  # comm::ErrorSlot: {record, seen | reserved << 32}
        self.device_ptr = int(self._slot.data.ptr)
        self.reset()

    def wait_args(self) -> dict[str, int]:
        """{err_record, timeout_ns, rank}: the three trailing arguments of every communicating kernel, by name
        (``kernel.launch(grid, dict(x=..., **err.wait_args()))``)."""
        return {"err_record": self.device_ptr, "timeout_ns": timeout_ns(), "rank": self.rank}

    def read(self) -> np.void:
        """A copy of the record as it is now."""
        return self._view.copy()[0]

    def has_error(self) -> bool:
        return int(self._view["code"][0]) != ERR_NONE

    def check(self, context: str = "") -> None:
        """Raise what the record holds (CommTimeoutError when a device wait expired, ConfigError when a receive buffer
        was too small); context names the operation ("intranode dispatch")."""
        error = decode_error(self._view.copy(), context)
        if error is not None:
            raise error

    def reset(self) -> None:
        """Clear the record and the slot's flag (only while no kernel that may write them is running)."""
        self._view[...] = np.zeros((1,), dtype=ERROR_RECORD_DTYPE)
        self._slot.set(np.array([self.record_device_ptr, 0], dtype=np.uint64))  # a synchronous copy from the host

    def close(self) -> None:
        if self._host_ptr:
            self._view = None
            self._free_host(self._host_ptr)
            self._host_ptr = 0
            self.device_ptr = self.record_device_ptr = 0
            self._slot = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


#: Seconds host_wait spins without sleeping before it backs off (sleeps of up to 1 ms).
_SPIN_S = 0.005


def host_wait(predicate: Callable[[], bool], what: str, timeout_s: float | None = None, *, rank: int = -1,
              peer: int = -1, phase: str = "host") -> None:
    """Poll predicate() until it is true, at most timeout_s seconds (default EPCOMM_TIMEOUT_S), else raise
    CommTimeoutError naming what, rank, peer and phase."""
    limit = timeout_seconds() if timeout_s is None else float(timeout_s)
    start = time.monotonic()
    sleep = 0.0
    while not predicate():
        waited = time.monotonic() - start
        if waited > limit:
            who = f"rank {rank} waited for rank {peer}" if peer >= 0 else f"rank {rank} waited"
            raise CommTimeoutError(f"{who} during phase '{phase}' for {what}, after {waited:.1f} s "
                                   f"(bound {limit:g} s, EPCOMM_TIMEOUT_S)",
                                   rank=rank, peer=peer, phase=phase)
        if waited < _SPIN_S:  # the common case is a GPU flag microseconds away: spin, do not sleep
            continue
        time.sleep(sleep)
        sleep = min(1e-3, sleep * 2 + 1e-5)
