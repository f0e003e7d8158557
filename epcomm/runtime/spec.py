"""KernelSpec: one kernel specialisation, its generated stub and its ABI (parameter list and launch-time conversion).

A spec is pure data: no CUDA, no CuPy. The stub instantiates ``epcomm::<family>::<op><template args>`` from the header
``cuda_src/epcomm/<family>.cuh`` behind ``extern "C" __global__ void epcomm_<family>_<op>(<params>)``.
"""
from __future__ import annotations

import functools

import operator
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_LOWER_IDENT = re.compile(r"[a-z][a-z0-9_]*\Z")
_MACRO = re.compile(r"[A-Z][A-Z0-9_]*\Z")
_CTYPE_CHARS = re.compile(r"[A-Za-z0-9_ *:]+\Z")

# Scalar C types a kernel parameter may have, and the numpy type CuPy passes by value. Any type containing '*' is a
# pointer: it accepts a CuPy array (its data pointer; also torch tensors and __cuda_array_interface__ objects), an int
# address or None (null), passed as a uint64.
SCALAR_CTYPES: dict[str, type] = {
    "int": np.int32,
    "int32_t": np.int32,
    "unsigned": np.uint32,
    "unsigned int": np.uint32,
    "uint32_t": np.uint32,
    "long long": np.int64,
    "int64_t": np.int64,
    "unsigned long long": np.uint64,
    "uint64_t": np.uint64,
    "float": np.float32,
}

MAX_THREADS_PER_BLOCK = 1024
MAX_DYNAMIC_SMEM_BYTES = 227 * 1024  # Hopper's opt-in maximum per block


def _normalise_ctype(ctype: str) -> str:
    return " ".join(ctype.replace("*", " * ").split()).replace(" *", "*")


def is_pointer_ctype(ctype: str) -> bool:
    return "*" in ctype


