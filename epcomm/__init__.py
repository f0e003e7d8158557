"""epcomm: expert-parallel MoE dispatch and combine (DeepEP's API) over NVLink and NVSHMEM, with NVRTC-compiled
CUDA kernels, any array library through DLPack, and a numpy CPU backend. Importing has no side effects."""
from .buffer import Buffer
from .config import Config
from .errors import BootstrapError, CommTimeoutError, CompileError, ConfigError, EpcommError
from .group import Group, Topology
from .handles import DispatchHandle, Event, EventHandle, EventOverlap, LowLatencyHandle

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "Group", "Topology", "DispatchHandle", "LowLatencyHandle", "Event", "EventOverlap",
    "EventHandle", "EpcommError", "ConfigError", "CompileError", "BootstrapError", "CommTimeoutError", "topk_idx_t",
    "__version__",
]


def __getattr__(name):
    """topk_idx_t: the dtype of top-k indices (DeepEP's deep_ep.topk_idx_t): torch.int64 where torch is installed,
    else numpy.int64 (looked up on first use, so importing epcomm does not import torch)."""
    if name == "topk_idx_t":
        try:
            import torch
            return torch.int64
        except ImportError:
            import numpy
            return numpy.dtype(numpy.int64)
    raise AttributeError(f"module 'epcomm' has no attribute {name!r}")
