"""Kernel diagnostics as compile-time switches: the table of EPCOMM_DEBUG_* variables (declared in config.ENV_VARS)
and the kernels that read each, the -D defines a family's specs get from it, and the reader of the named trace marks
(cuda_src/epcomm/trace.cuh). In normal use every switch is off and no spec carries a define."""
from __future__ import annotations

from dataclasses import dataclass

from ..env import env
from ..errors import ConfigError


@dataclass(frozen=True)
class Switch:
    """name: the EPCOMM_* variable and the -D macro of the same name; off: its value in normal use (then no -D is
    passed); kernels: the (family, op) whose device code reads it."""
    name: str
    off: int
    kernels: tuple[tuple[str, str], ...]


_INTRANODE_TRACED = tuple(("intranode", op) for op in ("dispatch_send", "dispatch_recv", "combine_stage",
                                                       "combine_reduce"))
SWITCHES: tuple[Switch, ...] = (
    Switch("EPCOMM_DEBUG_TRACE", 0, _INTRANODE_TRACED),
    Switch("EPCOMM_DEBUG_SEND_ROLES", 7, (("intranode", "dispatch_send"),)),
    Switch("EPCOMM_DEBUG_LL_COMBINE_SKIP", 0, (("low_latency", "combine_send"),)),
)

# Mirror of epcomm::trace::Mark (parity test: tests/test_runtime.py parses trace.cuh): slot i's name.
MARK_NAMES: tuple[str, ...] = ("start", "rows_start", "rows_done", "counted_out", "signalled", "waited", "arrived",
                               "all_received")
TRACE_SYMBOL = "epcomm_trace_marks"


def defines(family: str) -> tuple[tuple[str, int], ...]:
    """The switches set in the environment for the kernels of `family`: ((NAME, value), ...) sorted by name, () in
    normal use. Reads the environment on every call: a launcher calls it once when it is built and passes the result
    to its spec functions (which keep only the switches each kernel reads: for_kernel)."""
    out = []
    for switch in SWITCHES:
        if any(f == family for f, _ in switch.kernels):
            value = int(env(switch.name))
            if value != switch.off:
                out.append((switch.name, value))
    return tuple(sorted(out))


def for_kernel(defines: tuple[tuple[str, int], ...], family: str, op: str) -> tuple[tuple[str, int], ...]:
    """The defines among `defines` that kernel (family, op) reads, so that a kernel no switch touches compiles once."""
    reads = {s.name for s in SWITCHES if (family, op) in s.kernels}
    known = {s.name for s in SWITCHES}
    unknown = [name for name, _ in defines if name not in known]
    if unknown:
        raise ConfigError(f"defines: unknown diagnostics switch {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return tuple(sorted((name, int(value)) for name, value in defines if name in reads))


def read_marks(kernel) -> dict[str, int]:
    """The trace marks the latest launch of `kernel` (an epcomm.runtime.Kernel compiled with EPCOMM_DEBUG_TRACE)
    wrote: {slot name: global timer in ns}, written slots only (see MARK_NAMES and trace.cuh for what each records).
    Synchronise the kernel's stream first; clear_marks() before a launch to drop an earlier launch's values."""
    return {name: int(v) for name, v in zip(MARK_NAMES, _marks_array(kernel).get().tolist()) if v}


def clear_marks(kernel, stream=None) -> None:
    """Zero the trace marks of `kernel` (asynchronously on stream; None: the current stream)."""
    import cupy
    with (stream if stream is not None else cupy.cuda.get_current_stream()):
        _marks_array(kernel).fill(0)


def _marks_array(kernel):
    if not dict(kernel.spec.defines).get("EPCOMM_DEBUG_TRACE"):
        raise ConfigError(f"{kernel.spec.describe()} has no trace marks: it was compiled without EPCOMM_DEBUG_TRACE "
                          "(set EPCOMM_DEBUG_TRACE=1 before the Buffer is made)")
    import cupy
    pointer = kernel.module.get_global(TRACE_SYMBOL)
    return cupy.ndarray((len(MARK_NAMES),), dtype=cupy.uint64, memptr=pointer)