@dataclass(frozen=True)
class KernelSpec:
    """One kernel specialisation.

    family: header ``epcomm/<family>.cuh``, namespace ``epcomm::<family>``.
    op: the device function template in that namespace; entry point ``epcomm_<family>_<op>``.
    template_args: ((name, value), ...) written in order as the template arguments (int or bool); every structural
        constant goes here. Names are documentation (they appear in the stub's first line) and must be identifiers.
    params: ((C type, name), ...): the kernel ABI. Communicating kernels end with
        ("uint64_t", "err_record"), ("long long", "timeout_ns"), ("int", "rank") (see cuda_src/epcomm/comm.cuh).
    num_threads: block size (also the first __launch_bounds__ argument).
    min_blocks_per_sm: second __launch_bounds__ argument.
    smem_bytes: dynamic shared memory per block; above 48 KiB the runtime raises the kernel's limit.
    uses_nvshmem: compile with the NVSHMEM headers and options, and run nvshmemx_cumodule_init after loading.
    defines: ((NAME, int value), ...) passed as -DNAME=value: the diagnostics switches of this specialisation
        (epcomm.runtime.diagnostics), sorted by name; empty in normal use, so the stub and options are unchanged.
    """

    family: str
    op: str
    template_args: tuple[tuple[str, int | bool], ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    num_threads: int = 128
    min_blocks_per_sm: int = 1
    smem_bytes: int = 0
    uses_nvshmem: bool = False
    defines: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        where = f"KernelSpec({self.family!r}, {self.op!r})"
        if not isinstance(self.family, str) or not _LOWER_IDENT.match(self.family):
            raise ConfigError(f"{where}.family: expected a lower-case identifier, got {self.family!r}")
        if not isinstance(self.op, str) or not _LOWER_IDENT.match(self.op):
            raise ConfigError(f"{where}.op: expected a lower-case identifier, got {self.op!r}")

        targs = tuple(tuple(item) for item in self.template_args)
        for item in targs:
            if len(item) != 2 or not isinstance(item[0], str) or not _IDENT.match(item[0]):
                raise ConfigError(f"{where}.template_args: expected (name, value) pairs, got {item!r}")
            if not isinstance(item[1], (bool, int, np.integer, np.bool_)):
                raise ConfigError(f"{where}.template_args: {item[0]} must be an int or bool, got {item[1]!r}")
        targs = tuple((name, bool(v) if isinstance(v, (bool, np.bool_)) else int(v)) for name, v in targs)
        object.__setattr__(self, "template_args", targs)

        params = tuple(tuple(item) for item in self.params)
        seen = set()
        for item in params:
            if len(item) != 2 or not all(isinstance(x, str) for x in item):
                raise ConfigError(f"{where}.params: expected (C type, name) pairs of strings, got {item!r}")
            ctype, name = item
            if not _IDENT.match(name) or name in seen:
                raise ConfigError(f"{where}.params: invalid or repeated parameter name {name!r}")
            seen.add(name)
            if not _CTYPE_CHARS.match(ctype) or not (is_pointer_ctype(ctype)
                                                      or _normalise_ctype(ctype) in SCALAR_CTYPES):
                raise ConfigError(f"{where}.params: {name}: unsupported C type {ctype!r}; expected a pointer or one "
                                  f"of {sorted(SCALAR_CTYPES)}")
        object.__setattr__(self, "params", params)

        if not isinstance(self.num_threads, int) or not 1 <= self.num_threads <= MAX_THREADS_PER_BLOCK:
            raise ConfigError(f"{where}.num_threads: expected 1..{MAX_THREADS_PER_BLOCK}, got {self.num_threads!r}")
        if not isinstance(self.min_blocks_per_sm, int) or self.min_blocks_per_sm < 1:
            raise ConfigError(f"{where}.min_blocks_per_sm: expected a positive int, got {self.min_blocks_per_sm!r}")
        if not isinstance(self.smem_bytes, int) or not 0 <= self.smem_bytes <= MAX_DYNAMIC_SMEM_BYTES:
            raise ConfigError(f"{where}.smem_bytes: expected 0..{MAX_DYNAMIC_SMEM_BYTES}, got {self.smem_bytes!r}")
        object.__setattr__(self, "uses_nvshmem", bool(self.uses_nvshmem))

        defines = tuple(tuple(item) for item in self.defines)
        for item in defines:
            if (len(item) != 2 or not isinstance(item[0], str) or not _MACRO.match(item[0])
                    or not isinstance(item[1], (int, np.integer)) or isinstance(item[1], (bool, np.bool_))):
                raise ConfigError(f"{where}.defines: expected (NAME, int) pairs with an upper-case NAME, got {item!r}")
        names = [name for name, _ in defines]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.defines: a name is repeated in {defines!r}")
        object.__setattr__(self, "defines", tuple(sorted((name, int(v)) for name, v in defines)))

    @property
    def entry_name(self) -> str:
        """The extern "C" kernel name: ``epcomm_<family>_<op>``."""
        return f"epcomm_{self.family}_{self.op}"

    @property
    def header(self) -> str:
        """The family header, relative to cuda_src/."""
        return f"epcomm/{self.family}.cuh"

    def template_args_text(self) -> str:
        """The template argument list as C++ text, in order: ``"256, true"``."""
        return ", ".join(_template_value_text(v) for _, v in self.template_args)

    def describe(self) -> str:
        """Short human description: ``epcomm_probe_write_peer<kNumThreads=256>``, then any defines:
        ``[EPCOMM_DEBUG_TRACE=1]``."""
        args = ", ".join(f"{k}={_template_value_text(v)}" for k, v in self.template_args)
        text = f"{self.entry_name}<{args}>" if args else self.entry_name
        if self.defines:
            text += "[" + ", ".join(f"{k}={v}" for k, v in self.defines) + "]"
        return text

    def stub_source(self) -> str:
        """The generated translation unit: include the family header, instantiate one specialisation."""
        params = ", ".join(f"{ctype} {name}" for ctype, name in self.params)
        call_args = ", ".join(name for _, name in self.params)
        targs = f"<{self.template_args_text()}>" if self.template_args else ""
        described = "".join(f" {k}={_template_value_text(v)}" for k, v in self.template_args)
        head = f"// epcomm stub: family={self.family} op={self.op}{described}"
        return (f"{head}\n"
                f'#include "{self.header}"\n'
                f'extern "C" __global__ void __launch_bounds__({self.num_threads}, {self.min_blocks_per_sm}) '
                f"{self.entry_name}({params}) {{\n"
                f"    epcomm::{self.family}::{self.op}{targs}({call_args});\n"
                f"}}\n")

    def convert_args(self, args: Mapping[str, Any]) -> tuple:
        """Kernel arguments as the numpy scalars CuPy passes by value, in ``params`` order.

        args: a mapping of exactly the parameter names (``dict(x=..., num_tokens=...)``); a missing or unknown name
        raises TypeError naming it, a value of the wrong kind TypeError / ConfigError naming its parameter."""
        converters = self._converters
        if type(args) is not dict and not isinstance(args, Mapping):
            raise TypeError(f"{self.entry_name}: expected a mapping of parameter names to values, got "
                            f"{type(args).__name__} (parameters: {', '.join(self.param_names)})")
        if len(args) == len(converters):  # then no name is unknown unless one is missing
            try:
                return tuple([convert(args[name]) for name, convert in converters])
            except KeyError as exc:
                if exc.args and exc.args[0] in args:  # raised inside a converter, not a missing name
                    raise
        unknown = [name for name in args if name not in self._param_index]
        missing = [name for name in self.param_names if name not in args]
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(map(str, unknown))}"] if unknown else [])
        raise TypeError(f"{self.entry_name}: arguments must name exactly its {len(converters)} parameters: "
                        f"{'; '.join(parts)}")

    @functools.cached_property
    def _converters(self) -> tuple:
        """(name, converter) per parameter in order, built once per spec (launches are on the hot path of every
        call)."""
        return tuple((name, _make_converter(self.entry_name, ctype, name)) for ctype, name in self.params)

    @functools.cached_property
    def _param_index(self) -> dict[str, int]:
        return {name: i for i, (_, name) in enumerate(self.params)}

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.params)


