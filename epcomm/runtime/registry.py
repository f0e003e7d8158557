"""The registry of kernel families and their example specs, so CI can NVRTC-compile every kernel without a GPU."""
from __future__ import annotations

import importlib
from typing import Callable, Iterable

from .spec import KernelSpec

# Family modules that register example specs at import; all_example_specs() imports those that exist.
KNOWN_FAMILY_MODULES = ("epcomm.probe", "epcomm.layout", "epcomm.intranode", "epcomm.low_latency")

_families: dict[str, Callable[[], Iterable[KernelSpec]]] = {}


def register_family(name: str, example_specs_fn: Callable[[], Iterable[KernelSpec]]) -> None:
    """Declare a kernel family; example_specs_fn() returns specs covering its kernels (compiled by CI)."""
    if not callable(example_specs_fn):
        raise TypeError(f"register_family({name!r}): example_specs_fn must be callable")
    _families[name] = example_specs_fn


def registered_families() -> tuple[str, ...]:
    return tuple(_families)


def all_example_specs() -> list[KernelSpec]:
    """Every registered family's example specs (duplicates dropped, order kept), after importing the known family
    modules that exist."""
    for module in KNOWN_FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a family module that exists but fails to import is a real error
                raise
    specs: list[KernelSpec] = []
    for name, fn in _families.items():
        for spec in fn():
            if not isinstance(spec, KernelSpec):
                raise TypeError(f"family {name!r}: example specs must be KernelSpec, got {type(spec).__name__}")
            if spec not in specs:
                specs.append(spec)
    return specs
