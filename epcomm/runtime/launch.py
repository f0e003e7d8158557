"""Kernel: a loaded entry point plus its spec; launches with the spec's block size, shared memory and argument ABI."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from .spec import KernelSpec

MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def normalize_grid(grid: int | Sequence[int]) -> tuple[int, int, int]:
    """A grid as the (x, y, z) tuple CuPy wants; every extent positive."""
    try:
        dims = (grid,) if isinstance(grid, int) else tuple(grid)
    except TypeError:
        dims = ()
    if not 1 <= len(dims) <= 3 or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise ConfigError(f"grid: expected an int or a tuple of 1 to 3 ints, got {grid!r}")
    dims = dims + (1,) * (3 - len(dims))
    limits = (MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ)
    if not all(1 <= d <= limit for d, limit in zip(dims, limits)):
        raise ConfigError(f"grid: every extent must be in 1..{MAX_GRID_X} (x) / 1..{MAX_GRID_YZ} (y, z), "
                          f"got {grid!r}")
    return dims


class Kernel:
    """A kernel loaded on one device.

    spec: the KernelSpec it was built from. function: the cupy.cuda.function.Function. module: the Module that owns it
    (kept alive here). arch: the cubin's arch ("sm_90a"). device_id: the CuPy device it is loaded on.
    """

    def __init__(self, spec: KernelSpec, function, module=None, arch: str = "", device_id: int = -1):
        self.spec = spec
        self.function = function
        self.module = module
        self.arch = arch
        self.device_id = device_id

    def launch(self, grid: int | Sequence[int], args: Mapping[str, Any], stream=None) -> None:
        """Launch on grid blocks of spec.num_threads threads with spec.smem_bytes of dynamic shared memory.

        args: a mapping of exactly spec's parameter names to values (``dict(x=x, num_tokens=t, ...)``; converted by
        KernelSpec.convert_args, which raises TypeError naming a missing or unknown name); stream: a CuPy Stream, or
        None for the current stream.
        """
        converted = self.spec.convert_args(args)
        # cupy.cuda.function.Function.__call__(grid, block, args, shared_mem, stream)
        self.function(normalize_grid(grid), (self.spec.num_threads, 1, 1), converted, self.spec.smem_bytes, stream)

    def __repr__(self) -> str:
        return f"Kernel({self.spec.describe()}, arch={self.arch!r}, device={self.device_id})"