def _template_value_text(value: int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pointer_value(arg: Any) -> int | None:
    if arg is None:
        return 0
    if isinstance(arg, (bool, np.bool_)):
        return None
    if isinstance(arg, (int, np.integer)):
        return int(arg)
    data = getattr(arg, "data", None)  # cupy.ndarray -> MemoryPointer
    ptr = getattr(data, "ptr", None)
    if isinstance(ptr, (int, np.integer)):
        return int(ptr)
    ptr = getattr(arg, "ptr", None)  # cupy MemoryPointer / cuda.core Buffer handles
    if isinstance(ptr, (int, np.integer)):
        return int(ptr)
    data_ptr = getattr(arg, "data_ptr", None)  # torch.Tensor
    if callable(data_ptr):
        return int(data_ptr())
    cai = getattr(arg, "__cuda_array_interface__", None)
    if isinstance(cai, dict) and "data" in cai:
        return int(cai["data"][0])
    return None


def _make_converter(kernel: str, ctype: str, name: str):
    """A fast converter for one parameter: the common cases (CuPy array / int / None) first, _convert for the
    rest (and for every error message)."""
    if is_pointer_ctype(ctype):
        def pointer(arg, _u64=np.uint64):
            if arg is None:
                return _u64(0)
            if type(arg) is int and 0 <= arg < 2**64:
                return _u64(arg)
            data = getattr(arg, "data", None)
            ptr = getattr(data, "ptr", None)
            if type(ptr) is int:
                return _u64(ptr)
            return _convert(kernel, ctype, name, arg)
        return pointer
    np_type = SCALAR_CTYPES[_normalise_ctype(ctype)]
    if np_type is np.float32:
        return lambda arg: _convert(kernel, ctype, name, arg)
    info = np.iinfo(np_type)
    lo, hi = int(info.min), int(info.max)

    def integer(arg):
        if type(arg) is int and lo <= arg <= hi:
            return np_type(arg)
        return _convert(kernel, ctype, name, arg)
    return integer


def _convert(kernel: str, ctype: str, name: str, arg: Any):
    where = f"{kernel}: argument {name!r} ({ctype})"
    if is_pointer_ctype(ctype):
        ptr = _pointer_value(arg)
        if ptr is None:
            raise TypeError(f"{where}: expected a CuPy array, a device address (int) or None, "
                            f"got {type(arg).__name__}")
        if not 0 <= ptr < 2**64:
            raise ConfigError(f"{where}: address {ptr:#x} out of range")
        return np.uint64(ptr)
    np_type = SCALAR_CTYPES[_normalise_ctype(ctype)]
    if np_type is np.float32:
        if isinstance(arg, (bool, np.bool_)) or not isinstance(arg, (int, float, np.integer, np.floating)):
            raise TypeError(f"{where}: expected a number, got {type(arg).__name__}")
        return np.float32(arg)
    if isinstance(arg, (bool, np.bool_)):
        raise TypeError(f"{where}: expected an int, got bool")
    try:
        value = operator.index(arg)
    except TypeError:
        raise TypeError(f"{where}: expected an int, got {type(arg).__name__}") from None
    info = np.iinfo(np_type)
    if not info.min <= value <= info.max:
        raise ConfigError(f"{where}: {value} does not fit in {np.dtype(np_type).name}")
    return np_type(value)
