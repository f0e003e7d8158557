"""LayoutGpu: the routing-layout launcher (cuda_src/epcomm/layout.cuh; plan: epcomm/layout.py). Needs no buffer, so
every GPU Buffer has it, whichever communication families it was built with."""
from __future__ import annotations

from .. import layout as plan
from ..runtime import get_kernel


class LayoutGpu:
    def __init__(self, ctx):
        self.ctx = ctx

    def get_dispatch_layout(self, topk_idx, num_experts: int, call):
        """(num_tokens_per_rank [R] int32, None, num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool,
        Event); see Buffer.get_dispatch_layout."""
        ctx, cp = self.ctx, self.ctx.cp
        r = ctx.num_ranks
        spec = plan.layout_spec(plan.max_experts_bucket(num_experts))  # raises before any work is queued
        ctx.begin(call)
        t, k = topk_idx.shape
        with ctx.stream:  # zero-filled on the comm stream, so the kernel below is ordered after the fill
            counts = cp.zeros(r + num_experts, cp.int32)  # one fill for both count arrays
            in_rank = cp.empty((t, r), cp.bool_)  # every entry written by the kernel
        per_rank, per_expert = counts[:r], counts[r:]
        if t:
            get_kernel(spec).launch(
                (t + plan.LAYOUT_THREADS - 1) // plan.LAYOUT_THREADS,
                dict(topk_idx=topk_idx, num_tokens=t, num_topk=k, num_experts=num_experts, num_ranks=r,
                     num_tokens_per_rank=per_rank, num_tokens_per_expert=per_expert, is_token_in_rank=in_rank,
                     num_bad_indices=ctx.bad_index.device_ptr),
                stream=ctx.stream)
        return per_rank, None, per_expert, in_rank, ctx.finish(call, (topk_idx,))
