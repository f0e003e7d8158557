// Prefix sums and block lookups over per-rank counts: a warp's inclusive scan, where a source's block starts in a
// destination's receive order, and which block of an ascending list of starts holds an item.
#pragma once

#include "epcomm/common.cuh"

namespace epcomm {

// Inclusive prefix sum over the lanes of a warp (all lanes must call it).
EPCOMM_DEVICE_INLINE int warp_inclusive_sum(int v) {
    const int lane = threadIdx.x % kWarpSize;
    #pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
        int other = __shfl_up_sync(kFullWarpMask, v, offset);
        if (lane >= offset) v += other;
    }
    return v;
}

// Start row of source `src`'s block in destination `dst`'s receive order: sum over sources s < src of the count
// matrix's [s][dst] (matrix: R x R row-major, in global or shared memory).
template <int kNumRanks>
EPCOMM_DEVICE_INLINE int block_start(const int* matrix, int src, int dst) {
    int start = 0;
    for (int s = 0; s < src; ++s) start += matrix[s * kNumRanks + dst];
    return start;
}

// Index r of the block holding item m among blocks [begins[r], begins[r + 1]), r in [0, n): the last r with
// begins[r] <= m (empty blocks are skipped because their begin equals the next one's). begins is ascending.
EPCOMM_DEVICE_INLINE int find_block(const int* begins, int n, int m) {
    int lo = 0, hi = n;  // answer in [lo, hi)
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (begins[mid] <= m) lo = mid;
        else hi = mid;
    }
    return lo;
}

}  // namespace epcomm
