"""GpuContext: what every GPU kernel family shares: the Buffer's comm stream, the error record of bounded waits and
the poisoning it causes, how a call joins the caller's stream (begin / finish), small device arrays, stream marks.

Stream rule (interop's ordering promise): every call makes the comm stream wait for the caller's stream (or
previous_event), issues its kernels there, records an event, and unless async_finish makes the caller's stream wait
for it.
"""
from __future__ import annotations

from ..env import env
from ..errors import CommTimeoutError, ConfigError, EpcommError
from ..handles import Event
from ..memory import HostMapped
from ..runtime.watchdog import ErrorRecord


class GpuContext:
    """Shared by the family launchers of one Buffer on one GPU.

    group: the Buffer's Group (rank, size, device, topology). stream: the comm stream (CuPy, non-blocking).
    err: the ErrorRecord that device waits write on expiry. bad_index: host-mapped int32 the layout and low-latency
    kernels count out-of-range expert indices into. num_sms: the device's SM count. timeout_s: EPCOMM_TIMEOUT_S.
    """

    def __init__(self, group):
        import cupy
        self.cp = cupy
        self.group = group
        self.rank, self.num_ranks = group.rank, group.size
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.err = ErrorRecord(self.rank)
        self.bad_index = HostMapped(1)
        self.timeout_s = float(env("EPCOMM_TIMEOUT_S"))
        self.num_sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.poisoned: str | None = None
        self._stream_marks: list[str] | None = None
        self._stamps = None

    # -- kernel arguments ----------------------------------------------------------------------------------
    def comm_args(self) -> dict:
        """The last three arguments of every communicating kernel (cuda_src/epcomm/comm.cuh)."""
        return self.err.wait_args()

    def grid(self, num_sms: int) -> int:
        """Blocks of a kernel that may occupy num_sms SMs (one block per SM, at most the device's)."""
        return max(1, min(int(num_sms), self.num_sms))

    def zeros(self, n: int, dtype):
        """A zero-filled device array, filled on the comm stream (so kernels issued there are ordered after it)."""
        with self.stream:
            return self.cp.zeros(n, dtype=dtype)

    # -- errors --------------------------------------------------------------------------------------------
    def check(self, what: str) -> None:
        """Raise what the device reported: CommTimeoutError (and the Buffer is poisoned from then on), or a
        ConfigError for expert indices out of range."""
        if self.poisoned:
            raise EpcommError(f"this Buffer is unusable after an earlier failure ({self.poisoned}); destroy it")
        try:
            self.err.check(what)
        except CommTimeoutError as exc:
            self.poisoned = str(exc)
            raise
        if self.bad_index.host[0]:
            n = int(self.bad_index.host[0])
            self.bad_index.host[0] = 0
            raise ConfigError(f"topk_idx: expected expert indices in [-1, num_experts), the layout kernel found {n} "
                              "out of range (they were ignored)")

    # -- how a call joins the caller's stream --------------------------------------------------------------
    def begin(self, call) -> None:
        """Start of a call's device work: the comm stream waits for previous_event, else the caller's stream."""
        self.check("before the call")
        if call.previous_event is not None and call.previous_event.cuda_event is not None:
            self.stream.wait_event(call.previous_event.cuda_event)
        else:
            self.stream.wait_event(call.stream.record())

    def finish(self, call, keepalive=()) -> Event:
        """End of a call's device work: its Event (the caller's stream waits for it unless async_finish);
        keepalive: arrays the kernels use, kept alive until the event is dropped."""
        ev = self.stream.record()
        if not call.async_finish:
            call.stream.wait_event(ev)
        out = Event(ev, on_complete=lambda: self.check("after the call"))
        out.keepalive = keepalive
        return out

    def alloc_stream(self, call):
        """Where outputs are allocated (cp.empty only: no kernel, so the comm stream needs no extra wait; begin's
        wait already orders it after the caller's earlier use of any reused pool memory)."""
        return self.stream if call.allocate_on_comm_stream else call.stream

    def sync(self) -> None:
        self.stream.synchronize()
        self.check("synchronize")

    # -- diagnostics: stream marks -------------------------------------------------------------------------
    MAX_STREAM_MARKS = 128

    def start_stream_marks(self) -> None:
        """Diagnostics (bench): from now on, launchers put a device timestamp on the comm stream between kernels
        (a kernel, not an event, so it also works inside CUDA graphs)."""
        self._stream_marks = []
        if self._stamps is None:
            self._stamps = self.zeros(self.MAX_STREAM_MARKS, self.cp.uint64)

    def stop_stream_marks(self) -> list[tuple[str, int]]:
        """Stop marking; the (name, ns) of every mark since start_stream_marks (after the stream has reached them)."""
        names, self._stream_marks = self._stream_marks or [], None
        self.stream.synchronize()
        stamps = self._stamps.get() if names else []
        return [(name, int(stamps[i % self.MAX_STREAM_MARKS])) for i, name in enumerate(names)]

    def mark(self, name: str) -> None:
        """A stream mark named `name` (no-op unless start_stream_marks is on)."""
        if self._stream_marks is not None:
            from ..probe import timestamp
            timestamp(self._stamps, len(self._stream_marks) % self.MAX_STREAM_MARKS, stream=self.stream)
            self._stream_marks.append(name)

    def close(self) -> None:
        self.bad_index.free()
        self.err.close()
