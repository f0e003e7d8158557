// Routing layout of normal-mode dispatch: from top-k expert indices, which ranks each token goes to and how many
// tokens each rank and each expert receives (epcomm/layout.py launches it).
#pragma once

#include "epcomm/common.cuh"

namespace epcomm::layout {

// One thread per token. is_token_in_rank[t, r], per-rank and per-expert counts (outputs pre-zeroed).
// Out-of-range expert indices are counted into *num_bad_indices and otherwise ignored (never addressed).
template <int kNumThreads>
EPCOMM_DEVICE_INLINE void dispatch_layout(const int64_t* topk_idx, int num_tokens, int num_topk, int num_experts,
                                          int num_ranks, int* num_tokens_per_rank, int* num_tokens_per_expert,
                                          bool* is_token_in_rank, int* num_bad_indices) {
    extern __shared__ int smem_counts[];  // [num_experts + num_ranks]
    int* expert_counts = smem_counts;
    int* rank_counts = smem_counts + num_experts;
    for (int i = threadIdx.x; i < num_experts + num_ranks; i += kNumThreads) smem_counts[i] = 0;
    __syncthreads();
    const int experts_per_rank = num_experts / num_ranks;
    int t = blockIdx.x * kNumThreads + threadIdx.x;
    if (t < num_tokens) {
        uint64_t mask = 0;
        for (int k = 0; k < num_topk; ++k) {
            int64_t e = topk_idx[static_cast<int64_t>(t) * num_topk + k];
            if (e < -1 || e >= num_experts) { atomicAdd(num_bad_indices, 1); continue; }
            if (e < 0) continue;
            atomicAdd(&expert_counts[e], 1);
            mask |= 1ull << (e / experts_per_rank);
        }
        for (int r = 0; r < num_ranks; ++r) {
            bool in = (mask >> r) & 1;
            is_token_in_rank[static_cast<int64_t>(t) * num_ranks + r] = in;
            if (in) atomicAdd(&rank_counts[r], 1);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < num_experts; i += kNumThreads)
        if (expert_counts[i]) atomicAdd(&num_tokens_per_expert[i], expert_counts[i]);
    for (int i = threadIdx.x; i < num_ranks; i += kNumThreads)
        if (rank_counts[i]) atomicAdd(&num_tokens_per_rank[i], rank_counts[i]);
}

}  // namespace epcomm::layout
