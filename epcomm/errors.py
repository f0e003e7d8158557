"""The exception hierarchy: every error epcomm raises on purpose is an EpcommError."""
from __future__ import annotations


class EpcommError(Exception):
    """Base class of every error raised by epcomm on purpose."""


class ConfigError(EpcommError, ValueError):
    """An argument or setting is invalid; the message names it and the expected form."""


class CompileError(EpcommError):
    """NVRTC rejected a kernel. ``log`` holds the compiler log, ``source_path`` the numbered source."""

    def __init__(self, message: str, log: str = "", source_path: str | None = None):
        super().__init__(message)
        self.log = log
        self.source_path = source_path


class BootstrapError(EpcommError):
    """The process group, CUDA IPC or NVSHMEM could not be set up."""


class CommTimeoutError(EpcommError, TimeoutError):
    """A bounded wait expired: ``rank`` waited on ``peer`` during ``phase`` and it never arrived."""

    def __init__(self, message: str, rank: int = -1, peer: int = -1, phase: str = "",
                 observed: int = 0, expected: int = 0):
        super().__init__(message)
        self.rank, self.peer, self.phase = rank, peer, phase
        self.observed, self.expected = observed, expected
