"""NVRTC compilation of kernel stubs to cubins: header discovery, options, the disk cache and its key, and loading.

Compiling needs no GPU (NVRTC from the CUDA wheels); ``get_kernel`` loads onto the current CuPy device. The cache key
covers everything the compiler sees: the stub, the options (include paths, switches and the spec's defines), the arch,
the NVRTC version, the NVSHMEM version (NVSHMEM specs) and a hash of every file under cuda_src. Cache writes are atomic
(temp file in the same folder + os.replace), so ranks compiling the same kernel at once are safe.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

from ..env import env
from ..errors import BootstrapError, CompileError
from .spec import KernelSpec

if TYPE_CHECKING:
    from .launch import Kernel

ELF_MAGIC = b"\x7fELF"
LOG_LINES_IN_MESSAGE = 60
_ARCH = re.compile(r"sm_\d+a?\Z")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../epcomm


# ---------------------------------------------------------------- locations


def cuda_src_dir() -> str:
    """The folder holding ``epcomm/*.cuh``: ``epcomm/_cuda_src`` when installed from a wheel, else the repo's
    top-level ``cuda_src``."""
    installed = os.path.join(_PACKAGE_DIR, "_cuda_src")
    if os.path.isdir(installed):
        return installed
    repo = os.path.join(os.path.dirname(_PACKAGE_DIR), "cuda_src")
    if os.path.isdir(repo):
        return repo
    raise CompileError(f"epcomm's CUDA sources are missing: looked for {installed} and {repo}")


def cache_dir() -> str:
    """The on-disk kernel cache (EPCOMM_CACHE_DIR)."""
    return os.path.abspath(os.path.expanduser(env("EPCOMM_CACHE_DIR")))


def _nvidia_wheel_dirs() -> list[str]:
    """The folders of the ``nvidia`` namespace package (pip wheels of the CUDA toolkit and NVSHMEM)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return list(spec.submodule_search_locations)


def _holds_cuda_headers(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "cuda", "std", "cstdint"))
            or os.path.isfile(os.path.join(path, "cuda_runtime.h")))


@functools.lru_cache(maxsize=None)
def cuda_include_dirs() -> tuple[str, ...]:
    """CUDA header folders (runtime headers and libcu++), in search order; only those that exist and hold headers.

    Order: $CUDA_HOME, $CUDA_PATH, the pip wheels (cu13 layout, then the cu12 layout), /usr/local/cuda.
    """
    candidates: list[str] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            candidates += [os.path.join(root, "include"), os.path.join(root, "include", "cccl")]
    for base in _nvidia_wheel_dirs():
        candidates += [os.path.join(base, "cu13", "include"), os.path.join(base, "cu13", "include", "cccl"),
                       os.path.join(base, "cuda_runtime", "include"), os.path.join(base, "cuda_cccl", "include")]
    candidates += ["/usr/local/cuda/include", "/usr/local/cuda/include/cccl"]
    found: list[str] = []
    seen: set[str] = set()
    for path in candidates:
        real = os.path.realpath(path)
        if real not in seen and os.path.isdir(path) and _holds_cuda_headers(path):
            seen.add(real)
            found.append(path)
    if not found:
        raise CompileError("CUDA headers not found (cuda_runtime.h, cuda/std/cstdint): install the toolkit wheels, "
                           "e.g. pip install 'cuda-toolkit[nvrtc,cudart,crt,cccl]==13.0.*', or set CUDA_HOME")
    return tuple(found)


# ---------------------------------------------------------------- NVSHMEM headers: every version difference lives here


@functools.lru_cache(maxsize=None)
def nvshmem_include_dir() -> str:
    """NVSHMEM's include folder: the nvidia-nvshmem wheel (the library nvshmem4py loads), else $NVSHMEM_HOME/include."""
    candidates = [os.path.join(base, "nvshmem", "include") for base in _nvidia_wheel_dirs()]
    if os.environ.get("NVSHMEM_HOME"):
        candidates.append(os.path.join(os.environ["NVSHMEM_HOME"], "include"))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "nvshmem.h")):
            return path
    raise CompileError("NVSHMEM headers not found: install nvidia-nvshmem-cu13 (pip) or set NVSHMEM_HOME")


@functools.lru_cache(maxsize=None)
def nvshmem_version() -> str:
    """The NVSHMEM version of the headers, e.g. "3.4.5" (NVSHMEM_VENDOR_{MAJOR,MINOR,PATCH}_VERSION)."""
    include = nvshmem_include_dir()
    for rel in ("non_abi/nvshmem_version.h", "nvshmem_version.h", "device_host/nvshmem_common.cuh", "nvshmem.h"):
        path = os.path.join(include, rel)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts = [re.search(rf"#define\s+NVSHMEM_VENDOR_{p}_VERSION\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
        if all(parts):
            return ".".join(m.group(1) for m in parts)
    raise CompileError(f"cannot read the NVSHMEM version from the headers under {include}")


def _top_level_defines(text: str) -> set[str]:
    """Macros a header #defines outside any #if block (a build-options header's settings)."""
    defined: set[str] = set()
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if re.match(r"#\s*if", stripped):
            depth += 1
        elif re.match(r"#\s*endif", stripped):
            depth = max(0, depth - 1)
        elif depth == 0:
            m = re.match(r"#\s*define\s+(\w+)", stripped)
            if m:
                defined.add(m.group(1))
    return defined


# Settings of the stock non_abi/nvshmem_build_options.h that break (or slow down) NVRTC compilation:
# NVSHMEM 3.4.5 (checked): NVSHMEM_IBGDA_SUPPORT is on, so transfer_device.cuh includes ibgda_device.cuh, which
# includes infiniband/mlx5dv.h (not shipped: "cannot open source file"); NVSHMEM_ENABLE_ALL_DEVICE_INLINING is off,
# so every transfer function is __noinline__. The shadow header undoes exactly these two settings.
_SHADOW_UNDEF = ("NVSHMEM_IBGDA_SUPPORT", "NVSHMEM_IBGDA_SUPPORT_GPUMEM_ONLY")
_SHADOW_DEFINE = ("NVSHMEM_ENABLE_ALL_DEVICE_INLINING",)


@functools.lru_cache(maxsize=None)
def _nvshmem_shadow_dir(cache_root: str, include_dir: str, version: str) -> str | None:
    stock_path = os.path.join(include_dir, "non_abi", "nvshmem_build_options.h")
    if not os.path.isfile(stock_path):
        return None  # older layouts: nothing to shadow
    with open(stock_path, "rb") as f:
        stock = f.read()
    defined = _top_level_defines(stock.decode("utf-8", errors="replace"))
    if not any(m in defined for m in _SHADOW_UNDEF) and all(m in defined for m in _SHADOW_DEFINE):
        return None  # this NVSHMEM build is already NVRTC-friendly
    lines = ["// Written by epcomm/runtime/compiler.py: NVSHMEM's build options with IBGDA off and full device",
             "// inlining on, so its device headers compile under NVRTC without infiniband headers or a link step.",
             "#ifndef EPCOMM_NVSHMEM_SHADOW_BUILD_OPTIONS", "#define EPCOMM_NVSHMEM_SHADOW_BUILD_OPTIONS",
             f'#include "{stock_path}"']
    lines += [f"#undef {m}" for m in _SHADOW_UNDEF]
    lines += [f"#ifndef {m}\n#define {m}\n#endif" for m in _SHADOW_DEFINE]
    lines += ["#endif", ""]
    text = "\n".join(lines).encode()
    digest = hashlib.sha256(text + stock).hexdigest()[:16]
    shadow = os.path.join(cache_root, "nvshmem-shadow", f"{version}-{digest}")
    target = os.path.join(shadow, "non_abi", "nvshmem_build_options.h")
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        _atomic_write(target, text)
    return shadow


def nvshmem_options() -> list[str]:
    """NVRTC options of NVSHMEM specs (route C of shared/recipes/nvshmem-nvrtc: device code inlined, no link step).

    The shadow build-options folder (when this NVSHMEM build needs one) comes first on the include path; the C++ side of
    the work-arounds is in cuda_src/epcomm/nvshmem.cuh.
    """
    include = nvshmem_include_dir()
    shadow = _nvshmem_shadow_dir(cache_dir(), include, nvshmem_version())
    opts = [f"-I{shadow}"] if shadow else []
    return opts + [f"-I{include}", "-default-device", "-D__NVSHMEM_NUMBA_SUPPORT__", "-DEPCOMM_NVSHMEM=1"]


# ---------------------------------------------------------------- options and cache key


def arch_from_compute_capability(cc) -> str:
    """NVRTC -arch for a compute capability: "90" / (9, 0) / 90 -> "sm_90a" (Hopper's arch-specific features),
    "80" -> "sm_80"."""
    if isinstance(cc, tuple):
        major, minor = int(cc[0]), int(cc[1])
    else:
        text = str(cc).replace(".", "")
        if not text.isdigit() or len(text) < 2:
            raise ValueError(f"compute capability: expected e.g. '90' or (9, 0), got {cc!r}")
        major, minor = int(text[:-1]), int(text[-1])
    return f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _check_arch(arch: str) -> None:
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise ValueError(f"arch: expected e.g. 'sm_90a' or 'sm_80', got {arch!r}")


def compile_options(spec: KernelSpec, arch: str) -> list[str]:
    """The full NVRTC option list of one spec (what the cache key hashes)."""
    _check_arch(arch)
    opts = ["-std=c++17", f"-arch={arch}"]
    if spec.uses_nvshmem:
        opts += nvshmem_options()
    opts.append(f"-I{cuda_src_dir()}")
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    opts += ["-lineinfo"] if env("EPCOMM_JIT_DEBUG") else ["-DNDEBUG"]
    opts += [f"-D{name}={value}" for name, value in spec.defines]
    return opts


@functools.lru_cache(maxsize=None)
def source_tree_hash(root: str) -> str:
    """sha256 over every file under root (relative name and content), computed once per process and root."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            with open(path, "rb") as f:
                data = f.read()
            h.update(f"{rel}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> str:
    from cuda.bindings import nvrtc
    result, major, minor = nvrtc.nvrtcVersion()
    _check_nvrtc(result, "nvrtcVersion")
    return f"{major}.{minor}"


def cache_key(spec: KernelSpec, arch: str, options: list[str] | None = None) -> str:
    """sha256 hex of everything the compiler sees for this spec and arch."""
    if options is None:
        options = compile_options(spec, arch)
    parts = [("stub", spec.stub_source()), ("options", "\0".join(options)), ("arch", arch),
             ("nvrtc", nvrtc_version()), ("nvshmem", nvshmem_version() if spec.uses_nvshmem else ""),
             ("cuda_src", source_tree_hash(cuda_src_dir()))]
    h = hashlib.sha256()
    for name, value in parts:
        data = value.encode()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def clear_caches() -> None:
    """Forget the per-process caches (header locations, source hash, loaded kernels); for tests and after changing
    cuda_src or NVSHMEM within one process."""
    for fn in (cuda_include_dirs, nvshmem_include_dir, nvshmem_version, _nvshmem_shadow_dir, source_tree_hash,
               nvrtc_version):
        fn.cache_clear()
    with _kernels_lock:
        _kernels.clear()


# ---------------------------------------------------------------- NVRTC


def _check_nvrtc(result, what: str) -> None:
    from cuda.bindings import nvrtc
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"NVRTC {what} failed: {result!r}")


def _nvrtc_compile(source: str, name: str, options: list[str], ptx: bool = False) -> tuple[bytes | None, str]:
    """(cubin, or PTX when ptx=True (needs -arch=compute_XY), or None on failure; log). The one place calling NVRTC."""
    from cuda.bindings import nvrtc
    result, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    _check_nvrtc(result, "nvrtcCreateProgram")
    try:
        encoded = [o.encode() for o in options]
        (compiled,) = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        result, log_size = nvrtc.nvrtcGetProgramLogSize(prog)
        _check_nvrtc(result, "nvrtcGetProgramLogSize")
        log = b" " * log_size
        (result,) = nvrtc.nvrtcGetProgramLog(prog, log)
        _check_nvrtc(result, "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\0").decode("utf-8", errors="replace").strip()
        if compiled != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            return None, log_text or repr(compiled)
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if ptx
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        result, size = get_size(prog)
        _check_nvrtc(result, get_size.__name__)
        output = b" " * size
        (result,) = get(prog, output)
        _check_nvrtc(result, get.__name__)
        return (output.rstrip(b"\0") if ptx else output), log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _atomic_write(path: str, data: bytes) -> None:
    """Write data to path so that readers see the old file or the whole new one, never a part."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _numbered(source: str) -> str:
    return "".join(f"{i:4d}  {line}\n" for i, line in enumerate(source.splitlines(), 1))


def _compile_failed(spec: KernelSpec, arch: str, key: str, source: str, options: list[str], log: str) -> CompileError:
    folder = os.path.join(cache_dir(), "failed")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{spec.entry_name}-{arch}-{key[:16]}.cu")
    _atomic_write(path, (_numbered(source) + "\n// NVRTC options:\n" + "".join(f"//   {o}\n" for o in options)
                         + "\n// NVRTC log:\n" + "".join(f"// {line}\n" for line in log.splitlines())).encode())
    lines = log.splitlines()
    shown = "\n".join("    " + line for line in lines[:LOG_LINES_IN_MESSAGE])
    more = f"\n    ... {len(lines) - LOG_LINES_IN_MESSAGE} more lines in {path}" \
        if len(lines) > LOG_LINES_IN_MESSAGE else ""
    message = (f"NVRTC failed to compile {spec.describe()} for {arch}\n"
               f"  stub source (numbered) and full log: {path}\n"
               f"  options: {' '.join(options)}\n"
               f"  log:\n{shown}{more}")
    return CompileError(message, log=log, source_path=path)


def compile_to_cubin(spec: KernelSpec, arch: str) -> bytes:
    """The cubin of spec for arch (e.g. "sm_90a"), from the disk cache or compiled now with NVRTC (no GPU needed).

    Raises CompileError with the NVRTC log, the options and the path of the numbered stub source.
    """
    options = compile_options(spec, arch)
    key = cache_key(spec, arch, options)
    folder = os.path.join(cache_dir(), "kernels")
    path = os.path.join(folder, f"{spec.entry_name}-{arch}-{key[:40]}.cubin")
    try:
        with open(path, "rb") as f:
            cubin = f.read()
        if cubin.startswith(ELF_MAGIC):
            return cubin
    except FileNotFoundError:
        pass

    source = spec.stub_source()
    quiet = env("EPCOMM_JIT_QUIET")
    if not quiet:
        sys.stderr.write(f"epcomm: compiling {spec.entry_name} ({arch}) ... ")
        sys.stderr.flush()
    start = time.perf_counter()
    cubin, log = _nvrtc_compile(source, f"{spec.entry_name}.cu", options)
    if not quiet:
        sys.stderr.write(f"{time.perf_counter() - start:.1f} s\n" if cubin is not None else "failed\n")
        sys.stderr.flush()
    if cubin is None:
        raise _compile_failed(spec, arch, key, source, options, log)
    if not cubin.startswith(ELF_MAGIC):
        raise CompileError(f"NVRTC returned a non-ELF cubin for {spec.describe()} ({arch})", log=log)
    os.makedirs(folder, exist_ok=True)
    _atomic_write(path, cubin)
    if env("EPCOMM_JIT_DEBUG"):
        _atomic_write(path[: -len(".cubin")] + ".cu", source.encode())
    return cubin


# ---------------------------------------------------------------- loading (GPU only)

_kernels: dict = {}
_kernels_lock = threading.Lock()


def _nvshmem_module_init(spec: KernelSpec, module) -> None:
    """Hand the freshly loaded module to NVSHMEM (fills its device state); NVSHMEM must be initialised already."""
    try:
        import nvshmem.bindings as nvshmem_bindings
    except ImportError as exc:
        raise BootstrapError(f"{spec.entry_name} uses NVSHMEM but nvshmem4py is missing "
                             f"(pip install nvshmem4py-cu13): {exc}") from exc
    try:
        status = int(nvshmem_bindings.init_status())
    except Exception as exc:  # the host library itself failed to load
        raise BootstrapError(f"{spec.entry_name} uses NVSHMEM but its host library is unusable: {exc}") from exc
    initialised = {int(nvshmem_bindings.Init_status.STATUS_IS_INITIALIZED),
                   int(nvshmem_bindings.Init_status.STATUS_LIMITED_MPG),
                   int(nvshmem_bindings.Init_status.STATUS_FULL_MPG)}
    if status not in initialised:
        raise BootstrapError(f"{spec.entry_name} uses NVSHMEM but NVSHMEM is not initialised in this process "
                             f"(nvshmemx_init_status() = {status}): set up the process group with NVSHMEM first")
    rc = nvshmem_bindings.cumodule_init(module.ptr)
    if rc not in (0, None):
        raise BootstrapError(f"nvshmemx_cumodule_init failed ({rc}) for {spec.entry_name}: the NVSHMEM headers it "
                             f"was compiled with ({nvshmem_version()}) may not match the host library")


def get_kernel(spec: KernelSpec) -> "Kernel":
    """The loaded kernel of spec on the current CuPy device (compiled and cached on first use)."""
    import cupy

    from .launch import Kernel

    device = cupy.cuda.Device()
    key = (spec, device.id)
    with _kernels_lock:
        kernel = _kernels.get(key)
        if kernel is not None:
            return kernel
        arch = arch_from_compute_capability(device.compute_capability)
        cubin = compile_to_cubin(spec, arch)
        module = cupy.cuda.function.Module()
        module.load(cubin)
        if spec.uses_nvshmem:
            _nvshmem_module_init(spec, module)
        function = module.get_function(spec.entry_name)
        if spec.smem_bytes > 48 * 1024:
            cupy.cuda.driver.funcSetAttribute(function.ptr,
                                              cupy.cuda.driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                              spec.smem_bytes)
        kernel = Kernel(spec, function, module=module, arch=arch, device_id=device.id)
        _kernels[key] = kernel
        return kernel
