"""Routing layout of normal-mode dispatch (pure data): the kernel spec of cuda_src/epcomm/layout.cuh, its block size
and the shared-memory size classes. From topk_idx [num_tokens, num_topk] int64 the kernel writes
is_token_in_rank [num_tokens, num_ranks] bool and adds into num_tokens_per_rank [num_ranks] int32 and
num_tokens_per_expert [num_experts] int32 (zeroed by the caller); out-of-range indices count into num_bad_indices."""
from __future__ import annotations

import functools

from .errors import ConfigError
from .runtime import KernelSpec, register_family

LAYOUT_THREADS = 256        # one thread per token
MAX_EXPERTS = 8192          # the largest shared-memory size class


def max_experts_bucket(num_experts: int) -> int:
    """Shared-memory size class of the layout kernel (a power of two >= 256)."""
    if num_experts > MAX_EXPERTS:
        raise ConfigError(f"num_experts: expected at most {MAX_EXPERTS} for the GPU layout kernel, got {num_experts}")
    b = 256
    while b < num_experts:
        b *= 2
    return b


@functools.lru_cache(maxsize=None)
def layout_spec(max_experts: int) -> KernelSpec:
    """The layout kernel for up to max_experts experts (a max_experts_bucket); grid: ceil(num_tokens / LAYOUT_THREADS)
    blocks, num_tokens >= 1."""
    return KernelSpec(
        family="layout", op="dispatch_layout", template_args=(("kNumThreads", LAYOUT_THREADS),),
        params=(("const int64_t*", "topk_idx"), ("int", "num_tokens"), ("int", "num_topk"), ("int", "num_experts"),
                ("int", "num_ranks"), ("int*", "num_tokens_per_rank"), ("int*", "num_tokens_per_expert"),
                ("bool*", "is_token_in_rank"), ("int*", "num_bad_indices")),
        num_threads=LAYOUT_THREADS, smem_bytes=(max_experts + 64) * 4)


def example_specs() -> list[KernelSpec]:
    return [layout_spec(256), layout_spec(MAX_EXPERTS)]


register_family("layout", example_specs)
