"""Handles and events: what a dispatch returns for its combine (or a cached dispatch), and completion events."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DispatchHandle:
    """Everything combine and a cached dispatch need. Arrays live where the backend computes (numpy or CuPy).

    num_ranks, num_experts: the group size and expert count of the dispatch.
    num_tokens: T, tokens this rank dispatched (rows of combine's output).
    hidden: H of the dispatched rows.
    is_token_in_rank: [T, R] bool, token t went to rank r.
    num_recv_tokens_per_source: [R] int32, rows this rank received from each source (rows grouped by source).
    rank_prefix_matrix: [R, R] int32, inclusive prefix over sources: entry [s, d] = rows rank d received from
        sources 0..s. Column d is where each source's block ends in d's receive order.
    recv_src_idx: [N] int32 (N = num_recv_tokens, or num_worst_tokens rows with -1 padding), token index at source.
    send_pos: [T, R] int32, row of token t in rank r's receive order (-1 where not sent). GPU only (None on CPU).
    num_recv_tokens: N, the true received row count (None until the host has read it in num_worst_tokens mode).
    num_worst_tokens: the padded row count of the outputs (0 when not padded).
    device_num_recv_tokens: [1] int32 device array with N (GPU; None on CPU).
    state: what the family that made the dispatch keeps for its combine and cached dispatches (a typed object:
        intranode.IntranodeHandleState on the GPU, cpu_backend.CpuDispatchState on the CPU backend).
    """
    num_ranks: int
    num_experts: int
    num_tokens: int
    hidden: int
    is_token_in_rank: Any
    num_recv_tokens_per_source: Any
    rank_prefix_matrix: Any
    recv_src_idx: Any
    num_recv_tokens: int | None
    num_worst_tokens: int = 0
    send_pos: Any = None
    device_num_recv_tokens: Any = None
    state: Any = None

    @property
    def num_rows(self) -> int | None:
        """Rows of the dispatch's outputs (and of combine's input): num_worst_tokens when padded, else
        num_recv_tokens."""
        return self.num_worst_tokens or self.num_recv_tokens


@dataclass
class LowLatencyHandle:
    """What a low-latency combine needs from its dispatch.

    src_info: [E_local, R*Tmax] int32, token index at its source of each received row.
    layout_range: [E_local, R] int64, (begin << 32) | count of the rows from each source rank.
    num_max_dispatch_tokens_per_rank: Tmax.  hidden: H.  num_experts: E.
    num_tokens: T of the dispatching rank.  buffer_idx: which of the two alternating buffers it used.
    state: the family's typed state (low_latency.LowLatencyHandleState on the GPU; None on the CPU backend).
    framework: the array framework of the dispatch's caller ('torch', 'cupy', ...; set by the Buffer), in which
        get_next_low_latency_combine_buffer returns its array.
    """
    src_info: Any
    layout_range: Any
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_tokens: int
    buffer_idx: int = 0
    state: Any = None
    framework: str | None = None


def _current_stream_framework() -> str | None:
    """Whose "current stream" a capture means: torch's when torch is loaded and sees CUDA (DeepEP's rule), else CuPy's
    when a GPU is visible, else None (no GPU: events are complete at once)."""
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return "torch"
    from .group import gpu_count
    return "cupy" if gpu_count() > 0 else None


class EventHandle:
    """A CUDA event recorded on the caller's current stream when made (DeepEP's EventHandle()): torch's current stream
    when torch sees CUDA, else CuPy's; without a GPU (the CPU backend) it is complete at once.

    current_stream_wait(): make the current stream wait for it.  cuda_event: the CuPy event (None without a GPU).
    framework: 'torch', 'cupy' or None.
    """

    def __init__(self, stream=None, framework: str | None = None):
        self.framework = framework or _current_stream_framework()
        self.cuda_event = None
        if self.framework is not None:
            import cupy
            from .interop import caller_stream
            with self._device():
                self.cuda_event = cupy.cuda.Event(block=False, disable_timing=True)
                self.cuda_event.record(caller_stream(None, stream or self._torch_stream(), framework=self.framework))

    def _device(self):
        """torch's current device for a torch capture (CuPy's current device may be another one), else CuPy's."""
        import cupy
        if self.framework == "torch":
            import torch
            return cupy.cuda.Device(torch.cuda.current_device())
        return cupy.cuda.Device()

    def _torch_stream(self):
        if self.framework == "torch":
            import torch
            return torch.cuda.current_stream()
        return None

    def current_stream_wait(self) -> None:
        if self.cuda_event is not None:
            from .interop import caller_stream
            with self._device():
                caller_stream(None, self._torch_stream(), framework=self.framework).wait_event(self.cuda_event)


class Event:
    """Completion of an epcomm call: DeepEP's EventOverlap (the same class under both names).

    Event(event=None, extra_tensors=None): DeepEP's form. event: an EventHandle, a CuPy event or None; extra_tensors:
    arrays to keep alive until the event is waited for (DeepEP's record_stream substitute).
    .event: an EventHandle for the same CUDA event (None when there is none); .extra_tensors as given.
    current_stream_wait(): make the caller's current stream (or `stream`) wait for it.
    synchronize(): block the host until it completes.  query(): True once complete.
    `with event:` runs the block (overlapping the call) and makes the current stream wait for the event at its end.
    On the CPU backend every call completes before it returns, so the event is already done.
    """

    def __init__(self, event=None, extra_tensors=None, on_complete=None, framework: str | None = None):
        if isinstance(event, EventHandle):
            framework = framework or event.framework
            event = event.cuda_event
        self.cuda_event = event
        self.extra_tensors = extra_tensors
        self._on_complete = on_complete
        self.framework = framework or "cupy"  # whose "current stream" current_stream_wait() means (set by the Buffer)

    @property
    def event(self) -> EventHandle | None:
        if self.cuda_event is None:
            return None
        handle = EventHandle.__new__(EventHandle)
        handle.framework, handle.cuda_event = self.framework, self.cuda_event
        return handle

    def current_stream_wait(self, stream=None) -> None:
        if self.cuda_event is None:
            return
        from .interop import caller_stream
        caller_stream(None, stream, framework=self.framework).wait_event(self.cuda_event)

    def synchronize(self) -> None:
        if self.cuda_event is not None:
            self.cuda_event.synchronize()
        if self._on_complete is not None:
            cb, self._on_complete = self._on_complete, None
            cb()

    def query(self) -> bool:
        return self.cuda_event is None or bool(self.cuda_event.done)

    def __enter__(self) -> "Event":
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()


# DeepEP's name for the same object.
EventOverlap = Event
