"""epcomm: expert-parallel MoE dispatch and combine (DeepEP's API) over NVLink and NVSHMEM, with NVRTC-compiled
CUDA kernels, any array library through DLPack, and a numpy CPU backend. Importing has no side effects."""
from .buffer import Buffer
from .config import Config
from .errors import BootstrapError, CommTimeoutError, CompileError, ConfigError, EpcommError
from .group import Group, Topology
from .handles import DispatchHandle, Event, EventOverlap, LowLatencyHandle

__version__ = "0.1.0"

__all__ = [
    "Buffer", "Config", "Group", "Topology", "DispatchHandle", "LowLatencyHandle", "Event", "EventOverlap",
    "EpcommError", "ConfigError", "CompileError", "BootstrapError", "CommTimeoutError", "__version__",
]
