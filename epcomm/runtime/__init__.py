"""Kernel runtime: specs and stub generation, NVRTC compilation with a disk cache, loading and launching, and the
host side of bounded waits. Importing it loads neither CuPy nor NVRTC."""
from . import diagnostics
from .compiler import (ELF_MAGIC, arch_from_compute_capability, cache_dir, cache_key, clear_caches, compile_options,
                       compile_to_cubin, cuda_include_dirs, cuda_src_dir, get_kernel, nvrtc_version,
                       nvshmem_include_dir, nvshmem_options, nvshmem_version, source_tree_hash)
from .launch import Kernel, normalize_grid
from .registry import KNOWN_FAMILY_MODULES, all_example_specs, register_family, registered_families
from .spec import SCALAR_CTYPES, KernelSpec
from .watchdog import (ERROR_RECORD_DTYPE, PHASE_IDS, PHASE_NAMES, ErrorRecord, decode_error, host_wait,
                       timeout_ns, timeout_seconds)

__all__ = [
    "ELF_MAGIC", "diagnostics", "ERROR_RECORD_DTYPE", "KNOWN_FAMILY_MODULES", "PHASE_IDS", "PHASE_NAMES", "SCALAR_CTYPES",
    "ErrorRecord", "Kernel", "KernelSpec",
    "all_example_specs", "arch_from_compute_capability", "cache_dir", "cache_key", "clear_caches", "compile_options",
    "compile_to_cubin", "cuda_include_dirs", "cuda_src_dir", "decode_error", "get_kernel", "host_wait",
    "normalize_grid", "nvrtc_version", "nvshmem_include_dir", "nvshmem_options", "nvshmem_version",
    "register_family", "registered_families", "source_tree_hash", "timeout_ns", "timeout_seconds",
]
