"""The one table of EPCOMM_* environment variables: name, parser, default and doc of each, and env() to read one.
A leaf module (it imports nothing else of epcomm but errors), so the runtime and every family can read settings
without importing the plan modules that config.py's Config depends on."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError


@dataclass(frozen=True)
class EnvVar:
    name: str
    parse: Callable[[str], Any]
    default: Any
    doc: str


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 0/1/true/false, got {text!r}")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a positive number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


def _bits(width: int) -> Callable[[str], int]:
    """A parser of a bit mask of `width` bits (decimal, or 0x / 0b)."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 0)
        except ValueError:
            raise ValueError(f"expected an int in 0..{2**width - 1}, got {text!r}") from None
        if not 0 <= value < 2**width:
            raise ValueError(f"expected an int in 0..{2**width - 1}, got {text!r}")
        return value
    return parse


def _backend(text: str) -> str:
    low = text.strip().lower()
    if low not in ("auto", "cpu", "gpu"):
        raise ValueError(f"expected auto, cpu or gpu, got {text!r}")
    return low


ENV_VARS: dict[str, EnvVar] = {v.name: v for v in (
    EnvVar("EPCOMM_CACHE_DIR", str, os.path.join(os.path.expanduser("~"), ".cache", "epcomm"),
           "Folder of the on-disk kernel cache (cubins keyed by stub, options, arch and versions)."),
    EnvVar("EPCOMM_JIT_DEBUG", _bool, False,
           "Compile kernels with -lineinfo and keep every generated stub and its numbered source in the cache."),
    EnvVar("EPCOMM_JIT_QUIET", _bool, False,
           "Do not print the one-line progress message when a kernel is compiled for the first time."),
    EnvVar("EPCOMM_BACKEND", _backend, "auto",
           "auto: GPU when CuPy sees a device, else the numpy CPU backend; cpu or gpu force one."),
    EnvVar("EPCOMM_TIMEOUT_S", _seconds, 20.0,
           "Bound, in seconds, of every device spin-wait and host poll before CommTimeoutError."),
    EnvVar("EPCOMM_FORCE_NVSHMEM", _bool, False,
           "Low-latency kernels use NVSHMEM puts for every peer, even those reachable through NVLink pointers."),
    EnvVar("EPCOMM_VIRTUAL_NODE_SIZE", int, 0,
           "Group consecutive ranks into virtual nodes of this size (0: one node per host)."),
    # Diagnostics: compile-time switches of the kernels (epcomm/runtime/diagnostics.py), read when a Buffer is made.
    EnvVar("EPCOMM_DEBUG_TRACE", _bool, False,
           "Diagnostics: compile the intranode dispatch and combine kernels with named in-kernel timestamps "
           "(epcomm.runtime.diagnostics.read_marks)."),
    EnvVar("EPCOMM_DEBUG_SEND_ROLES", _bits(3), 7,
           "Diagnostics, wrong results unless 7: the parts intranode dispatch_send moves (bit 0 rows to peers, bit 1 "
           "the rank's own rows, bit 2 each row's scales, top-k and source index), compiled in."),
    EnvVar("EPCOMM_DEBUG_LL_COMBINE_SKIP", _bits(4), 0,
           "Diagnostics, wrong results unless 0: the parts the once-per-rank low-latency combine leaves out (1 the "
           "weights exchange, 2 the row loads, 4 the partial-row stores, 8 every item), compiled in."),
)}


def env(name: str) -> Any:
    """The parsed value of one declared EPCOMM_* variable (its default when unset)."""
    var = ENV_VARS[name]
    raw = os.environ.get(name)
    if raw is None:
        return var.default
    try:
        return var.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc} ({var.doc})") from None


def env_table_markdown() -> str:
    """The table of environment variables, as docs/ shows it."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    home = os.path.expanduser("~")
    for v in ENV_VARS.values():
        default = str(v.default)
        if default.startswith(home + os.sep):
            default = "~" + default[len(home):]
        rows.append(f"| `{v.name}` | `{default}` | {v.doc} |")
    return "\n".join(rows)
